"""``/metrics``: the address option, the exposition of a real daemon, and what it counts.

Every test runs the daemon as a process against redis-server and the backend
simulator, and reads /metrics over HTTP as Prometheus would.
"""

import shutil
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from xcftest import free_port, wait_until

from xcflushd.config import is_loopback, parse_listen
from xcflushd.errors import ConfigError
from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
APPS = [Credentials({"app_id": a}) for a in ("free1", "free2", "free3")]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return resp.read().decode()


def samples(text: str) -> dict:
    """``{(sample name, sorted labels): value}``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(text: str, name: str, **labels) -> float:
    return sum(v for (n, lbls), v in samples(text).items()
               if n == name and all(dict(lbls).get(k) == w for k, w in labels.items()))


def start(daemon_process, redis_server, sim_url, tmp_path, *extra, env=None):
    key = tmp_path / "pk"
    key.write_text("pk-test\n")
    return daemon_process(["run", "--redis", redis_server.address, "--backend", sim_url,
                           "--provider-key-file", str(key), "-c", "/dev/null", "--frequency", "1",
                           "--report-auth-wait", "0", "--backend-read-timeout", "2", *extra], env)


# ---- the option ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9422", ("127.0.0.1", 9422)),
    ("[::1]:9422", ("::1", 9422)),
    ("localhost:1", ("localhost", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    (" node-1.example.:9422 ", ("node-1.example.", 9422)),
    ("", None),
    (None, None),
])
def test_listen_addresses_accepted(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9422", ":9422", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536",
                                  "127.0.0.1:-1", "::1:9422", "[::1]9422", "[127.0.0.1]:9422",
                                  "[::1]:", "host name:9422", "a_b:9422", "127.0.0.1:９４２２", "h\n:1"])
def test_malformed_listen_addresses_are_one_line_errors(text):
    with pytest.raises(ConfigError) as err:
        parse_listen(text)
    assert "\n" not in str(err.value) and str(err.value).startswith("--metrics-listen")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_listen_text_parses_or_is_a_config_error(text):
    try:
        result = parse_listen(text)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    if result is not None:
        host, port = result
        assert 0 < port < 65536 and host and "\n" not in host


def test_loopback_judgement():
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
    assert not is_loopback("node1.example")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "xcflushd", *args], capture_output=True, text=True,
                          timeout=30, env=env)


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", "[::1:9422"])
def test_a_malformed_address_exits_2_with_one_line(tmp_path, value):
    key = tmp_path / "pk"
    key.write_text("pk\n")
    proc = run_cli("run", "-c", "/dev/null", "--provider-key-file", str(key), "--metrics-listen", value)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--metrics-listen" in proc.stderr and "Traceback" not in proc.stderr


def test_a_busy_address_exits_2_with_one_line(tmp_path, redis_server, sim, daemon_process):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        daemon = start(daemon_process, redis_server, sim.url, tmp_path, "--metrics-listen", busy)
        assert daemon.proc.wait(20) == 2
    out = daemon.output()
    assert f"xcflushd: error: --metrics-listen {busy}: cannot listen: Address already in use" in out
    assert "Traceback" not in out and "ready:" not in out


def test_empty_disables_it_and_the_environment_wins_over_the_file(tmp_path, redis_server, sim, daemon_process):
    port = free_port()
    conf = tmp_path / "xcflushd.conf"
    conf.write_text(f"metrics-listen = 127.0.0.1:{port}\n")
    daemon = start(daemon_process, redis_server, sim.url, tmp_path, "-c", str(conf),
                   env={"XCFLUSHD_METRICS_LISTEN": ""})
    daemon.wait_for("ready:")
    assert "metrics: disabled" in daemon.output()
    assert _try_scrape(f"127.0.0.1:{port}") is None
    daemon.stop()


def test_the_config_file_sets_it(tmp_path, redis_server, sim, daemon_process):
    port = free_port()
    conf = tmp_path / "xcflushd.conf"
    conf.write_text(f"metrics-listen = 127.0.0.1:{port}\n")
    daemon = start(daemon_process, redis_server, sim.url, tmp_path, "-c", str(conf),
                   env={"XCFLUSHD_METRICS_LISTEN": None})
    daemon.wait_for("ready:")
    assert f"metrics: http://127.0.0.1:{port}/metrics" in daemon.output()
    assert "xcflushd_build_info" in scrape(f"127.0.0.1:{port}")
    daemon.stop()


def _try_scrape(address):
    try:
        return scrape(address)
    except OSError:
        return None


def test_ipv6_loopback(tmp_path, redis_server, sim, daemon_process):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    daemon = start(daemon_process, redis_server, sim.url, tmp_path, "--metrics-listen", f"[::1]:{port}")
    daemon.wait_for("ready:")
    assert f"metrics: http://[::1]:{port}/metrics" in daemon.output()
    assert "xcflushd_build_info" in scrape(f"[::1]:{port}")
    daemon.stop()


def test_a_non_loopback_address_is_allowed_and_logged(tmp_path, redis_server, sim, daemon_process):
    port = free_port()
    daemon = start(daemon_process, redis_server, sim.url, tmp_path, "--metrics-listen", f"0.0.0.0:{port}")
    daemon.wait_for("ready:")
    assert f"WARNING xcflushd.exporter: metrics: http://0.0.0.0:{port}/metrics is reachable from other hosts" \
        in daemon.output()
    assert "xcflushd_build_info" in scrape(f"127.0.0.1:{port}")
    daemon.stop()


# ---- what it counts ----------------------------------------------------------------------

def settle(address, sim):
    """A predicate: the counted calls equal the simulator's, endpoint by endpoint."""
    def matched():
        text = scrape(address)
        counted = {e: total(text, "xcflushd_backend_requests_total", endpoint=e)
                   for e in ("authorize", "oauth_authorize", "report")}
        received = {e: sim.backend.state()["calls"].get(e, 0) for e in counted}
        return (text, counted, received) if counted == received else None
    return matched


