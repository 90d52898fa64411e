"""``xcflushd dead-letter list | requeue | drop``: the real command against redis-server,
with the usage it puts back delivered to the backend simulator by a real flush cycle.

Entries are made the way the daemon makes them: by the flusher after a hopeless
refusal (a non-UTF-8 app id, 422 not_valid_data), or by the storage layer's own
writer (``Storage.dead_letter``, what the flusher calls) on reports taken from
Redis as a cycle takes them.
"""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from xcftest import DEMO_CONFIG, free_port, wait_until

from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.defaults import DEAD_LETTER_HASH, REPORT_KEYS_SET
from xcflushd.flusher import Flusher, FlushSettings
from xcflushd.keys import Credentials, report_key
from xcflushd.storage import Cycle, Storage, connect
from xcflushd_sim.gateway import Gateway

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
FREE1 = Credentials({"app_id": "free1"})
#: Not UTF-8: the backend refuses its reports for good (422 not_valid_data).
BAD = Credentials({"app_id": "bad\udcff", "app_key": "k3yk3yk3y"})


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
    env.update(extra or {})
    return env


def cli(redis_server, *args, env=None, timeout=60):
    """The real command; stdout and stderr as bytes decoded leniently (a test must see raw bytes)."""
    proc = subprocess.run([sys.executable, "-m", "xcflushd", *args, "-c", "/dev/null", "--redis",
                           redis_server.address], capture_output=True, env=_env(env), timeout=timeout)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def set_aside(r, reports, reason="HTTP 422 not_valid_data: test"):
    """Cache ``[(service, creds, metric, n)]`` as the gateway does, take them as a cycle does and
    set each application's report aside with the storage layer's writer. Returns the fields."""
    gateway = Gateway(r)
    for service, creds, metric, n in reports:
        gateway.cache_report(service, creds, metric, n)
    storage = Storage(r)
    cycle = Cycle.new()
    owned = storage.hand_over(cycle, recover=False)
    taken = storage.read_reports(list(owned.items()), cycle)
    for report in taken:
        storage.dead_letter(report, reason, cycle)
    return [report.report_key + cycle.suffix for report in taken]


def listed(redis_server):
    code, out, err = cli(redis_server, "dead-letter", "list", "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def flusher(redis_server, sim):
    backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
    yield Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(report_auth_wait=0, auth_ttl=600))
    backend.close()


def flush_cycle(redis_server, sim, tmp_path):
    """``xcflushd flush``: one real cycle as a process."""
    key = tmp_path / "pk"
    key.write_text("pk-test\n")
    return cli(redis_server, "flush", "--backend", sim.url, "--provider-key-file", str(key),
               "--report-auth-wait", "0")


# ---- list -----------------------------------------------------------------------------------

def test_list_shows_service_redacted_credentials_usage_and_why(r, redis_server, sim, flusher):
    Gateway(r).cache_report("555", BAD, "hits", 3)
    outcomes = [flusher.flush_once() for _ in range(3)]  # the default: set aside after 3 refusals
    assert [o.dead_lettered for o in outcomes] == [0, 0, 1]
    set_aside(r, [("555", A1, "hits", 2), ("555", A1, "search", 1)], reason="test: set aside by hand")

    code, out, err = cli(redis_server, "dead-letter", "list")
    assert code == 0 and err == ""
    assert "s3cr3t" not in out and "k3yk3yk3y" not in out  # secrets cut short
    assert "service 555  app_id:a1b2c3,app_key:s3cr...  usage hits=2,search=1" in out
    assert "service 555  app_id:bad\\udcff,app_key:k3yk...  usage hits=3" in out  # escaped, not raw bytes
    assert "why: HTTP 422 not_valid_data" in out and "why: test: set aside by hand" in out
    assert out.rstrip().endswith("2 entries; `xcflushd dead-letter requeue ID...` retries them, "
                                 "`drop ID...` deletes them")

    doc = {e["credentials"]: e for e in listed(redis_server)}
    assert set(doc) == {"app_id:a1b2c3,app_key:s3cr...", "app_id:bad\udcff,app_key:k3yk..."}
    assert doc["app_id:a1b2c3,app_key:s3cr..."]["usage"] == {"hits": 2, "search": 1}
    assert doc["app_id:bad\udcff,app_key:k3yk..."]["usage"] == {"hits": 3}
    assert all(e["service_id"] == "555" and e["requeueable"] and re.fullmatch(r"[0-9a-f]{12}", e["id"])
               for e in doc.values())
    assert "not_valid_data" in doc["app_id:bad\udcff,app_key:k3yk..."]["reason"]


