"""Flush cycles end to end: gateway-format keys in, exact usage at the simulated
backend, auth hashes with TTL out, nothing left behind or lost."""

import json
import threading

import pytest

from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.flusher import Flusher, FlushSettings
from xcflushd.keys import Credentials, auth_key, report_key
from xcflushd.storage import Cycle, Storage, connect
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
ODD = Credentials({"app_id": "a:i,1", "app_key": "k:e,y"})
UK = Credentials({"user_key": "uk:1"})
GHOST = Credentials({"app_id": "ghost"})


@pytest.fixture
def flusher_for(redis_server, r):
    made = []

    def make(sim, **settings):
        settings.setdefault("report_auth_wait", 0)
        settings.setdefault("auth_ttl", 600)
        backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
        flusher = Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(**settings))
        made.append(backend)
        return flusher

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def gateway(r):
    return Gateway(r)


def leftovers(r):
    return sorted(k for k in r.keys("*") if k.startswith(("to_flush:", "flushing_report_keys", "report")))


def test_full_cycle_delivers_exact_usage_and_caches_authorizations(sim, r, gateway, flusher_for):
    for _ in range(3):
        gateway.cache_report("555", A1, "hits")
    gateway.cache_report("555", A1, "search", 5)
    gateway.cache_report("555", ODD, "hits", 2)
    gateway.cache_report("777", UK, "hits", 4)
    with_referrer = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t", "referrer": "x.org"})
    gateway.cache_report("555", with_referrer, "hits")  # same report key as A1

    result = flusher_for(sim).flush_once()

    assert result.ok, result.summary()
    assert result.reports == 3 and result.delivered == 3
    received = sim.backend.received()
    assert received["555"]["a1b2c3"] == {"hits": 4, "search": 5}
    assert received["555"]["a:i,1"] == {"hits": 2}
    assert received["777"]["uk-app"] == {"hits": 4}
    assert leftovers(r) == []
    key = auth_key("555", A1)
    assert r.hgetall(key) == {"hits": "1", "search": "1"}
    assert 590 < r.ttl(key) <= 600
    assert r.hget(auth_key("555", ODD), "hits") == "1"
    assert r.hget(auth_key("777", UK), "hits") == "1"


def test_limits_and_unknown_applications_are_cached_as_denials(sim, r, gateway, flusher_for):
    small = Credentials({"app_id": "small"})
    gateway.cache_report("555", small, "hits", 2)      # plan allows 2 hits in eternity
    gateway.cache_report("555", GHOST, "hits")
    flusher_for(sim).flush_once()
    assert r.hget(auth_key("555", small), "hits") == "0:limits_exceeded"
    assert r.hget(auth_key("555", GHOST), "hits") == "0:application_not_found"


def test_backend_down_keeps_usage_in_redis_for_the_next_cycle(sim, r, gateway, flusher_for):
    gateway.cache_report("555", A1, "hits", 7)
    gateway.cache_report("777", UK, "hits", 1)
    flusher = flusher_for(sim)
    sim.backend.set_faults({"rate": 1.0, "kinds": ["500"], "endpoints": ["report", "authorize"]})

    down = flusher.flush_once()

    assert not down.ok and down.failed == 2 and down.delivered == 0
    assert r.hgetall(report_key("555", A1)) == {"hits": "7"}
    assert r.smembers("report_keys") == {report_key("555", A1), report_key("777", UK)}
    assert sim.backend.received() == {}

    gateway.cache_report("555", A1, "hits", 1)  # the gateway keeps writing meanwhile
    sim.backend.set_faults({"rate": 0.0})
    up = flusher.flush_once()

    assert up.ok and up.delivered == 2
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 8}
    assert sim.backend.received()["777"]["uk-app"] == {"hits": 1}
    assert leftovers(r) == []


def test_backend_unreachable_keeps_usage(r, gateway, flusher_for, sim):
    gateway.cache_report("555", A1, "hits", 3)
    url = sim.url
    sim.stop()

    class Gone:
        pass

    gone = Gone()
    gone.url = url
    result = flusher_for(gone).flush_once()
    assert result.failed == 1
    assert r.hgetall(report_key("555", A1)) == {"hits": "3"}


