"""The heartbeat and ``xcflushd status``: against a real daemon and a real redis-server."""

import json
import math
import re
import subprocess
import sys

from xcftest import free_port, wait_until

from xcflushd.defaults import DEAD_LETTER_HASH
from xcflushd.heartbeat import PREFIX
from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})


def status(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "xcflushd", "status", "-c", "/dev/null", *args],
                          capture_output=True, text=True, timeout=30, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def run_daemon(daemon_process, redis_server, sim, tmp_path, provider_key="pk-test"):
    """The first cycle runs at once; the next one a minute later, so that the first stays the
    heartbeat's ``last_cycle`` for as long as a loaded machine takes to run ``status``."""
    key = tmp_path / "pk"
    key.write_text(provider_key + "\n")
    daemon = daemon_process(["run", "--redis", redis_server.address, "--backend", sim.url,
                             "--provider-key-file", str(key), "-c", "/dev/null", "--frequency", "60",
                             "--report-auth-wait", "0"])
    daemon.wait_for("ready:")
    return daemon


def test_a_live_daemon_is_healthy_and_its_cycle_is_shown(tmp_path, r, redis_server, sim, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 4)
    daemon = run_daemon(daemon_process, redis_server, sim, tmp_path)
    daemon.wait_for("delivered=1")

    def delivered():
        code, out, _ = status("--redis", redis_server.address, "--json")
        doc = json.loads(out)
        return (code, doc) if any((d["last_cycle"] or {}).get("delivered") for d in doc["daemons"]) else None

    code, doc = wait_until(delivered, 15, "a heartbeat with the delivered cycle")
    assert code == 0 and doc["healthy"] and doc["problems"] == []
    [record] = doc["daemons"]
    assert record["pid"] == daemon.proc.pid
    assert record["metrics"] == f"http://{daemon.metrics_address}/metrics"  # where to scrape it
    assert record["last_cycle"]["result"] == "ok" and record["last_cycle"]["backend_error"] is None
    assert doc["dead_letters"] == 0 and doc["reports_pending"] == 0

    code, out, _ = status("--redis", redis_server.address)
    assert code == 0 and "daemons alive:  1" in out and "healthy" in out
    assert f"    metrics http://{daemon.metrics_address}/metrics\n" in out

    assert daemon.stop() == 0
    assert not list(r.scan_iter(match=PREFIX + "*"))  # a clean stop removes the record at once
    code, out, _ = status("--redis", redis_server.address)
    assert code == 1 and "no live xcflushd daemon" in out


def test_a_refused_provider_key_is_named_in_the_last_cycle(tmp_path, r, redis_server, sim, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 2)
    daemon = run_daemon(daemon_process, redis_server, sim, tmp_path, provider_key="wrong-key")

    def failed_cycle():
        code, out, _ = status("--redis", redis_server.address, "--json")
        doc = json.loads(out)
        cycles = [d["last_cycle"] for d in doc["daemons"] if d["last_cycle"]]
        return (code, doc, cycles[0]) if cycles else None

    code, doc, cycle = wait_until(failed_cycle, 15, "a finished cycle")
    assert code == 1 and not doc["healthy"]
    assert cycle["result"] == "partial"
    assert "provider_key_invalid" in cycle["backend_error"]
    assert "wrong-key" not in json.dumps(doc)
    assert any("provider_key_invalid" in p for p in doc["problems"])
    daemon.stop()


def test_dead_letters_make_it_degraded(r, redis_server):
    r.hset(DEAD_LETTER_HASH, "555,app_id:x_20260101_abc", json.dumps({"usage": {"hits": 1}, "reason": "t"}))
    code, out, _ = status("--redis", redis_server.address, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["dead_letters"] == 1
    assert any("dead letter" in p for p in doc["problems"])


def test_an_unreachable_redis_exits_2_with_one_line():
    code, out, err = status("--redis", f"127.0.0.1:{free_port()}")
    assert code == 2, (out, err)
    assert "Redis unreachable" in out and "Traceback" not in out + err


def test_status_needs_no_backend_credentials_but_reads_the_redis_password_file(tmp_path, r, redis_server):
    r.config_set("requirepass", "s3cret-pw")
    try:
        pw = tmp_path / "pw"
        pw.write_text("s3cret-pw\n")
        code, out, err = status("--redis", redis_server.address, "--redis-password-file", str(pw), "--json")
        assert code == 1 and json.loads(out)["redis"] == "ok", (out, err)
        code, out, _ = status("--redis", redis_server.address, "--json")
        assert code == 2 and "s3cret-pw" not in out
    finally:
        import redis as redis_py
        redis_py.Redis(port=redis_server.port, password="s3cret-pw").config_set("requirepass", "")


def test_a_daemon_whose_flushing_stalled_makes_it_degraded(r, redis_server):
    """A live heartbeat (the daemon's own writer) from a daemon started 10 minutes ago, flushing
    every second, that never finished a cycle: alive, but stalled."""
    import threading
    import time

    from xcflushd.heartbeat import Heartbeat

    made = time.time()
    beat = Heartbeat(r, 1, threading.Event(), clock=lambda: time.time() - 600)
    assert beat.beat()
    code, out, _ = status("--redis", redis_server.address)
    waited = time.time() - made  # how long a loaded machine took to run status
    assert code == 1 and "daemons alive:  1" in out and "DEGRADED" in out
    found = re.search(rf"{beat.host}:{beat.pid}: flushing stalled, it started (\d+)s ago \(frequency 1s\)", out)
    assert found and 600 <= int(found[1]) <= 600 + math.ceil(waited), out
    assert "    metrics not served\n" in out and "no flush cycle finished yet" in out
    code, out, _ = status("--redis", redis_server.address, "--json")
    assert code == 1 and json.loads(out)["daemons"][0]["id"] == beat.id


def test_two_daemons_on_one_redis_are_listed_and_the_one_that_took_the_last_cycle_is_named(r, redis_server):
    """Two live heartbeats (the daemon's own writer), each with a finished cycle: the later
    cycle's daemon is named; a refused reload makes the status degraded and says why."""
    import threading
    import time

    from xcflushd.flusher import FlushResult
    from xcflushd.heartbeat import Heartbeat

    beats = []
    for age, began in ((30, time.time() - 20), (0, time.time() - 5)):  # listed oldest first
        beat = Heartbeat(r, 60, threading.Event(), clock=lambda age=age: time.time() - age)
        result = FlushResult()
        result.started_at, result.finished_at = began, began + 1
        beat.cycle_ended(result)
        beats.append(beat)
    first, second = beats
    code, out, _ = status("--redis", redis_server.address, "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["daemons"]) == 2 and doc["last_cycle_by"] == second.id
    code, out, _ = status("--redis", redis_server.address)
    assert code == 0 and "daemons alive:  2" in out
    listed = [line for line in out.splitlines() if line.startswith(f"  {second.host} pid {second.pid} ")]
    assert len(listed) == 2 and ["took the last cycle" in line for line in listed] == [False, True], out
    first.record["reload"] = {"at": time.time(), "ok": False, "error": "--backend: scheme must be http or https"}
    assert first.beat()
    code, out, _ = status("--redis", redis_server.address)
    assert code == 1 and "last reload REFUSED" in out
    assert f"{first.host}:{first.pid}: last reload refused: --backend: scheme must be http or https" in out
