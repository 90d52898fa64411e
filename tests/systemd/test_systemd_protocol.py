"""The daemon's sd_notify conversation, heard on a real NOTIFY_SOCKET (no systemd needed).

Each test runs ``xcflushd run`` as a process with ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC=2000000`` (a ping is due every second, and systemd would act
after 2 s of silence), a real redis-server, and a backend URL.

Why not a shorter watchdog: the daemon's threads prove life by a heartbeat
that moves about once a second when idle, so a WatchdogSec under ~2 s would
starve a healthy daemon now and then (seen with 1 s: one 1.0 s gap in eight).
"""

import re
import signal
import time

import pytest
from xcftest import free_port

WATCHDOG_USEC = 2_000_000
WATCHDOG_SEC = WATCHDOG_USEC / 1e6


def closed_backend() -> str:
    """A backend that refuses connections: an outage from the first cycle."""
    return f"http://127.0.0.1:{free_port()}"


def pings(listener, since: float = 0.0, until: float = float("inf")) -> list:
    return [t for t, fields in listener.received if fields.get("WATCHDOG") == "1" and since <= t <= until]


def statuses(listener) -> list:
    return [fields["STATUS"] for _, fields in listener.received if "STATUS" in fields]


def ready_at(listener) -> float:
    return next(t for t, fields in listener.received if fields.get("READY") == "1")


def test_ready_only_once_redis_answers(notify_socket, redis_later, start_daemon):
    daemon = start_daemon(redis_later.address, closed_backend())
    waiting = daemon.expect(notify_socket, "STATUS")
    assert "waiting for Redis" in waiting["STATUS"]
    notify_socket.poll(2.0)  # two seconds with no Redis: no READY, no watchdog pings yet
    assert all("READY" not in fields for _, fields in notify_socket.received)
    assert daemon.proc.poll() is None
    redis_up_at = time.monotonic()
    redis_later.start()
    daemon.expect(notify_socket, "READY", "1")
    assert ready_at(notify_socket) > redis_up_at
    assert not pings(notify_socket, until=ready_at(notify_socket))


def test_watchdog_paced_at_half_watchdog_usec(notify_socket, redis_up, start_daemon):
    daemon = start_daemon(redis_up.address, closed_backend())
    daemon.expect(notify_socket, "READY", "1")
    begin = time.monotonic()
    notify_socket.poll(3 * WATCHDOG_SEC)
    times = pings(notify_socket, since=begin)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # one ping every WATCHDOG_SEC/2: 6 in 3 intervals; never a silence systemd would punish
    assert 5 <= len(times) <= 7, times
    assert max(gaps) < WATCHDOG_SEC, gaps


def test_status_tracks_flush_cycles_and_a_backend_outage_does_not_starve_the_watchdog(
        notify_socket, redis_up, start_daemon):
    import redis

    from xcflushd.keys import Credentials
    from xcflushd_sim.gateway import Gateway

    client = redis.Redis(port=redis_up.port, decode_responses=True)
    Gateway(client).cache_report("1001", Credentials({"app_id": "app-0", "app_key": "key-0"}), "hits", 3)
    daemon = start_daemon(redis_up.address, closed_backend(), frequency=1, args=("--report-auth-wait", "0"))
    daemon.expect(notify_socket, "READY", "1")
    begin = time.monotonic()
    notify_socket.poll(2.5 * WATCHDOG_SEC)
    flushes = [s for s in statuses(notify_socket) if s.startswith("last flush")]
    assert len(set(flushes)) >= 2, statuses(notify_socket)  # STATUS moves with every cycle
    assert "next flush" in flushes[-1]
    assert " 0 failed" not in flushes[-1]  # the unreachable backend shows as failures
    times = pings(notify_socket, since=begin)
    assert max(b - a for a, b in zip(times, times[1:])) < WATCHDOG_SEC  # still alive, still pinging
    assert daemon.proc.poll() is None
    client.close()