def test_backend_calls_are_counted_exactly_under_faults(tmp_path, r, redis_server, daemon_process):
    """A third of the calls answered 500/503: after the cycles, every call the backend received
    is counted once, under its endpoint and status."""
    from xcftest import DEMO_CONFIG

    from xcflushd_sim.server import Simulator

    sim = Simulator(DEMO_CONFIG, faults={"rate": 0.3, "kinds": ["500", "503_html"], "seed": 7}).start()
    try:
        gateway = Gateway(r)
        for n, creds in enumerate(APPS, 1):
            gateway.cache_report("555", creds, "hits", n)
        daemon = start(daemon_process, redis_server, sim.url, tmp_path)
        daemon.wait_for("ready:")
        for _ in range(6):
            gateway.priority_authorization("555", A1, "hits")

        def delivered():
            got = sim.backend.received().get("555", {})
            return sum(got.get(c.get("app_id"), {}).get("hits", 0) for c in APPS) == 6

        wait_until(delivered, 40, "all usage delivered despite the faults")
        # Once everything is delivered, cycles find nothing to report and make no calls:
        # the counts settle, and must then equal the simulator's, endpoint by endpoint.
        text, counted, received = wait_until(settle(daemon.metrics_address, sim), 20,
                                             "counts equal to the calls received")
        codes = {(dict(lbls)["endpoint"], dict(lbls)["code"]): v for (n, lbls), v in samples(text).items()
                 if n == "xcflushd_backend_requests_total" and v}
        statuses = {(endpoint, code): float(n) for endpoint, by_code in
                    sim.backend.state()["statuses_by_endpoint"].items() for code, n in by_code.items()}
        daemon.stop()
    finally:
        sim.stop()
    assert sum(counted.values()) == sum(received.values()) > 0
    assert codes == statuses  # and by endpoint and status too
    assert {"500", "503"} & {code for _, code in codes}  # the faults were there, and counted by their answer
    assert total(text, "xcflushd_hits_reported_total") == 6


def test_transport_errors_are_counted_as_error(tmp_path, r, redis_server, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 1)
    daemon = start(daemon_process, redis_server, f"http://127.0.0.1:{free_port()}", tmp_path)
    daemon.wait_for("flush cycle")
    text = wait_until(lambda: (lambda t: t if total(t, "xcflushd_backend_requests_total", code="error") else None)(
        scrape(daemon.metrics_address)), 15, "a counted transport error")
    # A new application: its metric check (an authorize call) is the first call that fails.
    assert total(text, "xcflushd_backend_requests_total", endpoint="authorize", code="error") >= 1
    assert total(text, "xcflushd_backend_up") == 0
    assert total(text, "xcflushd_flush_cycles_total", result="ok") == 0
    daemon.stop()