def test_batches_only_confirmed_apps_and_never_loses_others_to_an_unknown_app(sim, r, gateway, flusher_for):
    apps = [Credentials({"app_id": f"free{i}"}) for i in (1, 2, 3)]
    flusher = flusher_for(sim)
    for creds in apps:
        gateway.cache_report("555", creds, "hits")
    cold = flusher.flush_once()
    assert cold.report_calls == 1  # nothing cached yet: each checked, then the three in one batch

    sim.backend.reset()
    for creds in apps:
        gateway.cache_report("555", creds, "hits", 10)
    gateway.cache_report("555", GHOST, "hits", 10)
    # A stale cached authorization for the ghost must not get it into a batch either.
    r.hset(auth_key("555", GHOST), "hits", "0:application_not_found")
    steady = flusher.flush_once()

    assert steady.ok
    assert steady.report_calls == 2  # one batch of the three confirmed apps, the ghost alone
    received = sim.backend.received()
    assert {app: received["555"][app] for app in ("free1", "free2", "free3")} == \
        {"free1": {"hits": 10}, "free2": {"hits": 10}, "free3": {"hits": 10}}
    assert "ghost" not in received.get("555", {})


def test_an_access_token_alone_never_joins_a_batch(r, gateway, flusher_for):
    """Its transaction names no application: the backend answers 202 and drops the whole
    call (observed), so a cached 1 or a good check must not put it beside others."""
    config = {"provider_key": "pk-test", "services": [
        {"id": "555", "default": True, "backend_version": "oauth", "metrics": {"hits": None},
         "plans": {"free": {}},
         "applications": [{"app_id": "o1", "plan": "free", "access_tokens": ["tok1"]},
                          {"app_id": "free1", "plan": "free"}, {"app_id": "free2", "plan": "free"}]}]}
    token_only = Credentials({"access_token": "tok1"})
    simulator = Simulator(config).start()
    try:
        flusher = flusher_for(simulator)
        results = []
        for _ in range(2):  # cold, then with cached authorizations
            for creds in (Credentials({"app_id": "free1"}), Credentials({"app_id": "free2"}), token_only):
                gateway.cache_report("555", creds, "hits", 2)
            results.append(flusher.flush_once())
        assert r.hget(auth_key("555", token_only), "hits") == "1"  # cached: it would have vouched
        assert [res.report_calls for res in results] == [2, 2]  # the two app ids batched, the token alone
        received = simulator.backend.received()["555"]
        assert received["free1"] == {"hits": 4} and received["free2"] == {"hits": 4}
        assert "free1" not in simulator.backend.dropped().get("555", {})
    finally:
        simulator.stop()


def test_batch_size_one_disables_batching(sim, r, gateway, flusher_for):
    apps = [Credentials({"app_id": f"free{i}"}) for i in (1, 2, 3)]
    flusher = flusher_for(sim, batch_size=1)
    for _ in range(2):
        for creds in apps:
            gateway.cache_report("555", creds, "hits")
        result = flusher.flush_once()
    assert result.report_calls == 3


def test_leftovers_of_a_dead_cycle_are_recovered_but_a_live_cycles_are_not(sim, r, gateway, flusher_for):
    dead = report_key("555", A1)
    live = report_key("777", UK)
    r.hset("to_flush:" + dead + "_20260101000000_0123456789ab", "hits", 5)
    r.sadd("flushing_report_keys_20260101000000_0123456789ab", report_key("555", ODD))
    r.hset(report_key("555", ODD), "hits", 2)
    r.hset("to_flush:" + dead + "_20170621145501", "search", 1)  # written by the Ruby daemon
    r.hset("to_flush:" + live + "_20260101000000_aaaaaaaaaaaa", "hits", 9)
    r.set("xcflushd:lease:aaaaaaaaaaaa", 1, ex=60)

    result = flusher_for(sim).flush_once(recover=True)

    assert result.ok, result.summary()
    received = sim.backend.received()
    assert received["555"]["a1b2c3"] == {"hits": 5, "search": 1}
    assert received["555"]["a:i,1"] == {"hits": 2}
    assert "777" not in received
    assert r.hgetall("to_flush:" + live + "_20260101000000_aaaaaaaaaaaa") == {"hits": "9"}


