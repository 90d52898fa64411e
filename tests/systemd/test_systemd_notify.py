"""xcflushd.notify.Notifier against a real AF_UNIX datagram NOTIFY_SOCKET."""

import logging
import os
import socket
import time

import pytest

from xcflushd.notify import Notifier


def test_without_notify_socket_everything_is_a_silent_no_op(caplog):
    caplog.set_level(logging.DEBUG)
    n = Notifier({"WATCHDOG_USEC": "4000000"})
    assert n.enabled is False
    assert n.watchdog_interval is None
    n.ready("ready")
    n.status("status")
    n.watchdog()
    n.stopping("bye")
    n.extend_timeout(5)
    assert caplog.records == []


def test_each_call_sends_its_datagram(notify_socket):
    n = Notifier(notify_socket.environ())
    assert n.enabled is True
    n.ready("waiting for nothing")
    n.status("last flush 12:00:00, 3 apps")
    n.watchdog()
    n.extend_timeout(7.5)
    n.stopping("finishing the flush")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading("reloading")
    got = [fields for _, fields in notify_socket.poll(0.2)]
    reloading = got.pop()
    assert before <= int(reloading.pop("MONOTONIC_USEC")) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading == {"RELOADING": "1", "STATUS": "reloading"}
    assert got == [
        {"READY": "1", "STATUS": "waiting for nothing"},
        {"STATUS": "last flush 12:00:00, 3 apps"},
        {"WATCHDOG": "1"},
        {"EXTEND_TIMEOUT_USEC": "7500000"},
        {"STOPPING": "1", "STATUS": "finishing the flush"},
    ]


def test_status_is_one_line_utf8(notify_socket):
    n = Notifier(notify_socket.environ())
    n.status("line one\nline two\r\n  ünïcode ✓\n")
    raw = notify_socket.sock.recv(4096)
    assert raw == "STATUS=line one line two   ünïcode ✓".encode()
    assert b"\n" not in raw


def test_abstract_namespace_socket():
    name = f"xcflushd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        sock.settimeout(2)
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "4000000"}, 2.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(notify_socket, env, expected):
    assert Notifier(notify_socket.environ(**env)).watchdog_interval == expected


def test_watchdog_interval_none_without_socket():
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval is None


def test_a_vanished_socket_never_raises_and_is_logged_once(tmp_path, caplog):
    path = tmp_path / "gone.sock"
    n = Notifier({"NOTIFY_SOCKET": str(path)})  # nobody listens there
    with caplog.at_level(logging.DEBUG, logger="xcflushd.notify"):
        for _ in range(3):
            n.ready("r")
            n.status("s")
            n.watchdog()
            n.stopping("x")
            n.extend_timeout(1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "READY=1" in warnings[0].getMessage()


def test_reconnects_when_the_socket_is_recreated(tmp_path):
    """systemd re-creates its notify socket on daemon-reexec; pings must survive that."""
    path = str(tmp_path / "n.sock")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    n = Notifier({"NOTIFY_SOCKET": path})
    n.watchdog()
    assert first.recv(100) == b"WATCHDOG=1"
    first.close()
    os.unlink(path)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(path)
    try:
        n.watchdog()
        second.settimeout(2)
        assert second.recv(100) == b"WATCHDOG=1"
    finally:
        second.close()


def test_extend_timeout_rejects_nonsense_quietly(notify_socket):
    n = Notifier(notify_socket.environ())
    n.extend_timeout(float("nan"))
    n.extend_timeout(-3)
    got = [fields for _, fields in notify_socket.poll(0.2)]
    assert got == [{"EXTEND_TIMEOUT_USEC": "0"}]


def test_a_listener_that_stops_reading_never_blocks_the_daemon(tmp_path):
    """A full datagram queue drops notifications instead of blocking the caller (e.g. a graceful stop)."""
    import threading

    path = str(tmp_path / "deaf.sock")
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(path)  # bound, never read
    n = Notifier({"NOTIFY_SOCKET": path})
    sender = threading.Thread(target=lambda: [n.status(f"status {i}") for i in range(500)], daemon=True)
    try:
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "a notification blocked on a full queue"
        assert deaf.recv(100) == b"STATUS=status 0"  # the first ones went through
    finally:
        deaf.close()
