"""Test support shared by every test directory: a throw-away redis-server, the
demo backend configuration, the daemon as a real process, and a gateway's
steady stream of priority requests.

Imported as ``xcftest`` (a name no other directory uses: each test directory
has its own conftest.py, so ``from conftest import ...`` is ambiguous).
"""

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import redis

# Below the kernel's ephemeral range (32768-60999 by default): a server that binds port 0, in
# this or another test worker, cannot be handed a port chosen here before its owner binds it.
_CHOSEN_PORTS = range(20000, 32768)


def free_port() -> int:
    for _ in range(100):
        port = random.choice(_CHOSEN_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32767")


class RedisServer:
    """A throw-away redis-server; restartable, with persistence when asked."""

    def __init__(self, persistent: bool = False, port: int = 0):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="xcf-redis-")
        self.persistent = persistent
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        """The same server on its unix socket, as a gateway node's Redis may be reached."""
        return f"unix://{self.dir}/redis.sock"

    def start(self):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not installed: run `make deps` (the Makefile installs it)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else \
            ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--unixsocket", os.path.join(self.dir, "redis.sock"), "--unixsocketperm", "700",
             "--daemonize", "no", "--loglevel", "warning", *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start (port {self.port} taken?)")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self):
        self.stop()
        self.start()

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


DEMO_CONFIG = {
    "provider_key": "pk-test",
    "services": [
        {"id": "555", "default": True, "backend_version": "2", "tokens": ["st-555"],
         "metrics": {"hits": None, "search": "hits", "update": "hits", "other": None},
         "plans": {"basic": {"hits": {"day": 1000, "month": 20000}, "search": {"minute": 10}},
                   "tiny": {"hits": {"eternity": 2}}, "free": {}},
         "applications": [
             {"app_id": "a1b2c3", "app_keys": ["s3cr3t"], "plan": "basic"},
             {"app_id": "a:i,1", "app_keys": ["k:e,y"], "plan": "basic"},
             {"app_id": "small", "plan": "tiny"},
             {"app_id": "free1", "plan": "free"},
             {"app_id": "free2", "plan": "free"},
             {"app_id": "free3", "plan": "free"},
         ]},
        {"id": "777", "backend_version": "1",
         "metrics": {"hits": None},
         "plans": {"free": {}},
         "applications": [{"app_id": "uk-app", "user_key": "uk:1", "plan": "free"}]},
    ],
}


class DaemonProcess:
    """``xcflushd`` as a real process, output captured to a file."""

    def __init__(self, args, env=None, cwd=None, wrapper=()):
        self.log_path = tempfile.mktemp(prefix="xcf-daemon-", suffix=".log")
        self.log = open(self.log_path, "w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
        # /metrics on a free port: the default (9422) would collide between daemons run at once.
        full_env["XCFLUSHD_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
        full_env.update(env or {})
        self.metrics_address = full_env.get("XCFLUSHD_METRICS_LISTEN")
        full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset it
        # wrapper: a command that runs the daemon (e.g. unshare); proc is then the wrapper's process.
        self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", "xcflushd", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=cwd)

    def output(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen in daemon output:\n{self.output()[-3000:]}")

    def stop(self, sig=15, timeout=20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def wait_until(predicate, timeout: float, what: str = "condition", interval: float = 0.1):
    """Poll ``predicate`` until it returns something true, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Stream:
    """A gateway's distinct priority requests (unknown apps: each answer is a denial, each a backend call),
    a few at a time, until stopped; ``answers`` in the order asked."""

    def __init__(self, r, workers: int = 3):
        self.gateway = _gateway(r)
        self.answers = []   # in the order answered
        self.asked = []     # (monotonic time asked, answer)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._ask, args=(w,)) for w in range(workers)]

    def _ask(self, worker: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            asked = time.monotonic()
            answer = self.gateway.priority_authorization("555", self.credentials(f"w{worker}-{n}"), "hits")
            with self.lock:
                self.answers.append(answer)
                self.asked.append((asked, answer))

    @staticmethod
    def credentials(app_id: str):
        from xcflushd.keys import Credentials

        return Credentials({"app_id": app_id})

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(10)


def _gateway(r):
    from xcflushd_sim.gateway import Gateway

    return Gateway(r)
