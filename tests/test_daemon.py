"""The daemon as a real process: ready, flush cycles, graceful stop, one-shot flush."""

import time

from xcflushd.keys import Credentials, report_key
from xcflushd_sim.gateway import Gateway

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})


def run_args(redis_server, sim, key_file, *extra):
    return ["--redis", redis_server.address, "--backend", sim.url, "--provider-key-file", key_file,
            "-c", "/dev/null", *extra]


def key_file_for(tmp_path):
    path = tmp_path / "pk"
    path.write_text("pk-test\n")
    return str(path)


def test_run_flushes_and_stops_gracefully_on_sigterm(tmp_path, r, redis_server, sim, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 5)
    daemon = daemon_process(["run", *run_args(redis_server, sim, key_file_for(tmp_path),
                                              "--frequency", "1", "--report-auth-wait", "0")])
    daemon.wait_for("ready:")
    daemon.wait_for("delivered=1")
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 5}
    assert daemon.stop() == 0
    out = daemon.output()
    assert "SIGTERM received: stopping" in out and out.rstrip().endswith("stopped")
    assert "Traceback" not in out


def test_stop_during_the_wait_skips_authorize_and_loses_nothing(tmp_path, r, redis_server, sim, daemon_process):
    gateway = Gateway(r)
    gateway.cache_report("555", A1, "hits", 3)
    daemon = daemon_process(["run", *run_args(redis_server, sim, key_file_for(tmp_path),
                                              "--frequency", "60", "--auth-ttl", "120",
                                              "--report-auth-wait", "30")])
    daemon.wait_for("ready:")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not sim.backend.received():
        time.sleep(0.05)
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5  # did not sit out the 30 s wait
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 3}
    assert sim.backend.calls()["authorize"] == 1  # the check of the new application's metrics, not the phase


def test_waits_for_redis_before_ready(tmp_path, sim, daemon_process):
    from xcftest import RedisServer, free_port

    port = free_port()
    daemon = daemon_process(["run", "--redis", f"127.0.0.1:{port}", "--backend", sim.url,
                             "--provider-key-file", key_file_for(tmp_path), "-c", "/dev/null"])
    daemon.wait_for("waiting for Redis at redis://127.0.0.1")
    assert "ready:" not in daemon.output()
    server = RedisServer(port=port)
    try:
        daemon.wait_for("ready:", timeout=20)
        assert daemon.stop() == 0
    finally:
        server.close()


def test_flush_command_exit_status(tmp_path, r, redis_server, sim, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 2)
    args = ["flush", *run_args(redis_server, sim, key_file_for(tmp_path), "--report-auth-wait", "0")]
    ok = daemon_process(args)
    assert ok.proc.wait(20) == 0
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 2}

    Gateway(r).cache_report("555", A1, "hits", 4)
    sim.backend.set_faults({"rate": 1.0, "kinds": ["500"], "endpoints": ["report"]})
    failed = daemon_process(args)
    assert failed.proc.wait(20) == 1
    assert "failed=1" in failed.output()
    assert r.hgetall(report_key("555", A1)) == {"hits": "4"}


def test_secrets_stay_out_of_the_logs(tmp_path, r, redis_server, sim, daemon_process):
    Gateway(r).cache_report("555", Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"}), "hits", 1)
    wrong = tmp_path / "wrong"
    wrong.write_text("pk-wrong-and-secret\n")
    daemon = daemon_process(["flush", "--redis", redis_server.address, "--backend", sim.url,
                             "--provider-key-file", str(wrong), "-c", "/dev/null", "--report-auth-wait", "0",
                             "--log-level", "debug"])
    assert daemon.proc.wait(20) == 1
    out = daemon.output()
    assert "provider_key_invalid" in out
    assert "pk-wrong-and-secret" not in out and "s3cr3t" not in out
