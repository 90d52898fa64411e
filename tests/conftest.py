"""Shared fixtures: a real redis-server on a free loopback port, the backend
simulator over real HTTP, and a way to run the daemon as a real process.
The classes behind them live in xcftest.py."""

import os
import threading

import pytest
from xcftest import DEMO_CONFIG, DaemonProcess, RedisServer

__all__ = ["DEMO_CONFIG", "DaemonProcess", "RedisServer"]


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def r(redis_server):
    """A client on a clean database."""
    from xcflushd.storage import connect

    client = connect(redis_server.url)  # strings round-trip any bytes, as the daemon's
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def sim():
    from xcflushd_sim.server import Simulator

    simulator = Simulator(DEMO_CONFIG).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def daemon_process():
    started = []

    def start(args, env=None, wrapper=()):
        proc = DaemonProcess(args, env, wrapper=wrapper)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        os.unlink(proc.log_path)


# The heavy tests `make check` leaves out (measured: each takes seconds or starts a heavy
# component). A test can also say so itself with @pytest.mark.slow; this table covers whole
# directories and files, and tests written before the fast tier existed.
SLOW = (
    "tests/deploy/",                                   # Ansible: lint and nspawn rollouts
    "tests/reliability/test_chaos.py",                 # the fault-injection run (minutes)
    "tests/reliability/test_hostile_pubsub.py",        # message storms (10-20 s each)
    "tests/reliability/test_secrets.py",               # daemons under every log level
    "tests/reliability/test_ack_window.py::test_redis_stall",
    "tests/signing/test_signing_image.py",             # debootstrap + image builds
    "tests/systemd/test_systemd_protocol.py::test_watchdog",
    "tests/systemd/test_systemd_protocol.py::test_healthy_control",
    "tests/systemd/test_systemd_protocol.py::test_a_wedged_thread",
    "tests/systemd/test_systemd_protocol.py::test_status_tracks",
    "tests/systemd/test_systemd_protocol.py::test_ready_only_once",
    "tests/test_renewer.py::test_a_flood_of_failing_requests",
)


def pytest_collection_modifyitems(config, items):
    root = str(config.rootpath)
    for item in items:
        nodeid = os.path.relpath(str(item.path), root) + item.nodeid[len(item.nodeid.split("::")[0]):]
        if nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def renewer_for(redis_server):
    """Start a PriorityRenewer against a backend URL; stopped and closed at teardown."""
    from xcflushd.backend import ServiceCredentials, make_client
    from xcflushd.renewer import PriorityRenewer
    from xcflushd.storage import Storage, connect

    started = []

    def start(backend_url, redis_url=None, connect_timeout=2.0, **transport_options):
        client = connect(redis_url or redis_server.url)
        backend = make_client(backend_url, ServiceCredentials("pk-test"), connect_timeout, 5, **transport_options)
        stop = threading.Event()
        renewer = PriorityRenewer(client, Storage(client), backend, 600, stop).start()
        assert renewer.subscribed.wait(5)
        started.append((renewer, stop, backend))
        return renewer

    yield start
    for renewer, stop, backend in started:
        stop.set()
        renewer.join(5)
        backend.close()


def _printable(text):
    # The daemon logs undecodable bytes as surrogates (surrogateescape); a worker of
    # pytest-xdist must send captured output as UTF-8, so escape them visibly.
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.sections = [(_printable(name), _printable(body)) for name, body in report.sections]
    if isinstance(report.longrepr, str):
        report.longrepr = _printable(report.longrepr)