def test_broken_keys_are_set_aside_and_the_rest_still_flushed(sim, r, gateway, flusher_for):
    gateway.cache_report("555", A1, "hits", 2)
    r.hset(report_key("555", A1), "bogus", "not-a-number")
    r.sadd("report_keys", "report,garbage-without-service")
    r.hset("report,garbage-without-service", "hits", 1)
    r.sadd("report_keys", report_key("555", ODD))
    r.set(report_key("555", ODD), "a string, not a hash")

    result = flusher_for(sim).flush_once()

    assert result.error is None
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 2}
    dead = r.hgetall("xcflushd:dead_letter")
    reasons = [json.loads(v)["reason"] for v in dead.values()]
    assert any("non-integer" in reason for reason in reasons)
    assert any("unparsable report key" in reason for reason in reasons)
    assert any("unreadable" in reason for reason in reasons)
    quarantined = [r.get(k) for k in r.keys("xcflushd:quarantine:to_flush:*") if r.type(k) == "string"]
    assert quarantined == ["a string, not a hash"]


def test_report_keys_of_the_wrong_type_is_quarantined(sim, r, flusher_for):
    r.set("report_keys", "oops")
    result = flusher_for(sim).flush_once()
    assert result.error is None
    [quarantined] = r.keys("xcflushd:quarantine:flushing_report_keys_*")
    assert r.get(quarantined) == "oops"
    assert r.exists("report_keys") == 0


def test_hopeless_report_moves_to_dead_letter_after_a_few_cycles(sim, r, gateway, flusher_for):
    bad = Credentials({"app_id": "bad\udcff"})  # not UTF-8: the backend answers 422 not_valid_data
    gateway.cache_report("555", bad, "hits", 3)
    gateway.cache_report("555", A1, "hits", 1)
    flusher = flusher_for(sim, dead_letter_after=3)
    outcomes = [flusher.flush_once() for _ in range(3)]
    assert [o.dead_lettered for o in outcomes] == [0, 0, 1]
    assert r.exists(report_key("555", bad)) == 0
    entry = json.loads(r.hget("xcflushd:dead_letter", next(iter(r.hkeys("xcflushd:dead_letter")))))
    assert entry["usage"] == {"hits": 3} and "not_valid_data" in entry["reason"]
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 1}


def test_credential_errors_keep_retrying(sim, r, gateway, redis_server):
    gateway.cache_report("555", A1, "hits", 3)
    backend = make_client(sim.url, ServiceCredentials("wrong-key"), 2, 5)
    settings = FlushSettings(report_auth_wait=0, dead_letter_after=1)
    flusher = Flusher(Storage(connect(redis_server.url)), backend, settings)
    for _ in range(3):
        result = flusher.flush_once()
        assert result.failed == 1 and result.dead_lettered == 0
    assert r.hgetall(report_key("555", A1)) == {"hits": "3"}
    assert r.exists(auth_key("555", A1)) == 0  # no denial cached because of our own key


def test_service_tokens_authenticate_per_service(sim, r, gateway, redis_server):
    gateway.cache_report("555", A1, "hits", 2)
    backend = make_client(sim.url, ServiceCredentials(None, {"555": "st-555"}), 2, 5)
    flusher = Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(report_auth_wait=0))
    assert flusher.flush_once().ok
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 2}


def test_refusals_without_a_reason_are_retried_not_set_aside(sim, r, gateway, flusher_for):
    gateway.cache_report("555", A1, "hits", 4)
    sim.backend.set_faults({"rate": 1.0, "kinds": ["empty_4xx"], "endpoints": ["report"]})
    flusher = flusher_for(sim, dead_letter_after=2)
    outcomes = [flusher.flush_once() for _ in range(4)]
    assert [o.dead_lettered for o in outcomes] == [0, 0, 0, 0]
    assert r.exists("xcflushd:dead_letter") == 0
    assert r.hgetall(report_key("555", A1)) == {"hits": "4"}


