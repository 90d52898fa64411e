"""--backend-outage strict|resilient|allow: the gateway through a 3scale backend outage.

Against a real redis-server and the simulator answering 503 (or stopped): in
strict mode cached authorizations expire after their TTL as always; resilient
keeps every one alive (values untouched, also of applications without traffic)
until --max-stale after the backend last answered; allow also answers new
applications 1. After recovery every authorization comes from the backend again
and every hit is delivered. Short TTLs; the tracker's clock is injected where a
test needs --max-stale to pass.
"""

import threading
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.errors import BackendRejected, BackendUnavailable
from xcflushd.flusher import Flusher, FlushSettings
from xcflushd.keys import Credentials, auth_key
from xcflushd.outage import OutageTracker, is_answer, is_outage
from xcflushd.renewer import PriorityRenewer
from xcflushd.status import collect, render
from xcflushd.storage import Storage, connect
from xcflushd_sim.gateway import Gateway

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
SMALL = Credentials({"app_id": "small"})      # plan allows 2 hits in eternity
GHOST = Credentials({"app_id": "ghost"})      # not an application of the simulator
IDLE = Credentials({"app_id": "free1"})       # no traffic during the outage
NEW = Credentials({"app_id": "free2"})        # first seen during the outage
DOWN = {"rate": 1.0, "kinds": ["503_html"], "endpoints": ["authorize", "report"]}
AUTH_TTL = 2


class Clock:
    """The tracker's clock: real time plus what a test adds to make --max-stale pass."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def outage_flusher(redis_server, r):
    made = []

    def make(sim, mode, max_stale=60, clock=time.time):
        tracker = OutageTracker(mode, max_stale, clock)
        backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
        backend.observer = tracker.observe
        flusher = Flusher(Storage(connect(redis_server.url)), backend,
                          FlushSettings(auth_ttl=AUTH_TTL, report_auth_wait=0), outage=tracker)
        made.append(backend)
        return flusher

    yield make
    for backend in made:
        backend.close()


def cached(r, *apps):
    return {creds.get("app_id"): r.hgetall(auth_key("555", creds)) for creds in apps}


def cycles_through(flusher, seconds: float):
    """Flush cycles every 0.5 s (a --frequency below the auth TTL) for ``seconds``."""
    results = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        results.append(flusher.flush_once())
        time.sleep(0.5)
    return results


def warm_up(gateway, flusher):
    """Every application cached by a cycle the backend answered."""
    gateway.cache_report("555", A1, "hits", 3)
    gateway.cache_report("555", SMALL, "hits", 2)
    gateway.cache_report("555", GHOST, "hits")
    gateway.cache_report("555", IDLE, "hits")
    assert flusher.flush_once().ok
    before = cached(gateway.redis, A1, SMALL, GHOST, IDLE)
    assert {app: values.get("hits") for app, values in before.items()} == {
        "a1b2c3": "1", "small": "0:limits_exceeded", "ghost": "0:application_not_found", "free1": "1"}
    return before


def test_an_outage_ends_in_a_cycle_without_traffic_once_the_backend_answers(sim, r, outage_flusher, caplog):
    """With nothing to report no call would tell: the kept-alive authorizations and the alert
    would last until --max-stale. One read-only authorize (check-backend's) asks."""
    gateway = Gateway(r)
    flusher = outage_flusher(sim, "resilient")
    warm_up(gateway, flusher)
    sim.backend.set_faults(DOWN)
    # A priority call fails (the calls of either path feed the tracker): the outage starts.
    assert [type(o) for _, o in flusher.backend.authorize_many([(None, "555", NEW)], 1)] == [BackendUnavailable]
    flusher.flush_once()  # nothing to report, the backend still down: the outage goes on
    assert flusher.outage.in_outage

    sim.backend.set_faults({"rate": 0.0})
    quiet = flusher.flush_once()
    assert quiet.ok and quiet.reports == 0
    assert not flusher.outage.in_outage
    assert "backend outage ended after" in caplog.text
    assert sim.backend.received()["555"] == {"a1b2c3": {"hits": 3}, "small": {"hits": 2}, "free1": {"hits": 1}}


@pytest.mark.slow  # 4-7 s: the outage outlasts the auth TTL, then --max-stale passes
@pytest.mark.parametrize("mode", ["strict", "resilient"])
def test_an_outage_longer_than_the_auth_ttl(mode, sim, r, outage_flusher, caplog):
    gateway = Gateway(r)
    clock = Clock()
    flusher = outage_flusher(sim, mode, max_stale=30, clock=clock)
    before = warm_up(gateway, flusher)

    sim.backend.set_faults(DOWN)
    gateway.cache_report("555", A1, "hits", 2)  # served from the cache meanwhile
    during = cycles_through(flusher, AUTH_TTL + 1.5)

    assert flusher.outage.in_outage
    if mode == "strict":
        assert cached(r, A1, SMALL, GHOST, IDLE) == {"a1b2c3": {}, "small": {}, "ghost": {}, "free1": {}}
        assert all(c.kept_alive == 0 for c in during)
    else:
        # All of them, denials still denials, the idle application too.
        assert cached(r, A1, SMALL, GHOST, IDLE) == before
        assert during[-1].kept_alive == 4 and flusher.outage.kept == 4
        assert all(0 < r.ttl(auth_key("555", c)) <= AUTH_TTL for c in (A1, SMALL, GHOST, IDLE))

        clock.offset = 30  # --max-stale after the last answer: they expire as in strict mode
        cycles_through(flusher, AUTH_TTL + 1)
        assert cached(r, A1, SMALL, GHOST, IDLE) == {"a1b2c3": {}, "small": {}, "ghost": {}, "free1": {}}
        assert "--max-stale (30s) passed" in caplog.text

    sim.backend.set_faults({"rate": 0.0})
    gateway.cache_report("555", A1, "hits", 1)
    flusher.flush_once()
    recovered = flusher.flush_once()

    assert recovered.ok and not flusher.outage.in_outage
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 6}  # every hit of before, during and after
    assert r.hget(auth_key("555", A1), "hits") == "1"
    assert AUTH_TTL - 1 <= r.ttl(auth_key("555", A1)) <= AUTH_TTL
    assert "backend outage started" in caplog.text and "backend outage ended after" in caplog.text


