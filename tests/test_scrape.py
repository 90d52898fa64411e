"""A real Prometheus (Debian's ``prometheus`` server) scraping a running daemon.

The scrape configuration is the one docs/operations.md shows (job ``xcflushd``, the shipped alert
rules), with the daemon's address and a 1 s interval; the test asks
Prometheus's HTTP API what it scraped and how the rules evaluate.
"""

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from xcftest import free_port, wait_until

from xcflushd.defaults import DEAD_LETTER_HASH
from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "monitoring" / "xcflushd-alerts.yml"
APPS = [Credentials({"app_id": a}) for a in ("free1", "free2", "free3")]


def documented_scrape_config() -> dict:
    """The ``prometheus.yml`` docs/operations.md's "Scrape configuration" shows."""
    page = (REPO / "docs" / "operations.md").read_text()
    section = page.split("### Scrape configuration", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "no yaml block in docs/operations.md's scrape configuration"
    return yaml.safe_load(block.group(1))


class Prometheus:
    """``prometheus`` on a free loopback port with a private config and a throw-away TSDB."""

    def __init__(self, workdir: Path, targets):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not installed: run `make deps` (Debian package prometheus)")
        config = documented_scrape_config()
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        [job] = config["scrape_configs"]
        assert job["job_name"] == "xcflushd"  # what the rules expect
        job["scrape_interval"] = "1s"
        job["static_configs"] = [{"targets": list(targets)}]
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.address = f"127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={self.address}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 30, "prometheus ready", 0.1)

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: "
                                 f"{Path(self.log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def api(self, path: str, **params):
        url = f"http://{self.address}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.load(resp)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str):
        """``[(labels, value)]`` of an instant query."""
        return [(s["metric"], float(s["value"][1])) for s in self.api("query", query=expr)["result"]]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def start(*targets):
        server = Prometheus(tmp_path, targets)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def value_is(prom, expr, expected):
    def check():
        result = prom.query(expr)
        return result if [v for _, v in result] == [expected] else None
    return check


@pytest.mark.slow
def test_prometheus_scrapes_the_daemon_and_sees_what_it_counted(tmp_path, r, redis_server, sim, daemon_process,
                                                                prometheus):
    gateway = Gateway(r)
    for n, creds in enumerate(APPS, 1):
        gateway.cache_report("555", creds, "hits", n)  # 6 hits in all
    r.hset(DEAD_LETTER_HASH, "report,service_id:555,app_id:x_20260101000000_abcdef012345",
           '{"usage": {"hits": 1}, "reason": "test", "at": "2026-01-01T00:00:00Z"}')
    key = tmp_path / "pk"
    key.write_text("pk-test\n")
    daemon = daemon_process(["run", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file",
                             str(key), "-c", "/dev/null", "--frequency", "1", "--report-auth-wait", "0"])
    daemon.wait_for("ready:")
    prom = prometheus(daemon.metrics_address)

    [(labels, up)] = wait_until(value_is(prom, 'up{job="xcflushd"}', 1.0), 20, "the target up")
    assert labels["instance"] == daemon.metrics_address
    assert prom.query('up{job="xcflushd"} == 1') == [(labels, 1.0)]
    wait_until(value_is(prom, 'xcflushd_hits_reported_total{job="xcflushd"}', 6.0), 20,
               "the 6 hits Prometheus scraped")

    # Once delivered, cycles call nothing: what Prometheus holds settles at the calls the backend received.
    def calls_settled():
        received = sum(sim.backend.calls().values())
        return value_is(prom, 'sum(xcflushd_backend_requests_total{job="xcflushd"})', float(received))()
    wait_until(calls_settled, 20, "backend calls in Prometheus equal to those the simulator received")
    assert sim.backend.received()["555"] == {"free1": {"hits": 1}, "free2": {"hits": 2}, "free3": {"hits": 3}}

    # The shipped rules, evaluated by Prometheus on real series: all healthy, and the dead letter
    # alert pending (its `for:` keeps it from firing within a test).
    def rules_evaluated():
        rules = [rule for group in prom.api("rules")["groups"] for rule in group["rules"]]
        # A rule not evaluated yet says so with Go's zero time, 0001-01-01.
        return rules if rules and all(not rule["lastEvaluation"].startswith("0001") for rule in rules) else None
    rules = wait_until(rules_evaluated, 20, "every rule evaluated")
    assert len(rules) == 8 and all(rule["health"] == "ok" for rule in rules), rules
    alerts = wait_until(lambda: [a for a in prom.api("alerts")["alerts"]
                                 if a["labels"]["alertname"] == "XcflushdDeadLetters"], 20, "the dead letter alert")
    assert alerts[0]["state"] == "pending" and alerts[0]["labels"]["instance"] == daemon.metrics_address
    others = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]} - {"XcflushdDeadLetters"}
    assert not others, others  # a healthy daemon raises nothing else

    assert daemon.stop() == 0
    wait_until(value_is(prom, 'up{job="xcflushd"}', 0.0), 20, "the target down once the daemon stopped")