def test_an_unreadable_authorize_answer_fails_that_application_only(r, gateway, redis_server):
    from rawserver import HUGE, StatusServer

    other = Credentials({"app_id": "free1"})
    gateway.cache_report("555", A1, "hits")
    gateway.cache_report("555", other, "hits")
    for creds in (A1, other):  # cached: the reports go without a metric check, the answer is the phase's
        r.hset(auth_key("555", creds), "hits", "1")
    server = StatusServer([lambda app_id: HUGE if app_id == b"a1b2c3" else b"1000"])
    backend = make_client(server.url, ServiceCredentials("pk-test"), 2, 5)
    try:
        flusher = Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(report_auth_wait=0))
        result = flusher.flush_once()
    finally:
        backend.close()
        server.close()
    assert result.error is None, result.summary()
    assert (result.delivered, result.authorized, result.auth_failures) == (2, 1, 1), result.summary()
    assert "malformed usage_report" in result.backend_error
    assert r.hget(auth_key("555", other), "hits") == "1"
    assert leftovers(r) == []


def ended(flusher, bound=30.0):
    """``flusher.flush_once()``'s result; a cycle still running after ``bound`` seconds (wedged) fails
    the test, and is stopped."""
    box = []
    worker = threading.Thread(target=lambda: box.append(flusher.flush_once()), daemon=True)
    worker.start()
    worker.join(bound)
    flusher.stop.set()
    assert not worker.is_alive() and box, f"the flush cycle was still running after {bound}s"
    flusher.stop.clear()
    return box[0]


def test_a_report_key_turned_into_a_string_while_its_call_fails_is_set_aside_and_cycles_go_on(
        r, gateway, redis_server):
    from rawserver import StatusServer

    gateway.cache_report("555", A1, "hits", 3)
    gateway.cache_report("555", A1, "search", 2)
    key = report_key("555", A1)
    server = StatusServer([lambda _app: b"1000"], on_report=lambda: r.set(key, "not a hash"), report_status=500)
    backend = make_client(server.url, ServiceCredentials("pk-test"), 2, 5)
    try:
        flusher = Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(report_auth_wait=0))
        first = ended(flusher)
        gateway.cache_report("555", ODD, "hits")
        server.on_report = lambda: None
        server.report_status = 202
        second = ended(flusher)
    finally:
        backend.close()
        server.close()
    assert first.error is None and first.failed == 1, first.summary()
    entry = json.loads(r.hget("xcflushd:dead_letter", next(iter(r.hkeys("xcflushd:dead_letter")))))
    assert entry["usage"] == {"hits": 3, "search": 2}
    assert "WRONGTYPE" in entry["reason"], entry
    assert r.get(key) == "not a hash"  # the gateway's key is left as it is
    assert second.ok and second.delivered == 1, second.summary()
    assert leftovers(r) == [key]


@pytest.mark.parametrize("field, value, why", [("search", "abc", "not an integer"),
                                               ("search", str(2**63 - 2), "overflow")])
def test_a_put_back_the_report_key_refuses_halfway_takes_back_what_it_added(r, redis_server, field, value, why):
    """HINCRBY hits, then search fails: hits is taken back, the usage is set aside whole."""
    from xcflushd.storage import HandOver

    storage = Storage(connect(redis_server.url))
    Gateway(r).cache_report("555", A1, "hits", 3)
    Gateway(r).cache_report("555", A1, "search", 2)
    cycle = Cycle.new()
    owned = storage.hand_over(cycle, recover=False)
    [report] = storage.read_reports(list(HandOver.items(owned)), cycle)
    r.hset(report.report_key, mapping={"hits": "10", field: value})  # the gateway wrote meanwhile
    assert storage.restore([report]) == 1
    assert r.hgetall(report.report_key) == {"hits": "10", field: value}
    [entry] = [json.loads(v) for v in r.hvals("xcflushd:dead_letter")]
    assert entry["usage"] == {"hits": 3, "search": 2} and why in entry["reason"], entry
    assert not r.exists(report.to_flush_key)