def test_list_survives_odd_entries_under_a_strict_locale(r, redis_server):
    """Values that are not xcflushd's JSON, a quarantine record, a line break and a non-UTF-8 byte
    in a key: listed, one line each, no traceback even where stdout must be strict UTF-8."""
    r.hset(DEAD_LETTER_HASH, mapping={
        "report,service_id:555,app_id:x\nFORGED  service 1_20260101000000_abcdef012345":
            json.dumps({"usage": {"hits": 1}, "reason": "line\nbreak", "at": "2026-01-01T00:00:00Z"}),
        "report,service_id:555,app_id:\udcfe_20260101000000_abcdef012345": "not json {",
        "report,service_id:555,app_id:q": json.dumps({"usage": {}, "reason": "unreadable report; moved to "
                                                      "xcflushd:quarantine:to_flush:report,service_id:555,app_id:q"}),
    })
    code, out, err = cli(redis_server, "dead-letter", "list", env={"PYTHONIOENCODING": "utf-8:strict"})
    assert code == 0 and "Traceback" not in err, err
    assert not any(line.startswith("FORGED") for line in out.splitlines())
    assert "app_id:x\\nFORGED" in out and "line\\nbreak" in out and "app_id:\\udcfe" in out
    assert "unreadable entry" in out and "not requeueable: a quarantine record" in out
    assert len(out.splitlines()) == 3 * 2 + 2 + 1  # 3 entries, 2 with a refusal line, and the total
    assert len(listed(redis_server)) == 3


# ---- requeue --------------------------------------------------------------------------------

def test_requeue_merges_into_the_report_hash_and_the_next_cycle_delivers_it(tmp_path, r, redis_server, sim):
    [field] = set_aside(r, [("555", A1, "hits", 2), ("555", A1, "search", 1)])
    Gateway(r).cache_report("555", A1, "hits", 5)  # the gateway kept counting meanwhile
    [entry] = listed(redis_server)

    code, out, err = cli(redis_server, "dead-letter", "requeue", entry["id"][:6])  # a prefix will do
    assert (code, out, err) == (0, f"{entry['id']} requeued\n", "")
    assert r.hgetall(report_key("555", A1)) == {"hits": "7", "search": "1"}  # added to, not replaced
    assert r.sismember(REPORT_KEYS_SET, report_key("555", A1))
    assert r.hexists(DEAD_LETTER_HASH, field) == 0

    code, _, err = cli(redis_server, "dead-letter", "requeue", entry["id"])  # twice is not twice the usage
    assert code == 2 and err.count("\n") == 1 and "no entry has that id" in err
    assert r.hgetall(report_key("555", A1)) == {"hits": "7", "search": "1"}

    code, out, err = flush_cycle(redis_server, sim, tmp_path)
    assert code == 0, out + err
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 7, "search": 1}
    assert r.exists(report_key("555", A1)) == 0 and r.hlen(DEAD_LETTER_HASH) == 0


def test_requeue_all_and_what_it_refuses(r, redis_server):
    fields = set_aside(r, [("555", A1, "hits", 2), ("555", FREE1, "hits", 4)])
    r.hset(DEAD_LETTER_HASH, "report,service_id:555,app_id:q",
           json.dumps({"usage": {}, "reason": "unparsable; moved to xcflushd:quarantine:to_flush:x"}))
    r.hset(report_key("555", FREE1), "hits", "not a number")  # HINCRBY cannot add to it
    code, out, err = cli(redis_server, "dead-letter", "requeue", "--all")
    assert code == 1 and err == ""
    lines = sorted(out.splitlines(), key=lambda line: line.split()[1])
    assert [line.split()[1].rstrip(":") for line in lines] == ["refused", "refused", "requeued"]
    assert any("a quarantine record" in line for line in lines)
    assert any("holds a value HINCRBY cannot add to" in line for line in lines)
    assert r.hgetall(report_key("555", A1)) == {"hits": "2"}
    assert r.hgetall(report_key("555", FREE1)) == {"hits": "not a number"}  # untouched
    assert r.hexists(DEAD_LETTER_HASH, fields[0]) + r.hexists(DEAD_LETTER_HASH, fields[1]) == 1
    assert r.hlen(DEAD_LETTER_HASH) == 2  # what was refused stays