def test_the_exposition_of_a_running_daemon_lints_clean(tmp_path, r, redis_server, sim, daemon_process):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not installed: run `make deps` (Debian package prometheus)")
    Gateway(r).cache_report("555", A1, "hits", 3)
    daemon = start(daemon_process, redis_server, sim.url, tmp_path)
    daemon.wait_for("delivered=1")
    Gateway(r).priority_authorization("555", A1, "hits")
    text = wait_until(lambda: (lambda t: t if total(t, "xcflushd_priority_requests_total") else None)(
        scrape(daemon.metrics_address)), 15, "a counted priority request")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr
    values = samples(text)
    assert values[("xcflushd_build_info", (("version", __import__("xcflushd").__version__),))] == 1
    assert values[("xcflushd_flush_frequency_seconds", ())] == 1
    assert values[("xcflushd_redis_up", ())] == 1 and values[("xcflushd_backend_up", ())] == 1
    assert total(text, "xcflushd_flush_cycles_total", result="ok") >= 1
    assert total(text, "xcflushd_last_flush_success_timestamp_seconds") > 0
    assert total(text, "xcflushd_priority_requests_total", result="authorized") == 1
    assert total(text, "xcflushd_priority_response_seconds_count") == 1
    assert total(text, "process_resident_memory_bytes") > 0  # the default collectors are there
    phases = {dict(lbls)["phase"] for (n, lbls) in values if n == "xcflushd_flush_phase_seconds_count"}
    assert {"report", "authorize"} <= phases
    daemon.stop()


def test_backlog_gauges_follow_redis(tmp_path, r, redis_server, daemon_process):
    """Every report answered 500: reports pile up, and the gauges say how many; a dead letter is counted."""
    from xcftest import DEMO_CONFIG

    from xcflushd.defaults import DEAD_LETTER_HASH
    from xcflushd_sim.server import Simulator

    sim = Simulator(DEMO_CONFIG, faults={"rate": 1.0, "kinds": ["500"], "endpoints": ["report"]}).start()
    try:
        gateway = Gateway(r)
        for creds in APPS:
            gateway.cache_report("555", creds, "hits", 1)
        r.hset(DEAD_LETTER_HASH, "report,service_id:555,app_id:x_20260101000000_abcdef012345",
               '{"usage": {"hits": 1}, "reason": "test", "at": "2026-01-01T00:00:00Z"}')
        daemon = start(daemon_process, redis_server, sim.url, tmp_path)
        daemon.wait_for("failed=3")

        def gauges():
            text = scrape(daemon.metrics_address)
            pending, dead = total(text, "xcflushd_reports_pending"), total(text, "xcflushd_dead_letter_reports")
            return text if (pending, dead) == (3, 1) else None

        text = wait_until(gauges, 15, "reports_pending 3 and dead_letter_reports 1")
        assert total(text, "xcflushd_flush_cycles_total", result="partial") >= 1
        assert total(text, "xcflushd_last_flush_success_timestamp_seconds") == 0
        daemon.stop()
    finally:
        sim.stop()


def test_stuck_scrapers_block_neither_cycles_nor_priority_answers(tmp_path, r, redis_server, sim, daemon_process):
    """Scrapers that connect and never finish their request, and ones that ask and never read the
    answer (a 1 KiB receive buffer: most of it stays queued in the kernel), change nothing."""
    daemon = start(daemon_process, redis_server, sim.url, tmp_path)
    daemon.wait_for("ready:")
    host, port = daemon.metrics_address.rsplit(":", 1)
    stuck = []
    for n in range(21):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect((host, int(port)))
        s.sendall((b"GET /metr", b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
                   b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[n % 3])
        stuck.append(s)
    try:
        gateway = Gateway(r)
        cycles_before = daemon.output().count("flush cycle:")
        gateway.cache_report("555", A1, "hits", 2)
        answers = [gateway.priority_authorization("555", A1, "hits") for _ in range(3)]
        assert answers == ["1", "1", "1"]
        wait_until(lambda: sim.backend.received().get("555", {}).get("a1b2c3", {}).get("hits") == 2, 15,
                   "a cycle delivering while scrapers hang")
        wait_until(lambda: daemon.output().count("flush cycle:") > cycles_before, 15, "the cycle's end")
        # and a well-behaved scrape still gets its answer meanwhile
        results = []
        worker = threading.Thread(target=lambda: results.append(scrape(daemon.metrics_address)))
        worker.start()
        worker.join(15)
        assert results and "xcflushd_flush_cycles_total" in results[0]
    finally:
        for s in stuck:
            s.close()
    daemon.stop()
