"""The priority path end to end through real pub/sub: the gateway asks, the
renewer asks the backend once, caches the whole auth hash and answers."""

import logging
import threading
import time

import redis as redislib
from rawserver import HUGE, StatusServer
from xcftest import DEMO_CONFIG, RedisServer

from xcflushd.keys import Credentials, auth_key
from xcflushd_sim.gateway import Gateway

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t", "referrer": "x.example.org"})


def test_priority_request_is_answered_and_cached(sim, r, renewer_for):
    renewer_for(sim.url)
    answer = Gateway(r).priority_authorization("555", A1, "hits")
    assert answer == "1"
    key = auth_key("555", A1)  # referrer included, as the gateway computes it
    assert r.hget(key, "hits") == "1"
    assert r.hget(key, "search") == "1"  # the whole hash is renewed, not just the metric
    assert 590 < r.ttl(key) <= 600


def test_ids_with_colons_and_commas(sim, r, renewer_for):
    renewer_for(sim.url)
    odd = Credentials({"app_id": "a:i,1", "app_key": "k:e,y"})
    assert Gateway(r).priority_authorization("555", odd, "hits") == "1"
    assert r.hget("auth,service_id:555,app_id:a\\:i\\,1,app_key:k\\:e\\,y", "hits") == "1"


def test_denials_carry_their_reason(sim, r, renewer_for):
    renewer_for(sim.url)
    gateway = Gateway(r)
    assert gateway.priority_authorization("555", Credentials({"app_id": "ghost"}), "hits") == \
        "0:application_not_found"
    wrong_key = Credentials({"app_id": "a1b2c3", "app_key": "nope"})
    assert gateway.priority_authorization("555", wrong_key, "hits") == "0:application_key_invalid"


def test_fifty_identical_requests_make_one_backend_call(r, renewer_for):
    from xcflushd_sim.server import Simulator

    with Simulator(DEMO_CONFIG, latency=0.5).start() as slow:
        renewer_for(slow.url)
        answers = []
        barrier = threading.Barrier(50)

        def ask():
            gateway = Gateway(redislib.Redis(port=r.connection_pool.connection_kwargs["port"], decode_responses=True))
            barrier.wait()
            answers.append(gateway.priority_authorization("555", A1, "hits"))

        threads = [threading.Thread(target=ask) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert answers == ["1"] * 50
        assert slow.backend.calls()["authorize"] == 1


def test_malformed_messages_are_skipped_and_the_listener_keeps_answering(sim, r, renewer_for):
    renewer = renewer_for(sim.url)
    for junk in ["", "garbage", "service_id:1", "metric:hits", "service_id:555,metric:hits", "\udcff\udcfe",
                 "service_id:555,app_id:a1b2c3,metric:"]:
        r.publish("xc_channel_auth_requests", junk)
    r.execute_command("PUBLISH", "xc_channel_auth_requests", b"\xff\xfe\x00binary")
    assert Gateway(r).priority_authorization("555", A1, "hits") == "1"
    assert renewer.alive()


def test_listener_resubscribes_after_redis_restarts(sim, renewer_for):


    own = RedisServer()
    try:
        renewer = renewer_for(sim.url, redis_url=own.url)
        own.restart()
        deadline = time.monotonic() + 15
        client = redislib.Redis(port=own.port, decode_responses=True)
        answer = None
        while time.monotonic() < deadline and answer is None:
            time.sleep(0.2)
            if renewer.subscribed.is_set():
                answer = Gateway(client, priority_timeout=1.0).priority_authorization("555", A1, "hits")
        assert answer == "1"
    finally:
        own.close()


def test_backend_failure_sends_no_answer(sim, r, renewer_for):
    renewer_for(sim.url)
    sim.backend.set_faults({"rate": 1.0, "kinds": ["500"], "endpoints": ["authorize"]})
    assert Gateway(r, priority_timeout=1.0).priority_authorization("555", A1, "hits") is None
    assert r.exists(auth_key("555", A1)) == 0


def test_a_flood_of_failing_requests_logs_a_few_lines_not_one_each(sim, r, renewer_for, caplog):
    renewer_for(sim.url)
    gateway = Gateway(r, priority_timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="xcflushd.renewer"):
        for i in range(30):  # a service the backend does not know: no answer, a warning
            assert gateway.priority_authorization("9999", Credentials({"app_id": f"x{i}"}), "hits") is None
    failed = [rec for rec in caplog.records if "priority authorize" in rec.getMessage()]
    assert 1 <= len(failed) <= 10


def test_an_unreadable_answer_fails_one_call_and_the_same_request_is_answered_after(r, renewer_for, caplog):
    max_value = [lambda _app: HUGE]
    server = StatusServer(max_value)
    try:
        renewer = renewer_for(server.url)
        gateway = Gateway(r, priority_timeout=1.0)
        with caplog.at_level(logging.WARNING, logger="xcflushd"):
            assert gateway.priority_authorization("555", A1, "hits") is None
        max_value[0] = lambda _app: b"1000"  # the backend recovers: the same (service, credentials, metric)
        assert Gateway(r, priority_timeout=5.0).priority_authorization("555", A1, "hits") == "1"
        assert renewer._in_flight == {}
        failed = [rec.getMessage() for rec in caplog.records if "priority authorize" in rec.getMessage()]
        assert len(failed) == 1 and "malformed usage_report" in failed[0], failed
    finally:
        server.close()


def test_a_priority_request_is_answered_over_a_unix_socket(sim, r, redis_server, renewer_for):
    """Keepalive is a TCP option: set on a unix socket's connection, every connection failed."""
    renewer_for(sim.url, redis_url=redis_server.unix_url)
    assert Gateway(r).priority_authorization("555", A1, "hits") == "1"


def test_the_listeners_connection_finds_a_silent_redis_by_tcp_keepalive(redis_server):
    """Set by us, not left to redis-py's default: it has keepalive only since 8.0 (measured: 7.2 had
    none), and no TCP_USER_TIMEOUT, without which the health check's unanswered PING kept a silent
    Redis's connection open for the kernel's ~15 min of retransmissions."""
    import socket

    from xcflushd.storage import connect

    pubsub = connect(redis_server.url).pubsub()
    try:
        pubsub.subscribe("xc_channel_auth_requests")
        sock = pubsub.connection._sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert [sock.getsockopt(socket.IPPROTO_TCP, option) for option in
                (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)] == \
            [30, 5, 3, 45_000]
    finally:
        pubsub.close()
