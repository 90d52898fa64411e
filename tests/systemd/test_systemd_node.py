"""xcflushd.service under a real systemd: a booted nspawn node with Redis and the backend simulator.

One node for the module (boot ~1 s, wheel install ~10 s), set up the way
systemd/README.md tells an operator to: the venv in /opt/xcflushd, the
sysusers/tmpfiles snippets, the unit unchanged, /etc/xcflushd/xcflushd.conf and
only ONE credential (the provider key) in /etc/credstore. A drop-in changes
only timing: WatchdogSec=3s and RestartSec=1s, so a watchdog kill takes seconds.
"""

import json
import re
import textwrap
import time
from pathlib import Path

import pytest
from lab import nspawn
from lab.wheels import VENV_INSTALL, build_wheels
from xcftest import wait_until

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SIM_PORT = 8081
WATCHDOG_SEC = 3
PY = "/opt/xcflushd/bin/python"

CONFIG = f"""\
# written by tests/systemd/test_systemd_node.py
redis = 127.0.0.1:6379
backend = http://127.0.0.1:{SIM_PORT}
no-secure = true
frequency = 2
auth-ttl = 60
report-auth-wait = 0
"""

DROP_IN = f"""\
[Service]
WatchdogSec={WATCHDOG_SEC}s
RestartSec=1s
"""


@pytest.fixture(scope="module")
def node(lab_root, tmp_path_factory):
    wheels = build_wheels(REPO, tmp_path_factory.mktemp("wheels"), root=lab_root)
    # The simulator is no part of the release: it runs from its source (it needs only the stdlib).
    with nspawn.Node(lab_root, binds_ro=[f"{wheels}:/wheels", f"{REPO / 'sim'}:/sim"]) as node:
        node.run(["sh", "-c", VENV_INSTALL, "-", "/opt/xcflushd"], timeout=300)
        systemd = REPO / "systemd"
        node.put_tree({
            "/usr/lib/sysusers.d/xcflushd.conf": ((systemd / "xcflushd.sysusers").read_bytes(), 0o644),
            "/usr/lib/tmpfiles.d/xcflushd.conf": ((systemd / "xcflushd.tmpfiles").read_bytes(), 0o644),
            "/etc/systemd/system/xcflushd.service": ((systemd / "xcflushd.service").read_bytes(), 0o644),
            "/etc/systemd/system/xcflushd.service.d/10-lab-timing.conf": (DROP_IN.encode(), 0o644),
        })
        node.run(["systemd-sysusers", "xcflushd.conf"])
        node.run(["systemd-tmpfiles", "--create", "xcflushd.conf"])
        node.write("/etc/xcflushd/xcflushd.conf", CONFIG)
        node.write("/etc/credstore/xcflushd.provider_key", "pk-demo\n", mode=0o600)
        node.run(["systemd-run", "--unit=backend-sim", "--property=Type=exec", "--setenv=PYTHONPATH=/sim",
                  PY, "-m", "xcflushd_sim.cli", "--listen", f"127.0.0.1:{SIM_PORT}", "--demo-apps", "4"])
        node.systemctl("daemon-reload")
        wait_until(lambda: sim_state(node, check=False), 20, "the backend simulator")
        yield node
        print(node.journal("xcflushd.service")[-5000:])  # shown when a test failed


def sim_state(node, check=True):
    proc = node.run([PY, "-c", "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
                     f"'http://127.0.0.1:{SIM_PORT}/_sim/state', timeout=2).read().decode())"],
                    check=check)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def props(node, *names):
    return node.show("xcflushd.service", *names)


def ensure_running(node):
    if props(node, "ActiveState")["ActiveState"] != "active":
        node.systemctl("reset-failed", "xcflushd.service", check=False)
        node.systemctl("start", "xcflushd.service", timeout=120)