def test_sigterm_sends_stopping_and_exits_cleanly(notify_socket, redis_up, start_daemon):
    daemon = start_daemon(redis_up.address, closed_backend())
    daemon.expect(notify_socket, "READY", "1")
    notify_socket.poll(1.0)
    sent = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    stopping = daemon.expect(notify_socket, "STOPPING", "1", timeout=10)
    assert stopping.get("STATUS", "").startswith("stopping")
    assert daemon.proc.wait(15) == 0
    assert time.monotonic() - sent < 10
    assert "stopped" in daemon.output()


@pytest.mark.parametrize("thread", ["scheduler", "listener", "engine"])
def test_a_wedged_thread_starves_the_watchdog(notify_socket, redis_up, start_daemon, thread):
    daemon = start_daemon(redis_up.address, closed_backend(), wedge=thread)  # tests/systemd/wedge.py
    daemon.expect(notify_socket, "READY", "1")
    notify_socket.poll(1.5 * WATCHDOG_SEC)  # the first cycle, then the wedge, then the window runs out
    quiet_from = time.monotonic()
    notify_socket.poll(WATCHDOG_SEC)
    assert pings(notify_socket, since=quiet_from) == []  # systemd would have killed it by now
    assert daemon.proc.poll() is None  # wedged, not dead: only the watchdog can tell


def test_healthy_control_for_the_wedge_test(notify_socket, redis_up, start_daemon):
    """Same timing without the hook: pings keep coming (so the test above measures the wedge)."""
    daemon = start_daemon(redis_up.address, closed_backend())
    daemon.expect(notify_socket, "READY", "1")
    notify_socket.poll(1.5 * WATCHDOG_SEC)
    quiet_from = time.monotonic()
    notify_socket.poll(WATCHDOG_SEC)
    assert len(pings(notify_socket, since=quiet_from)) >= 1


def test_status_says_stale_authorizations_are_served_in_a_backend_outage(notify_socket, redis_up, start_daemon):
    import redis

    from xcflushd.keys import Credentials, auth_key
    from xcflushd_sim.gateway import Gateway

    client = redis.Redis(port=redis_up.port, decode_responses=True)
    app = Credentials({"app_id": "app-0", "app_key": "key-0"})
    client.hset(auth_key("1001", app), "hits", "1")  # cached before the backend went away
    client.expire(auth_key("1001", app), 60)
    Gateway(client).cache_report("1001", app, "hits", 3)
    daemon = start_daemon(redis_up.address, closed_backend(), frequency=1,
                          args=("--report-auth-wait", "0", "--backend-outage", "resilient", "--max-stale", "120"))
    daemon.expect(notify_socket, "READY", "1")
    deadline = time.monotonic() + 10
    while not any("BACKEND OUTAGE" in s for s in statuses(notify_socket)) and time.monotonic() < deadline:
        notify_socket.poll(0.5)
    line = next((s for s in statuses(notify_socket) if "BACKEND OUTAGE" in s), statuses(notify_socket))
    assert "serving 1 stale authorization(s) until " in line and "(--backend-outage resilient)" in line, line
    client.close()


def _seconds(clock: str) -> int:
    hours, minutes, seconds = (int(part) for part in clock.rstrip("Z").split(":"))
    return 3600 * hours + 60 * minutes + seconds


def test_status_names_the_next_flush_not_the_last(notify_socket, redis_up, start_daemon):
    # The status is written when a cycle ends; the next cycle's time must be known by then
    # (it was "-" after the first cycle, then the time of the cycle that had just run).
    daemon = start_daemon(redis_up.address, closed_backend(), frequency=40)
    daemon.expect(notify_socket, "READY", "1")
    for _ in range(60):  # the first cycle is immediate; its connection refused at once
        flushes = [s for s in statuses(notify_socket) if s.startswith("last flush")]
        if flushes:
            break
        notify_socket.poll(0.5)
    assert flushes, statuses(notify_socket)
    status = flushes[0]
    match = re.search(r"^last flush (\d\d:\d\d:\d\dZ): .*; next flush (\S+)$", status)
    assert match, status
    last, following = match.groups()
    assert following != "-", status
    # One frequency later (minus the cycle's own time; modulo midnight).
    assert 30 <= (_seconds(following) - _seconds(last)) % 86400 <= 40, status
