"""Secrets never show: not in the logs at any level, not in exception messages
(they are logged), not in ``ps``, not in the systemd STATUS; app keys and
user keys only as a short prefix.

The daemon runs against a password-protected redis-server with a provider key
and a service token that the simulator partly refuses (its error messages
quote the refused key), while applications with long keys are reported,
refused and asked about on the priority path.
"""

import copy
import shutil
import subprocess
import time

import pytest
import redis
from chaoslib import wait_until
from xcftest import DEMO_CONFIG, free_port

from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

PROVIDER_KEY = "pk-SECRET-provider-0001"
BAD_TOKEN = "st-SECRET-token-0002"          # the simulator expects st-555: refused, and quoted
REDIS_PASSWORD = "redis-SECRET-pass-0003"
WRONG_PASSWORD = "redis-SECRET-wrong-0004"
APP_KEY = "appkey-SECRET-0005"
USER_KEY = "userkey-SECRET-0006"
SECRETS = (PROVIDER_KEY, BAD_TOKEN, REDIS_PASSWORD, WRONG_PASSWORD, APP_KEY, USER_KEY)


@pytest.fixture
def protected_redis(tmp_path):
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", REDIS_PASSWORD],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=REDIS_PASSWORD, decode_responses=True)
    wait_until(lambda: _pings(client), 10, what="redis-server")
    yield port, client
    proc.terminate()
    proc.wait(10)


def _pings(client):
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_secrets_never_show(tmp_path, protected_redis, daemon_process):
    from lab.notifysock import NotifyListener

    port, client = protected_redis
    config = copy.deepcopy(DEMO_CONFIG)
    config["provider_key"] = PROVIDER_KEY
    config["services"][0]["applications"].append({"app_id": "long-key", "app_keys": [APP_KEY], "plan": "free"})
    config["services"][1]["applications"].append({"app_id": "long-uk", "user_key": USER_KEY, "plan": "free"})
    for name, text in (("pk", PROVIDER_KEY), ("tokens", f"555={BAD_TOKEN}\n"), ("pw", REDIS_PASSWORD),
                       ("wrong", WRONG_PASSWORD)):
        (tmp_path / name).write_text(text + "\n")
    listener = NotifyListener(tmp_path / "notify.sock")
    with_key = Credentials({"app_id": "long-key", "app_key": APP_KEY})
    with_uk = Credentials({"user_key": USER_KEY})
    with Simulator(config, faults={"rate": 0.5, "kinds": ["500", "empty_4xx"], "seed": 7}) as sim:
        common = ["--redis", f"127.0.0.1:{port}", "--backend", sim.url, "--provider-key-file", str(tmp_path / "pk"),
                  "--service-tokens-file", str(tmp_path / "tokens"), "-c", "/dev/null", "--log-level", "debug",
                  "--report-auth-wait", "0"]
        daemon = daemon_process(["run", *common, "--redis-password-file", str(tmp_path / "pw"), "--frequency", "1",
                                 "--auth-ttl", "2"], env=listener.environ(WATCHDOG_USEC="2000000"))
        daemon.wait_for("ready:")
        gateway = Gateway(client, priority_timeout=1.0)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            gateway.cache_report("555", with_key, "hits", 2)
            gateway.cache_report("777", with_uk, "hits", 1)
            gateway.priority_authorization("555", with_key, "hits")
            gateway.priority_authorization("777", with_uk, "hits")
            listener.poll(0.2)  # drained as systemd does: a full queue blocks the sender
        with open(f"/proc/{daemon.proc.pid}/cmdline", "rb") as fh:
            cmdline = fh.read().decode(errors="replace")
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        stopping = time.monotonic()
        daemon.proc.terminate()  # once: a second SIGTERM means "stop now" (exit 1)
        while daemon.proc.poll() is None and time.monotonic() - stopping < 20:
            listener.poll(0.5)
        assert daemon.stop() == 0, daemon.output()[-2500:]
        wrong = daemon_process(["flush", *common, "--redis-password-file", str(tmp_path / "wrong")])
        wrong.proc.wait(30)
        statuses = [f["STATUS"] for _, f in listener.poll(0.5) if "STATUS" in f]
    listener.close()
    out = daemon.output()
    # The run did meet the secrets: refusals that quote them, failures that name the apps.
    assert "service_token_invalid" in out and "app_key:appk..." in out and "user_key:user..." in out
    assert sim.backend.received().get("777", {}).get("long-uk"), "nothing delivered for the user-key app"
    assert wrong.proc.returncode != 0 and "Traceback" not in wrong.output()
    assert len(statuses) > 2
    for secret in SECRETS:
        for where, text in (("log", out), ("log of the wrong-password run", wrong.output()), ("cmdline", cmdline),
                            ("ps", ps), ("STATUS", "\n".join(statuses))):
            assert secret not in text, f"{secret} in the {where}"