def test_start_returns_only_after_ready(node):
    """While Redis is down the start job waits (activating, STATUS says why); READY completes it."""
    node.systemctl("stop", "redis-server.service")
    try:
        node.systemctl("start", "--no-block", "xcflushd.service")
        waiting = wait_until(lambda: "waiting for Redis" in props(node, "StatusText")["StatusText"], 20,
                             "STATUS 'waiting for Redis'")
        assert waiting
        time.sleep(2)
        state = props(node, "ActiveState", "SubState", "Job", "StatusText")
        assert (state["ActiveState"], state["SubState"]) == ("activating", "start"), state
    finally:
        node.systemctl("start", "redis-server.service")
    started = time.monotonic()
    node.systemctl("start", "xcflushd.service", timeout=120)  # joins the pending start job
    state = props(node, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert time.monotonic() - started < 30
    assert "waiting" not in state["StatusText"]
    assert state["NRestarts"] == "0"  # waited, was not restarted


def test_a_fresh_start_blocks_until_ready_then_status_shows_the_flush_line(node):
    ensure_running(node)
    node.systemctl("stop", "xcflushd.service")
    node.systemctl("start", "xcflushd.service", timeout=120)
    assert props(node, "ActiveState")["ActiveState"] == "active"
    # usage cached by "the gateway" is reported within a cycle or two
    node.run([PY, "-c", textwrap.dedent("""
        import sys
        sys.path.insert(0, "/sim")  # the simulator's source, bound read-only
        import redis
        from xcflushd.keys import Credentials
        from xcflushd_sim.gateway import Gateway
        creds = Credentials({"app_id": "app-0", "app_key": "key-0"})
        Gateway(redis.Redis(host="localhost")).cache_report("1001", creds, "hits", 5)
    """)])
    status = wait_until(lambda: re.search(r"last flush \S+: ([1-9]\d*) apps reported, 0 failed",
                                          props(node, "StatusText")["StatusText"]), 20, "a flush that reported",
                        interval=0.1)
    assert status
    text = node.systemctl("status", "xcflushd.service", check=False).stdout
    assert re.search(r'Status: "last flush \S+: \d+ apps reported, 0 failed, [\d.]+s; next flush \S+"', text), text
    received = sim_state(node)["received"]
    assert "5" in json.dumps(received) and "app-0" in json.dumps(received), received


def test_runs_unprivileged_hardened_with_only_the_credentials_it_was_given(node):
    ensure_running(node)
    pid = props(node, "MainPID")["MainPID"]
    status = dict(line.split(":", 1) for line in node.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines())
    assert status["CapEff"].strip() == "0000000000000000"
    assert status["CapBnd"].strip() == "0000000000000000"
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert node.run(["ps", "-o", "user=", "-p", pid]).stdout.strip() == "xcflushd"
    creds = node.run(["ls", "/run/credentials/xcflushd.service"]).stdout.split()
    assert creds == ["provider_key"]  # service_tokens and redis_password absent: started anyway
    environ = node.run(["cat", f"/proc/{pid}/environ"]).stdout
    cmdline = node.run(["cat", f"/proc/{pid}/cmdline"]).stdout
    assert "pk-demo" not in environ and "pk-demo" not in cmdline
    exposure = node.run(["systemd-analyze", "security", "xcflushd.service"]).stdout
    assert float(re.search(r"Overall exposure level for xcflushd.service: (\d+\.\d+)", exposure).group(1)) <= 2.0
    journal = node.journal("xcflushd.service")
    assert "pk-demo" not in journal


def test_reload_keeps_the_main_pid_and_applies_the_new_config(node):
    ensure_running(node)
    before = props(node, "MainPID", "NRestarts")
    node.write("/etc/xcflushd/xcflushd.conf", CONFIG.replace("auth-ttl = 60", "auth-ttl = 61"))
    try:
        node.systemctl("reload", "xcflushd.service", timeout=60)
        wait_until(lambda: "auth_ttl=61s" in node.journal("xcflushd.service", "-n", "20"), 20, "the reload's line")
        state = props(node, "MainPID", "NRestarts", "ActiveState", "SubState")
        assert state == {**before, "ActiveState": "active", "SubState": "running"}, state
    finally:
        node.write("/etc/xcflushd/xcflushd.conf", CONFIG)


def test_stop_is_clean(node):
    ensure_running(node)
    started = time.monotonic()
    node.systemctl("stop", "xcflushd.service", timeout=60)
    took = time.monotonic() - started
    state = props(node, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, state
    assert took < 10
    journal = node.journal("xcflushd.service", "-n", "8")
    assert "SIGTERM received: stopping" in journal and "INFO xcflushd.daemon: stopped" in journal
    assert "xcflushd.service: Deactivated successfully." in journal  # exit 0, no signal, no timeout
    assert "SIGKILL" not in journal and "timed out" not in journal


def test_a_sigstopped_daemon_is_killed_by_the_watchdog_and_restarted(node):
    ensure_running(node)
    before = props(node, "MainPID", "NRestarts")
    node.run(["kill", "-STOP", before["MainPID"]])
    frozen = time.monotonic()
    after = wait_until(lambda: (lambda p: p if p["MainPID"] not in ("0", before["MainPID"])
                                and p["ActiveState"] == "active" else None)(
        props(node, "MainPID", "NRestarts", "ActiveState", "SubState")), 30, "a restarted daemon")
    took = time.monotonic() - frozen
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert WATCHDOG_SEC - 1 < took < WATCHDOG_SEC + 15
    journal = node.journal("xcflushd.service", "-n", "500")  # stack dumps of every thread come first
    assert "Watchdog timeout" in journal
    assert f"Killing process {before['MainPID']} (xcflushd) with signal SIGABRT" in journal
    assert "Failed with result 'watchdog'" in journal
    assert node.run(["kill", "-0", before["MainPID"]], check=False).returncode != 0  # the old one is gone


def test_redis_over_a_unix_socket_with_the_readme_drop_in(node):
    """AF_UNIX to Redis works under ProtectSystem=strict once the unit joins the socket's group."""
    node.sh("cp /etc/redis/redis.conf /etc/redis/redis.conf.lab && "
            "printf 'unixsocket /run/redis/redis-server.sock\\nunixsocketperm 770\\n' >> /etc/redis/redis.conf")
    node.write("/etc/systemd/system/xcflushd.service.d/20-lab-unix.conf", "[Service]\nSupplementaryGroups=redis\n")
    node.write("/etc/xcflushd/xcflushd.conf",
               CONFIG.replace("redis = 127.0.0.1:6379", "redis = unix:///run/redis/redis-server.sock"))
    try:
        node.systemctl("restart", "redis-server.service")
        node.systemctl("daemon-reload")
        node.systemctl("restart", "xcflushd.service", timeout=120)
        status = wait_until(lambda: re.search(r"last flush \S+: \d+ apps reported, 0 failed",
                                              props(node, "StatusText")["StatusText"]), 20, "a flush over the socket")
        assert status
        assert "redis=unix:///run/redis/redis-server.sock" in node.journal("xcflushd.service", "-n", "30")
    finally:
        node.sh("mv /etc/redis/redis.conf.lab /etc/redis/redis.conf && "
                "rm /etc/systemd/system/xcflushd.service.d/20-lab-unix.conf")
        node.write("/etc/xcflushd/xcflushd.conf", CONFIG)
        node.systemctl("restart", "redis-server.service")
        node.systemctl("daemon-reload")
