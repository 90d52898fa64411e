"""The one backend engine under load and in outages, against the simulator and real Redis.

Storm: thousands of distinct priority requests at once, each answered, one
backend call each. Outages (refused, blackholed, unresolvable): a cycle
fails fast (a handful of calls tried, not one connect per report), every
report stays, the priority path answers nothing and recovers by itself.
Counters are exact: backend calls recorded == calls the simulator received.
Outcomes only: nothing here asserts speed.
"""

import logging
import socket
import threading

import pytest
import redis as redislib
from prometheus_client import REGISTRY
from xcftest import DEMO_CONFIG, free_port, wait_until

from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.flusher import Flusher, FlushSettings
from xcflushd.keys import Credentials, auth_request_message
from xcflushd.storage import Storage, connect
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
RESPONSES = "xc_channel_auth_response:"


def counter(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def backend_calls_recorded(endpoint):
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "xcflushd_backend_requests":
            total += sum(s.value for s in metric.samples
                         if s.name.endswith("_total") and s.labels.get("endpoint") == endpoint)
    return total


def priority_counts():
    return {r: counter("xcflushd_priority_requests_total", result=r)
            for r in ("authorized", "denied", "deduplicated", "failed", "dropped")}


def delta(after, before):
    return {k: after[k] - before[k] for k in after}


class Answers:
    """One pattern subscription collecting every priority answer."""

    def __init__(self, r):
        self.pubsub = r.pubsub()
        self.pubsub.psubscribe(RESPONSES + "*")
        self.pubsub.get_message(timeout=2)
        self.got = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg and msg["type"] == "pmessage":
                self.got[msg["channel"][len(RESPONSES):]] = msg["data"]

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.pubsub.close()


def distinct_requests(n, metric="hits"):
    return [auth_request_message("555", Credentials(dict(A1.items(), referrer=f"r{i}.example")), metric)
            for i in range(n)]


@pytest.mark.slow
def test_a_cold_cache_storm_is_answered_with_one_backend_call_per_distinct_request(r, renewer_for):
    with Simulator(DEMO_CONFIG, latency=0.03).start() as slow:
        renewer_for(slow.url)
        answers = Answers(r)
        before = priority_counts()
        calls_before = backend_calls_recorded("authorize")
        messages = distinct_requests(2000)
        pipe = r.pipeline(transaction=False)
        for message in messages:
            pipe.publish("xc_channel_auth_requests", message)
        pipe.execute()
        wait_until(lambda: len(answers.got) == len(messages), 120, "every request answered")
        answers.close()
        assert set(answers.got) == set(messages) and set(answers.got.values()) == {"1"}
        assert slow.backend.calls()["authorize"] == 2000
        assert backend_calls_recorded("authorize") - calls_before == 2000
        counts = delta(priority_counts(), before)
        assert counts == {"authorized": 2000, "denied": 0, "deduplicated": 0, "failed": 0, "dropped": 0}


def test_identical_requests_join_the_call_in_flight_and_are_counted(r, renewer_for):
    with Simulator(DEMO_CONFIG, latency=0.3).start() as slow:
        renewer_for(slow.url)
        answers = Answers(r)
        before = priority_counts()
        denied = auth_request_message("555", Credentials({"app_id": "ghost"}), "hits")
        for _ in range(20):
            r.publish("xc_channel_auth_requests", distinct_requests(1)[0])
            r.publish("xc_channel_auth_requests", denied)
        wait_until(lambda: len(answers.got) == 2, 20, "both answered")
        answers.close()
        assert answers.got[denied] == "0:application_not_found"
        assert slow.backend.calls()["authorize"] == 2
        wait_until(lambda: sum(delta(priority_counts(), before).values()) == 40, 5, "all 40 counted")
        assert delta(priority_counts(), before) == {"authorized": 1, "denied": 1, "deduplicated": 38,
                                                    "failed": 0, "dropped": 0}


def test_a_full_priority_queue_drops_requests_logs_and_counts_them(r, renewer_for, caplog):
    with Simulator(DEMO_CONFIG, latency=0.5).start() as slow:
        renewer_for(slow.url, priority_concurrency=1, priority_queue=3)
        answers = Answers(r)
        before = priority_counts()
        messages = distinct_requests(30)
        with caplog.at_level(logging.WARNING, logger="xcflushd.renewer"):
            pipe = r.pipeline(transaction=False)
            for message in messages:
                pipe.publish("xc_channel_auth_requests", message)
            pipe.execute()
            wait_until(lambda: sum(delta(priority_counts(), before).values()) == 30, 30, "all 30 handled")
        answers.close()
        counts = delta(priority_counts(), before)
        assert counts["dropped"] >= 20 and counts["authorized"] == 30 - counts["dropped"] >= 1
        assert len(answers.got) == counts["authorized"]
        assert slow.backend.calls()["authorize"] == counts["authorized"]
        dropped_lines = [rec for rec in caplog.records if "dropped" in rec.getMessage()]
        assert 1 <= len(dropped_lines) <= 11  # rate-limited: 10, then a line saying how many more


# ---- outages ------------------------------------------------------------------------

def refused_url():
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def blackhole():
    """A loopback port that drops SYNs: a listener whose accept queue is full (never accepted)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    for _ in range(2):  # fill the queue; later SYNs are dropped as by a firewall
        filler = socket.socket()
        filler.settimeout(0.3)
        try:
            filler.connect(("127.0.0.1", port))
        except OSError:
            pass
        fillers.append(filler)
    yield f"http://127.0.0.1:{port}"
    for s in fillers + [sock]:
        s.close()


@pytest.mark.parametrize("kind", ["refused", "blackholed", "dns"])
def test_an_unreachable_backend_fails_a_cycle_fast_and_keeps_every_report(r, redis_server, kind, request):
    url = {"refused": refused_url, "dns": lambda: "http://backend.invalid:8080",
           "blackholed": lambda: request.getfixturevalue("blackhole")}[kind]()
    gateway = Gateway(r)
    apps = [Credentials({"app_id": f"app{i}", "app_key": "k"}) for i in range(300)]
    for creds in apps:
        gateway.cache_report("555", creds, "hits", 2)
    backend = make_client(url, ServiceCredentials("pk-test"), 1.0, 2)
    tried_before = backend_calls_recorded("report")
    try:
        flusher = Flusher(Storage(connect(redis_server.url)), backend,
                          FlushSettings(report_auth_wait=0, concurrency=32))
        result = flusher.flush_once()
    finally:
        backend.close()
    assert result.error is None and result.delivered == 0 and result.failed == 300, result.summary()
    assert result.backend_error  # one line saying why
    # Failing fast: the first wave of connects is tried, the rest fail with its reason.
    assert backend_calls_recorded("report") - tried_before <= 32
    assert r.scard("report_keys") == 300
    assert all(r.hget(k, "hits") == "2" for k in r.smembers("report_keys"))


def test_the_priority_path_answers_nothing_in_an_outage_and_recovers_by_itself(r, renewer_for):
    url = refused_url()
    port = int(url.rsplit(":", 1)[1])
    renewer_for(url, connect_timeout=1.0)
    gateway = Gateway(r, priority_timeout=0.5)
    assert gateway.priority_authorization("555", A1, "hits") is None
    with Simulator(DEMO_CONFIG, port=port).start():
        answer = wait_until(lambda: Gateway(r, priority_timeout=0.5).priority_authorization("555", A1, "hits"),
                            15, "an answer once the backend is back")
    assert answer == "1"


def test_backend_calls_are_counted_exactly_on_both_paths(sim, r, redis_server, renewer_for):
    gateway = Gateway(r)
    for _ in range(40):
        gateway.cache_report("555", Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"}), "hits")
    before = {e: backend_calls_recorded(e) for e in ("authorize", "report")}
    backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
    try:
        result = Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(report_auth_wait=0)).flush_once()
    finally:
        backend.close()
    assert result.ok
    renewer_for(sim.url)
    client = redislib.Redis(port=r.connection_pool.connection_kwargs["port"], decode_responses=True)
    assert Gateway(client).priority_authorization("555", Credentials({"app_id": "free1"}), "hits") == "1"
    calls = sim.backend.calls()
    assert backend_calls_recorded("report") - before["report"] == calls["report"]
    assert backend_calls_recorded("authorize") - before["authorize"] == calls["authorize"]


@pytest.mark.parametrize("kind", ["refused", "blackholed", "dns"])
def test_a_serial_cycle_in_an_outage_waits_for_one_connect_not_one_per_report(r, redis_server, kind, request):
    """One call in flight (-t 1): without failing fast, each of the 50 new applications' metric
    checks and then each authorization would wait its own connect timeout. The first connect's
    failure fails the rest (the reports wait for their checks: none is sent)."""
    url = {"refused": refused_url, "dns": lambda: "http://backend.invalid:8080",
           "blackholed": lambda: request.getfixturevalue("blackhole")}[kind]()
    gateway = Gateway(r)
    for i in range(50):
        gateway.cache_report("555", Credentials({"app_id": f"app{i}", "app_key": "k"}), "hits", 1)
    backend = make_client(url, ServiceCredentials("pk-test"), 1.0, 2)
    tried_before = {e: backend_calls_recorded(e) for e in ("report", "authorize")}
    try:
        result = Flusher(Storage(connect(redis_server.url)), backend,
                         FlushSettings(report_auth_wait=0, concurrency=1)).flush_once()
    finally:
        backend.close()
    assert result.failed == 50 and result.delivered == 0, result.summary()
    tried = {e: backend_calls_recorded(e) - tried_before[e] for e in tried_before}
    assert tried["report"] + tried["authorize"] == 1, tried
    assert r.scard("report_keys") == 50


def test_a_failing_callback_is_logged_a_few_times_and_an_unsendable_call_fails(sim, caplog):
    from xcflushd.errors import BackendUnavailable
    from xcflushd.transport import Engine, Request

    engine = Engine(sim.url, 2, 5)
    request = engine.build("GET", "/transactions/authorize.xml", "provider_key=pk-test&service_id=555&app_id=a1b2c3")
    unsendable = Request("GET", "/x", engine.prefix + "/x\0y", None, [])  # libcurl takes no NUL in a URL
    outcomes = []

    def failing(_tag, outcome):
        outcomes.append(outcome)
        raise RuntimeError("a callback's own bug")

    try:
        with caplog.at_level(logging.ERROR, logger="xcflushd.transport"):
            for _ in range(30):
                assert engine.submit_priority(request, failing)
            wait_until(lambda: len(outcomes) == 30, 10, "every call's outcome")
            box = []
            worker = threading.Thread(target=lambda: box.append(_outcome(engine, unsendable)), daemon=True)
            worker.start()
            worker.join(10)
    finally:
        engine.close()
    assert isinstance(box[0], BackendUnavailable) and "not sent" in str(box[0]), box
    assert not any(isinstance(o, BackendUnavailable) for o in outcomes), outcomes[:3]
    lines = [rec.getMessage() for rec in caplog.records if "callback failed" in rec.getMessage()]
    assert 1 <= len(lines) <= 10 and "RuntimeError: a callback's own bug" in lines[0], lines
    assert all("\n" not in line for line in lines)


def _outcome(engine, request):
    try:
        return engine.request(request)
    except Exception as exc:
        return exc