# ---- drop and bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["drop"], "name the entries"),
    (["requeue"], "name the entries"),
    (["drop", "--all"], "add --yes"),
    (["drop", "abcd", "--all", "--yes"], "not both"),
    (["list", "abcd"], "takes no entry ids"),
    (["forget"], "expected list"),
    ([], "expected list"),
    (["drop", "zzzz"], "no entry has that id"),
    (["drop", "abc"], "no entry has that id"),  # under 4 characters names nothing
])
def test_refusals_are_one_line_exit_2_and_touch_nothing(r, redis_server, args, says):
    set_aside(r, [("555", A1, "hits", 2), ("555", FREE1, "hits", 4)])
    before = r.hgetall(DEAD_LETTER_HASH)
    code, out, err = cli(redis_server, "dead-letter", *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and says in err, (out, err)
    assert err.startswith("xcflushd: error: ") and "Traceback" not in err
    assert r.hgetall(DEAD_LETTER_HASH) == before


def test_drop_deletes_only_what_it_is_told(r, redis_server):
    set_aside(r, [("555", A1, "hits", 2), ("555", FREE1, "hits", 4)])
    entries = {e["credentials"]: e["id"] for e in listed(redis_server)}
    code, out, err = cli(redis_server, "dead-letter", "drop", entries["app_id:free1"])
    assert (code, out, err) == (0, f"{entries['app_id:free1']} dropped\n", "")
    assert [e["credentials"] for e in listed(redis_server)] == ["app_id:a1b2c3,app_key:s3cr..."]
    assert r.exists(report_key("555", FREE1)) == 0  # dropped usage goes nowhere
    code, out, _ = cli(redis_server, "dead-letter", "drop", "--all", "--yes")
    assert code == 0 and out == f"{entries['app_id:a1b2c3,app_key:s3cr...']} dropped\n"
    assert r.exists(DEAD_LETTER_HASH) == 0
    code, out, _ = cli(redis_server, "dead-letter", "drop", "--all", "--yes")
    assert (code, out) == (0, "the dead letter is empty\n")


def test_an_unreachable_redis_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xcflushd", "dead-letter", "list", "-c", "/dev/null",
                           "--redis", f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "unreachable" in proc.stderr and "Traceback" not in proc.stderr


# ---- nothing lost under concurrency -----------------------------------------------------------

APPS = [f"app{n:02d}" for n in range(40)]


def _many_apps_config():
    config = copy.deepcopy(DEMO_CONFIG)
    config["services"][0]["applications"] += [{"app_id": a, "plan": "free"} for a in APPS]
    return config


def next_cycles(daemon, n):
    seen = daemon.output().count("flush cycle:")
    wait_until(lambda: daemon.output().count("flush cycle:") >= seen + n, 15, f"{n} more flush cycle(s)")


@pytest.mark.slow
def test_two_commands_at_once_and_a_flushing_daemon_lose_and_double_nothing(tmp_path, r, redis_server,
                                                                            daemon_process):
    """2 000 entries; `requeue --all` twice and `drop --all --yes`, interleaved, while a daemon
    flushes every second and the gateway keeps counting on the same applications. Every unit
    ends exactly once: delivered to the backend, or in a dropped entry (nothing stays in Redis)."""
    from xcflushd_sim.server import Simulator

    for rnd in range(50):
        set_aside(r, [("555", Credentials({"app_id": a}), "hits", 1 + (rnd * 7 + i) % 13) for i, a in enumerate(APPS)])
    entries = listed(redis_server)
    assert len(entries) == 50 * len(APPS)
    usage_of = {e["id"]: (e["credentials"].split(":", 1)[1], e["usage"]["hits"]) for e in entries}

    sim = Simulator(_many_apps_config()).start()
    key = tmp_path / "pk"
    key.write_text("pk-test\n")
    daemon = daemon_process(["run", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file",
                             str(key), "-c", "/dev/null", "--frequency", "1", "--report-auth-wait", "0"])
    fed = {a: 0 for a in APPS}
    stop = threading.Event()

    def feed():  # the gateway, counting on the same applications all along
        gateway = Gateway(connect(redis_server.url))
        i = 0
        while not stop.is_set():
            app = APPS[i % len(APPS)]
            gateway.cache_report("555", Credentials({"app_id": app}), "hits", 1)
            fed[app] += 1
            i += 1
            time.sleep(0.0005)

    def command(*args):
        return subprocess.Popen([sys.executable, "-m", "xcflushd", "dead-letter", *args, "-c", "/dev/null",
                                 "--redis", redis_server.address], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())

    def under_way(proc):
        """Wait until ``proc`` has taken entries, then pause it: it holds a listing gone stale."""
        left = r.hlen(DEAD_LETTER_HASH)
        wait_until(lambda: r.hlen(DEAD_LETTER_HASH) < left or proc.poll() is not None, 30,
                   "a command under way", 0.002)
        proc.send_signal(signal.SIGSTOP)

    feeder = threading.Thread(target=feed)
    procs = []
    try:
        daemon.wait_for("ready:")
        feeder.start()
        wait_until(lambda: "delivered=" in daemon.output(), 15, "a first cycle")
        # Each command starts, takes some entries and is paused, so each works on a listing the
        # others (and the daemon's cycles) have changed; then they all go on at once.
        for args in (["requeue", "--all"], ["drop", "--all", "--yes"], ["requeue", "--all"]):
            procs.append(command(*args))
            under_way(procs[-1])
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        results = [(p.communicate(timeout=120), p.returncode)[::-1] for p in procs]
        next_cycles(daemon, 2)  # the gateway still counting meanwhile
        stop.set()
        feeder.join(10)

        outcomes = {}
        for code, (out, err) in results:
            assert code in (0, 1) and err == "", err
            for line in out.splitlines():
                entry_id, outcome = line.split()[:2]
                outcomes.setdefault(entry_id, []).append(outcome.rstrip(":"))
        # Each entry taken exactly once, by one command; the others found it gone.
        for entry_id in usage_of:
            taken = [o for o in outcomes[entry_id] if o != "gone"]
            assert len(taken) == 1 and taken[0] in ("requeued", "dropped"), (entry_id, outcomes[entry_id])
        requeued = [i for i, o in outcomes.items() if "requeued" in o]
        dropped = [i for i, o in outcomes.items() if "dropped" in o]
        assert len(requeued) + len(dropped) == len(entries) and requeued and dropped
        assert any("gone" in o for o in outcomes.values())  # they did race

        expected = dict(fed)
        for entry_id in requeued:
            app, hits = usage_of[entry_id]
            expected[app] += hits

        def delivered():
            got = sim.backend.received().get("555", {})
            return {a: got.get(a, {}).get("hits", 0) for a in APPS} == expected

        wait_until(delivered, 30, "every requeued and fed unit delivered")
        next_cycles(daemon, 1)  # one more: nothing delivered twice
        got = sim.backend.received()["555"]
        assert {a: got[a]["hits"] for a in APPS} == expected
        assert sim.backend.dropped() == {}
        assert r.hlen(DEAD_LETTER_HASH) == 0
        assert not [k for k in r.scan_iter() if k.startswith(("report,", "to_flush:", "flushing_report_keys"))]
        assert daemon.stop() == 0
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        sim.stop()


def test_it_reads_the_redis_password_file_and_the_config_file_as_run_does(tmp_path, r, redis_server):
    set_aside(r, [("555", A1, "hits", 2)])
    r.config_set("requirepass", "s3cret-pw")
    try:
        pw = tmp_path / "pw"
        pw.write_text("s3cret-pw\n")
        conf = tmp_path / "xcflushd.conf"
        conf.write_text(f"redis = {redis_server.address}\nredis-password-file = {pw}\n")
        proc = subprocess.run([sys.executable, "-m", "xcflushd", "dead-letter", "list", "--json", "-c", str(conf)],
                              capture_output=True, text=True, env=_env(), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert [e["usage"] for e in json.loads(proc.stdout)] == [{"hits": 2}]
        code, out, err = cli(redis_server, "dead-letter", "list")  # no password: refused, and said in one line
        assert code == 2 and out == "" and err.count("\n") == 1 and "s3cret-pw" not in err
    finally:
        import redis as redis_py
        redis_py.Redis(port=redis_server.port, password="s3cret-pw").config_set("requirepass", "")
