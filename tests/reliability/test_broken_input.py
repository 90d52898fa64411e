"""Broken data in Redis and refusals from the backend: logged, quarantined or
set aside, never silently dropped, and the rest of the cycle still flushed.

tests/test_flush.py covers one of each kind; these put many kinds in one
cycle and balance the books around them.
"""

import json

import pytest
from chaoslib import usage_in_redis

from xcflushd.keys import Credentials, report_key
from xcflushd_sim.gateway import Gateway

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
FREE = [Credentials({"app_id": f"free{i}"}) for i in (1, 2, 3)]


def flush(daemon_process, redis_server, sim, tmp_path, *extra):
    key_file = tmp_path / "pk"
    key_file.write_text("pk-test\n")
    daemon = daemon_process(["flush", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file",
                             str(key_file), "-c", "/dev/null", "--report-auth-wait", "0", *extra])
    daemon.proc.wait(60)
    return daemon


def test_refusals_between_successes_never_add_up_to_the_dead_letter(tmp_path, r, redis_server, sim, daemon_process):
    """Decision 6: a report is set aside when the backend KEEPS refusing it. A refusal
    now and then (an empty 403 from a flaky proxy) between deliveries is not that."""
    gateway = Gateway(r)
    refuse = {"rate": 1.0, "kinds": ["empty_4xx"], "endpoints": ["report"]}
    for cycle in range(6):
        gateway.cache_report("555", FREE[0], "hits", 2)
        sim.backend.set_faults(refuse if cycle % 2 == 0 else None)
        out = flush(daemon_process, redis_server, sim, tmp_path).output()
        assert "attempt 2 of" not in out and "moved to xcflushd:dead_letter" not in out, out
    assert r.hlen("xcflushd:dead_letter") == 0
    assert sim.backend.received()["555"]["free1"] == {"hits": 12}
    assert usage_in_redis(r)[0] == {}


@pytest.mark.parametrize("wrong_type", ["string", "list", "hash", "zset"])
def test_everything_wrong_at_once_and_the_books_still_balance(tmp_path, r, redis_server, sim, daemon_process,
                                                             wrong_type):
    gateway = Gateway(r)
    gateway.cache_report("555", A1, "hits", 3)
    for creds in FREE:
        gateway.cache_report("555", creds, "hits", 1)
    bad_keys = {
        "report,garbage-without-service": {"hits": "4"},            # does not parse
        "report,service_id:555": {"hits": "5"},                      # no credentials
        "report,service_id:,app_id:x": {"hits": "6"},                # empty service id
        "report,service_id:555,colour:blue": {"hits": "7"},          # no known credential
        "report,service_id:555,app_id:\udcff\udcfe": {"hits": "8"},  # not UTF-8: the backend refuses it
    }
    for key, fields in bad_keys.items():
        r.hset(key, mapping=fields)
        r.sadd("report_keys", key)
    # Values HINCRBY never writes: not a number, negative, beyond a 64-bit counter, a float.
    r.hset(report_key("555", FREE[1]), mapping={"search": "x1", "update": "99999999999999999999999", "other": "-4"})
    r.hset(report_key("555", FREE[2]), "search", "1.5")
    not_a_hash = report_key("555", Credentials({"app_id": "free3", "app_key": "k"}))
    r.rpush(not_a_hash, "a", "b")
    r.sadd("report_keys", not_a_hash, "report,service_id:555,app_id:never-written")
    r.sadd("report_keys", "xcflushd:lease:looks-like-ours", "to_flush:report,service_id:555,app_id:free1")
    # A dead cycle's leftovers of the wrong type, found by the recovery SCAN.
    r.set("to_flush:report,service_id:555,app_id:free1_20260101000000_0123456789ab", "a string")
    r.sadd("flushing_report_keys_20260101000000_0123456789ab", "report,service_id:555,app_id:free3")
    r.set("flushing_report_keys_20260101000000_aaaaaaaaaaaa", "not a set")
    r.set("to_flush:no-suffix-at-all", "x")
    before, _ = usage_in_redis(r)
    written_good = {("555", "a1b2c3"): 3, ("555", "free1"): 1, ("555", "free2"): 1, ("555", "free3"): 1}

    daemon = flush(daemon_process, redis_server, sim, tmp_path)
    out = daemon.output()
    assert daemon.proc.returncode in (0, 1), out
    assert "Traceback" not in out and "Logging error" not in out, out
    received = sim.backend.received().get("555", {})
    for (_, app), hits in written_good.items():
        assert received.get(app, {}).get("hits") == hits, (app, received, out)
    # Nothing vanished: what was not delivered is still in Redis, set aside with a reason.
    after, places = usage_in_redis(r)
    delivered = sum(h for h in written_good.values())
    assert sum(after.values()) == sum(before.values()) - delivered, (before, after)
    reasons = [json.loads(v)["reason"] for v in r.hvals("xcflushd:dead_letter")]
    assert any("unparsable report key" in x for x in reasons), reasons
    assert any("non-integer" in x for x in reasons), reasons
    assert any("unreadable report" in x for x in reasons), reasons
    assert [r.lrange(k, 0, -1) for k in r.scan_iter("xcflushd:quarantine:to_flush:*") if r.type(k) == "list"] \
        == [["a", "b"]]

    r.delete("report_keys")  # (the refused non-UTF-8 report went back into it)
    {"string": r.set, "list": r.rpush, "hash": lambda k, v: r.hset(k, "f", v),
     "zset": lambda k, v: r.zadd(k, {v: 1})}[wrong_type]("report_keys", "oops")
    out = flush(daemon_process, redis_server, sim, tmp_path).output()
    assert "is not a set" in out and "Traceback" not in out, out
    assert r.exists("report_keys") == 0
    assert any(r.type(k) == wrong_type for k in r.scan_iter("xcflushd:quarantine:flushing_report_keys_*"))
    gateway.cache_report("555", A1, "hits", 2)  # the gateway starts a new set
    flush(daemon_process, redis_server, sim, tmp_path)
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 5}
