"""SIGHUP reloads the configuration of a running daemon: a real process, redis-server and simulators.

Each test keeps a stream of distinct priority requests going across the
signal and checks outcomes: every request answered, and by which backend.
"""

import signal
import urllib.request

from xcftest import DEMO_CONFIG, Stream, wait_until

from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator


def start(daemon_process, tmp_path, redis_server, backend_url, key="pk-test"):
    key_file = tmp_path / "pk"
    key_file.write_text(key + "\n")
    config = tmp_path / "xcflushd.conf"
    config.write_text(f"backend = {backend_url}\nprovider-key-file = {key_file}\n")
    daemon = daemon_process(["run", "-c", str(config), "--redis", redis_server.address, "--frequency", "60"])
    daemon.wait_for("ready:")
    return daemon, config, key_file


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_a_new_backend_url_is_used_after_sighup_and_no_request_goes_unanswered(
        tmp_path, r, redis_server, sim, daemon_process):
    with Simulator(DEMO_CONFIG).start() as new:
        daemon, config, key_file = start(daemon_process, tmp_path, redis_server, sim.url)
        with Stream(r) as stream:
            wait_until(lambda: stream.count() >= 30, 30, "answers from the first backend")
            config.write_text(f"backend = {new.url}\nprovider-key-file = {key_file}\n")
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_for("reloaded: backend=" + new.url)
            old_calls = sim.backend.calls()["authorize"]
            asked = stream.count()
            wait_until(lambda: stream.count() >= asked + 30, 30, "answers after the reload")
        assert daemon.proc.poll() is None
        assert None not in stream.answers
        assert all(a == "0:application_not_found" for a in stream.answers)
        # Requests in flight at the signal may still go to the old backend, none asked later.
        assert sim.backend.calls()["authorize"] <= old_calls + 3
        assert new.backend.calls()["authorize"] >= 30
        # Every distinct request was one call, to one backend or the other.
        assert sim.backend.calls()["authorize"] + new.backend.calls()["authorize"] == len(stream.answers)
        assert "Traceback" not in daemon.output()


def test_a_broken_config_is_refused_and_the_daemon_answers_with_the_last_good_one(
        tmp_path, r, redis_server, sim, daemon_process):
    daemon, config, key_file = start(daemon_process, tmp_path, redis_server, sim.url)
    assert "xcflushd_config_last_reload_successful 1.0" in scrape(daemon.metrics_address)
    with Stream(r) as stream:
        wait_until(lambda: stream.count() >= 10, 30, "answers before the reload")
        config.write_text(f"backend = ftp://elsewhere\nprovider-key-file = {key_file}\nredis = 127.0.0.1:1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        out = daemon.wait_for("reload refused")
        asked = stream.count()
        wait_until(lambda: stream.count() >= asked + 10, 30, "answers after the refused reload")
    line = next(x for x in out.splitlines() if "reload refused" in x)
    assert "--backend: scheme must be http or https" in line
    assert daemon.proc.poll() is None
    assert None not in stream.answers
    assert sim.backend.calls()["authorize"] == len(stream.answers)
    assert "xcflushd_config_last_reload_successful 0.0" in scrape(daemon.metrics_address)
    from test_status import status
    code, text, _ = status("--redis", redis_server.address)
    assert code == 1 and "last reload REFUSED" in text and "--backend: scheme must be" in text
    # Fixed again: the next reload applies, and names what only a restart changes.
    password = tmp_path / "redis-password"
    password.write_text("not-yet\n")
    config.write_text(f"backend = {sim.url}\nprovider-key-file = {key_file}\nredis-password-file = {password}\n")
    daemon.proc.send_signal(signal.SIGHUP)
    out = daemon.wait_for("reloaded:")
    assert "not applied until a restart: the Redis password" in out
    assert Gateway(r).priority_authorization("555", Credentials({"app_id": "after"}), "hits") == \
        "0:application_not_found"
    assert "xcflushd_config_last_reload_successful 1.0" in scrape(daemon.metrics_address)
    assert "Traceback" not in out


def test_a_rotated_provider_key_file_takes_effect_on_reload(tmp_path, r, redis_server, sim, daemon_process):
    daemon, config, key_file = start(daemon_process, tmp_path, redis_server, sim.url, key="pk-revoked")
    gateway = Gateway(r, priority_timeout=1.0)
    a1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
    assert gateway.priority_authorization("555", a1, "hits") is None  # the backend refuses the key
    key_file.write_text("pk-test\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("reloaded:")
    assert Gateway(r).priority_authorization("555", a1, "hits") == "1"
    assert "pk-test" not in daemon.output() and "pk-revoked" not in daemon.output()
