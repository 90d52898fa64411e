"""``make run``: the daemon against a local stack, in the foreground.

Starts a throw-away redis-server on a free loopback port, the backend
simulator with demo applications, and a simulated gateway sending a small
steady load (cached hits and priority authorization requests); then runs
``xcflushd run`` so its flush cycles can be watched. Ctrl-C stops everything
this started, and a last line says what the backend received.
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import redis

from xcflushd.keys import Credentials

from .config import demo_config
from .gateway import Gateway
from .server import Simulator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_credentials(config):
    """(service_id, Credentials) for every application of a simulator config."""
    out = []
    for service in config["services"]:
        for app in service["applications"]:
            if service.get("backend_version") == "1":
                out.append((service["id"], Credentials({"user_key": app["user_key"]})))
            else:
                keys = app.get("app_keys") or []
                fields = {"app_id": app["app_id"], **({"app_key": keys[0]} if keys else {})}
                out.append((service["id"], Credentials(fields)))
    return out


def start_redis(workdir: str):
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
                             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, decode_responses=True)
    for _ in range(250):
        try:
            client.ping()
            return proc, port, client
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


def feed(gateway: Gateway, apps, stop: threading.Event, rate: float):
    rng = random.Random(7)
    metrics = ("hits", "search", "update", "bytes")
    while not stop.wait(1.0 / rate):
        service_id, creds = rng.choice(apps)
        try:
            gateway.request(service_id, creds, rng.choice(metrics), rng.randint(1, 3))
        except redis.RedisError:
            pass


def main() -> int:
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (make deps installs it)", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="xcflushd-run-")
    config = demo_config(20)
    stop = threading.Event()
    redis_proc, port, client = start_redis(workdir)
    sim = Simulator(config, latency=0.005).start()
    gateway = Gateway(client, priority_timeout=3.0)
    feeder = threading.Thread(target=feed, args=(gateway, gateway_credentials(config), stop, 20.0), daemon=True)
    key_file = os.path.join(workdir, "provider_key")
    with open(key_file, "w") as fh:
        fh.write(config["provider_key"])
    print(f"redis-server on 127.0.0.1:{port}, backend simulator on {sim.url}, "
          f"gateway load ~20 requests/s over {len(gateway_credentials(config))} applications. Ctrl-C stops all.",
          flush=True)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "xcflushd", "run", "--redis", f"127.0.0.1:{port}", "--backend", sim.url,
         "--provider-key-file", key_file, "--frequency", "5", "--auth-ttl", "60", "--report-auth-wait", "1",
         "-c", os.devnull],
        env={k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")},
        start_new_session=True)  # Ctrl-C reaches it once, through us
    feeder.start()
    try:
        daemon.wait()
    except KeyboardInterrupt:
        daemon.send_signal(signal.SIGTERM)  # the terminal sent SIGINT to it too; either stops it
        daemon.wait(40)
    finally:
        stop.set()
        feeder.join(5)
        received = sim.backend.received()
        total = sum(v for apps in received.values() for usage in apps.values() for v in usage.values())
        pending = sum(int(v) for key in client.scan_iter(count=1000) if key.startswith(("report,", "to_flush:"))
                      for v in client.hvals(key))
        print(f"gateway cached {sum(gateway.written.values())} hits; backend received {total}; "
              f"{pending} still in Redis for the next flush", flush=True)
        sim.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