def test_an_application_denied_during_the_outage_is_denied_after_it(sim, r, outage_flusher):
    gateway = Gateway(r)
    flusher = outage_flusher(sim, "resilient")
    warm_up(gateway, flusher)
    sim.backend.set_faults(DOWN)
    cycles_through(flusher, 1)
    # Over its limits while the backend was away (its usage reached the backend another way).
    sim.backend.set_usage("555", "a1b2c3", "hits", 1000, period="day")

    sim.backend.set_faults({"rate": 0.0})
    gateway.cache_report("555", A1, "hits")
    flusher.flush_once()

    assert r.hget(auth_key("555", A1), "hits") == "0:limits_exceeded"


def test_a_4xx_during_a_partial_outage_is_applied(sim, r, outage_flusher, allow_renewer):
    """Reports fail with 503 (an outage), authorizations are answered: a deleted application's
    404 replaces its cached 1, the keep-alive does not mask it, and allow does not answer 1 for it."""
    gateway = Gateway(r)
    flusher = outage_flusher(sim, "allow")
    allow_renewer(flusher.outage)
    r.hset(auth_key("555", GHOST), "hits", "1")  # cached before it was deleted
    r.expire(auth_key("555", GHOST), AUTH_TTL)
    r.hset(auth_key("555", IDLE), "hits", "1")
    r.expire(auth_key("555", IDLE), AUTH_TTL)
    sim.backend.set_faults({"rate": 1.0, "kinds": ["503_html"], "endpoints": ["report"]})
    gateway.cache_report("555", GHOST, "hits")

    result = flusher.flush_once()

    assert flusher.outage.in_outage and result.kept_alive == 2
    assert r.hgetall(auth_key("555", GHOST)) == {"hits": "0:application_not_found"}
    assert r.hgetall(auth_key("555", IDLE)) == {"hits": "1"}
    assert gateway.priority_authorization("555", Credentials({"app_id": "ghost2"}), "hits") == \
        "0:application_not_found"
    assert flusher.outage.allowed == 0


def test_the_cycle_that_finds_the_backend_back_batches_nothing(sim, r, outage_flusher):
    """An application deleted during the outage still says 1 (kept alive): batched with others,
    the backend would answer 202 and drop the whole batch (decision 5)."""
    gateway = Gateway(r)
    flusher = outage_flusher(sim, "resilient")
    for creds in (A1, GHOST):  # both cached as authorized; GHOST was deleted since
        r.hset(auth_key("555", creds), "hits", "1")
        r.expire(auth_key("555", creds), AUTH_TTL)
    sim.backend.set_faults(DOWN)
    gateway.cache_report("555", A1, "hits", 1)
    flusher.flush_once()
    assert flusher.outage.in_outage
    gateway.cache_report("555", A1, "hits", 4)
    gateway.cache_report("555", GHOST, "hits", 1)

    sim.backend.set_faults({"rate": 0.0})
    flusher.flush_once()

    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 5}
    assert "a1b2c3" not in sim.backend.dropped().get("555", {})  # only the deleted application's own


