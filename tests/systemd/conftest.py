"""Fixtures for the systemd tests: the unit files, a notify socket, the nspawn lab."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "xcflushd.service"

if str(TESTS) not in sys.path:  # makes `lab` (tests/lab) importable
    sys.path.insert(0, str(TESTS))

from lab.notifysock import NotifyListener  # noqa: E402
from lab.units import parse_unit  # noqa: E402
from xcftest import free_port  # noqa: E402


@pytest.fixture(scope="session")
def unit_text() -> str:
    return UNIT.read_text()


@pytest.fixture(scope="session")
def unit(unit_text) -> dict:
    return parse_unit(unit_text)


@pytest.fixture
def notify_socket(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


#: What an xcflushd node needs besides systemd and python3.
NODE_PACKAGES = ("python3-venv", "redis-server", "iproute2", "procps")


@pytest.fixture(scope="session")
def lab_root():
    """A cached bootable Debian root for xcflushd nodes (built on first use, ~1-2 min).

    Skips, saying why, where this machine cannot boot systemd-nspawn containers.
    """
    from lab import nspawn

    return nspawn.root_or_skip(NODE_PACKAGES)


class Redis:
    """A throw-away redis-server on a loopback port chosen up front (start it later or never)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Redis":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not installed: run `make deps`")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_later(tmp_path):
    """A Redis whose port is known but which is not started yet."""
    server = Redis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_up(redis_later):
    return redis_later.start()


class Daemon:
    """``xcflushd run`` as a real process under a test NOTIFY_SOCKET; output in a file."""

    def __init__(self, args, env, log_path: Path, wedge: Optional[str] = None):
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items()
                if k in ("PATH", "LANG", "LC_ALL", "HOME", "PYTHONPATH", "VIRTUAL_ENV")}
        base["XCFLUSHD_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"  # not the default 9422: daemons run at once
        # wedge: a thread made to hang by the test-only wrapper (the daemon has no such hook)
        command = [str(Path(__file__).with_name("wedge.py")), wedge] if wedge else ["-m", "xcflushd"]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, *command, "run", *args], cwd=log_path.parent,
                                         stdout=log, stderr=subprocess.STDOUT, env={**base, **env})

    def output(self) -> str:
        return self.log_path.read_text()

    def expect(self, listener, key: str, value=None, timeout: float = 15.0) -> dict:
        """Wait for a notification; on failure, say what the daemon printed."""
        try:
            return listener.wait_for(key, timeout, value, alive=lambda: self.proc.poll() is None)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon exit {self.proc.poll()}, output:\n"
                                 f"{self.output()[-3000:]}") from None

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_daemon(tmp_path, notify_socket):
    """``start_daemon(redis_address, backend_url, watchdog_usec=..., env=...)`` -> Daemon."""
    started = []
    key_file = tmp_path / "provider_key"
    key_file.write_text("pk-demo\n")

    def start(redis_address: str, backend_url: str, *, watchdog_usec: int = 2_000_000,
              frequency: int = 2, env: Optional[dict] = None, args: tuple = (),
              wedge: Optional[str] = None) -> Daemon:
        args = ["--redis", redis_address, "--backend", backend_url, "--no-secure",
                "--provider-key-file", str(key_file), "--frequency", str(frequency),
                "--auth-ttl", "60", "--backend-connect-timeout", "1", "--backend-read-timeout", "2", *args]
        environment = notify_socket.environ(WATCHDOG_USEC=str(watchdog_usec), **(env or {}))
        daemon = Daemon(args, environment, tmp_path / f"daemon-{len(started)}.log", wedge)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
