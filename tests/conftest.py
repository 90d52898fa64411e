"""Shared fixtures: a real redis-server on a free loopback port, the backend
simulator over real HTTP, and a way to run the daemon as a real process.
The classes behind them live in xcftest.py."""

import os

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
    from xcflushd.sim.server import Simulator

    simulator = Simulator(DEMO_CONFIG).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def daemon_process():
    started = []

    def start(args, env=None):
        proc = DaemonProcess(args, env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        os.unlink(proc.log_path)