@pytest.fixture
def allow_renewer(redis_server, r, sim):
    stopped = threading.Event()
    started = []

    def start(tracker):
        client = connect(redis_server.url)
        backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
        backend.observer = tracker.observe
        renewer = PriorityRenewer(client, Storage(client), backend, AUTH_TTL, stopped, outage=tracker).start()
        assert renewer.subscribed.wait(5)
        started.append((renewer, backend))
        return renewer

    yield start
    stopped.set()
    for renewer, backend in started:
        renewer.join(5)
        backend.close()


def test_allow_answers_a_new_application_and_keeps_a_cached_denial(sim, r, outage_flusher, allow_renewer):
    gateway = Gateway(r)
    flusher = outage_flusher(sim, "allow")
    allow_renewer(flusher.outage)  # one tracker for both paths, as in the daemon
    warm_up(gateway, flusher)
    sim.backend.set_faults(DOWN)

    assert gateway.request("555", NEW, "hits") == "allowed"
    assert r.hgetall(auth_key("555", NEW)) == {"hits": "1"}
    assert 0 < r.ttl(auth_key("555", NEW)) <= AUTH_TTL
    # Cached as not found: another metric of it is denied too, with the same reason.
    assert gateway.request("555", GHOST, "search") == "denied"
    assert gateway.priority_authorization("555", GHOST, "search") == "0:application_not_found"
    # Over a limit on hits: a limit is per metric, so another metric is allowed...
    assert gateway.request("555", SMALL, "other") == "allowed"
    # ...and the cached denial itself stays one, through the outage.
    assert gateway.request("555", SMALL, "hits") == "denied"
    assert flusher.outage.allowed == 2

    during = cycles_through(flusher, AUTH_TTL + 1)
    assert cached(r, GHOST)["ghost"] == {"hits": "0:application_not_found"}
    assert during[-1].kept_alive >= 3
    assert gateway.request("555", NEW, "hits") == "allowed"  # its short-lived 1 expired: asked and allowed again

    sim.backend.set_faults({"rate": 0.0})
    flusher.flush_once()
    assert flusher.flush_once().ok and not flusher.outage.in_outage
    received = sim.backend.received()["555"]
    assert received["free2"] == {"hits": 2}   # the usage of the allowed application is reported
    assert received["small"] == {"hits": 2, "other": 1}  # (the backend decides what it bills)
    assert r.hgetall(auth_key("555", NEW)) == {"hits": "1"}  # now the backend's answer


def test_allow_does_not_answer_past_max_stale_nor_in_resilient_mode(sim, r, allow_renewer):
    gateway = Gateway(r, priority_timeout=0.5)  # no answer is coming: the failure is logged at once
    sim.backend.set_faults(DOWN)
    clock = Clock()
    tracker = OutageTracker("allow", 10, clock)
    allow_renewer(tracker)
    clock.offset = 11
    assert gateway.request("555", NEW, "hits") == "unknown"

    resilient = OutageTracker("resilient", 10)
    allow_renewer(resilient)
    assert gateway.request("555", IDLE, "hits") == "unknown"
    assert r.keys("auth,*") == []


def test_the_last_answer_gauge_follows_a_steady_stream_of_answers():
    from prometheus_client import REGISTRY

    now = [5000.0]
    tracker = OutageTracker("resilient", 60, lambda: now[0])
    for _ in range(30):  # an answer every 0.1 s for 3 s
        now[0] += 0.1
        tracker.observe(None)
    assert REGISTRY.get_sample_value("xcflushd_backend_last_answer_timestamp_seconds") >= 5002.0


def test_a_refusal_is_not_an_outage():
    assert is_outage(BackendUnavailable("authorize: HTTP 503"))
    assert is_outage(BackendRejected(429, "", "too many"))
    for status, code in ((403, "provider_key_invalid"), (404, "application_not_found"), (409, "")):
        assert is_answer(BackendRejected(status, code)) and not is_outage(BackendRejected(status, code))
    assert not is_answer(BackendRejected(0, "no_credentials"))  # ours, says nothing about the backend
    assert not is_outage(BackendRejected(0, "no_credentials"))


def scrape(daemon) -> dict:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line.startswith("xcflushd_")}


@pytest.mark.slow  # a daemon process through an outage and a recovery: 4 s
def test_the_daemon_says_so_in_its_log_status_and_metrics(tmp_path, sim, r, redis_server, daemon_process):
    key_file = tmp_path / "pk"
    key_file.write_text("pk-test\n")
    gateway = Gateway(r)
    gateway.cache_report("555", A1, "hits", 2)
    daemon = daemon_process(["run", "--redis", redis_server.address, "--backend", sim.url, "-c", "/dev/null",
                             "--provider-key-file", str(key_file), "--frequency", "1", "--auth-ttl", "2",
                             "--report-auth-wait", "0", "--backend-outage", "allow", "--max-stale", "60"])
    daemon.wait_for("delivered=1")
    sim.backend.set_faults(DOWN)
    gateway.cache_report("555", A1, "hits", 1)
    assert gateway.request("555", NEW, "hits") == "allowed"
    daemon.wait_for("kept_alive_in_outage=")

    document = collect(r)
    assert document["healthy"] is False
    assert any("backend outage since" in p and "stale authorization(s)" in p and "1 request(s) allowed" in p
               for p in document["problems"]), document["problems"]
    assert "backend outage since" in render(document, redis_server.url)
    assert document["daemons"][0]["outage"]["in_outage"] is True
    exported = scrape(daemon)
    assert exported["xcflushd_backend_outage"] == 1
    assert exported["xcflushd_authorizations_kept_alive"] >= 1
    assert exported["xcflushd_outage_allowed_requests_total"] == 1

    sim.backend.set_faults({"rate": 0.0})
    daemon.wait_for("backend outage ended after")
    assert scrape(daemon)["xcflushd_backend_outage"] == 0
    assert daemon.stop() == 0
    received = sim.backend.received()["555"]
    assert received["a1b2c3"] == {"hits": 3} and received["free2"] == {"hits": 1}
    assert "Traceback" not in daemon.output()


# ---- any interleaving of up and down periods ----------------------------------------------------

UP, DOWN_, REFUSING, IDLE_ = "up", "down", "refusing", "idle"
_OUTCOMES = {UP: None, DOWN_: BackendUnavailable("HTTP 503"), REFUSING: BackendRejected(403, "user_key_invalid")}


@settings(max_examples=300, deadline=None)
@given(mode=st.sampled_from(["strict", "resilient", "allow"]),
       max_stale=st.integers(3, 50),
       periods=st.lists(st.tuples(st.sampled_from([UP, DOWN_, REFUSING, IDLE_]), st.integers(1, 20),
                                  st.booleans()), max_size=30))
def test_nothing_is_kept_or_allowed_past_max_stale_after_the_last_answer(mode, max_stale, periods):
    """Each period: a second passes, a call ends (or none), a flush cycle may end. Whatever is
    kept alive or allowed expires no later than --max-stale after the last answer."""
    now = [1000.0]
    tracker = OutageTracker(mode, max_stale, lambda: now[0])
    last_answer = now[0]
    for state, seconds, cycle_ends in periods:
        for _ in range(seconds):
            now[0] += 1
            if state != IDLE_:
                tracker.observe(_OUTCOMES[state])
                if state != DOWN_:
                    last_answer = now[0]
            ttl = tracker.keep_alive_ttl(AUTH_TTL * 5)
            allowed = tracker.allow_ttl(_OUTCOMES[DOWN_], AUTH_TTL * 5)
            assert now[0] + max(ttl, allowed) <= last_answer + max_stale or not (ttl or allowed)
            if mode == "strict":
                assert ttl == allowed == 0
            if mode != "allow":
                assert allowed == 0
            if tracker.in_outage and mode != "strict" and now[0] + AUTH_TTL * 5 <= tracker.since + max_stale:
                assert ttl == AUTH_TTL * 5  # and while it may, it keeps them for a whole TTL
            if cycle_ends:
                ended = tracker.settle()
                assert not (ended and state == DOWN_)
        if state == UP and cycle_ends and seconds >= 2:
            assert not tracker.in_outage


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(st.tuples(st.booleans(), st.integers(1, 5)), min_size=1, max_size=6))
def test_any_interleaving_of_up_and_down_loses_no_hit(steps, sim, r, redis_server):
    """Real cycles against the simulator up or answering 503: after the backend is back,
    every hit written is delivered exactly, and the outage is over."""
    r.flushall()
    sim.backend.reset()
    gateway = Gateway(r)
    tracker = OutageTracker("resilient", 60)
    backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
    backend.observer = tracker.observe
    flusher = Flusher(Storage(connect(redis_server.url)), backend,
                      FlushSettings(auth_ttl=60, report_auth_wait=0), outage=tracker)
    try:
        for up, hits in steps:
            sim.backend.set_faults({"rate": 0.0} if up else DOWN)
            gateway.cache_report("555", A1, "hits", hits)
            gateway.cache_report("555", IDLE, "hits", 1)
            flusher.flush_once()
        sim.backend.set_faults({"rate": 0.0})
        flusher.flush_once()
        assert flusher.flush_once().ok
    finally:
        backend.close()
    assert not tracker.in_outage
    received = sim.backend.received()["555"]
    assert received["a1b2c3"] == {"hits": sum(h for _, h in steps)}
    assert received["free1"] == {"hits": len(steps)}
