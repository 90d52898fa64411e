"""The shipped alert rules and dashboard (monitoring/): promtool checks them, and every
metric they name is one a real daemon exports, with the labels they group by."""

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from xcftest import wait_until

from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "monitoring" / "xcflushd-alerts.yml"
RULE_TESTS = REPO / "tests" / "monitoring" / "alerts.test.yml"
DASHBOARD = REPO / "monitoring" / "xcflushd-dashboard.json"
#: Series Prometheus itself makes for each target.
SYNTHETIC = {"up"}
#: Labels Prometheus adds to every series (target labels), and histograms' bucket label.
TARGET_LABELS = {"job", "instance", "le"}
_NAME = re.compile(r"\b((?:xcflushd|process|python)_[a-z_]+|up)\b(?!\s*\()")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")


def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed: run `make deps` (Debian package prometheus)")
    return path


def test_the_rules_pass_promtool_check():
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout


def test_the_rules_fire_as_their_unit_tests_expect():
    proc = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_has_a_summary_a_description_and_a_runbook_section_in_the_operations_page():
    import yaml

    page = (REPO / "docs" / "operations.md").read_text()
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == 8
    tested = RULE_TESTS.read_text()
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook"].endswith("/docs/operations.md#" + rule["alert"].lower())
        assert f"#### {rule['alert']}\n" in page, f"no runbook section for {rule['alert']} in docs/operations.md"
        assert f"alertname: {rule['alert']}\n" in tested, f"{rule['alert']} has no promtool unit test"


def dashboard_queries():
    doc = json.loads(DASHBOARD.read_text())
    panels = doc["panels"]
    assert len(panels) >= 10
    out = []
    for panel in panels:
        assert panel["targets"], panel["title"]
        out += [(panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def rule_queries():
    import yaml

    return [(r["alert"], r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, redis_server):
    """{sample name: label names} from the /metrics of a daemon that flushed and answered."""
    from xcftest import DEMO_CONFIG, DaemonProcess

    from xcflushd.storage import connect
    from xcflushd_sim.server import Simulator

    sim = Simulator(DEMO_CONFIG).start()
    client = connect(redis_server.url)
    client.flushall()
    key = tmp_path_factory.mktemp("pk") / "pk"
    key.write_text("pk-test\n")
    creds = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
    gateway = Gateway(client)
    gateway.cache_report("555", creds, "hits", 1)
    daemon = DaemonProcess(["run", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file",
                            str(key), "-c", "/dev/null", "--frequency", "1", "--report-auth-wait", "0"])
    try:
        daemon.wait_for("delivered=1")
        gateway.priority_authorization("555", creds, "hits")

        def scraped():
            with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            return text if "xcflushd_priority_response_seconds_count 1.0" in text else None

        text = wait_until(scraped, 15, "a scrape after a cycle and a priority answer")
    finally:
        daemon.kill()
        sim.stop()
        client.close()
    names = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            names.setdefault(s.name, set()).update(s.labels)
    return names


@pytest.mark.parametrize("where", ["dashboard", "rules"])
def test_every_query_names_exported_families_and_labels(exported, where):
    queries = dashboard_queries() if where == "dashboard" else rule_queries()
    for title, expr in queries:
        names = set(_NAME.findall(expr))
        assert names, f"{title}: no metric in {expr!r}"
        for name in names - SYNTHETIC:
            assert name in exported, f"{title}: {name} is not exported by xcflushd"
        grouped = {label.strip() for clause in _BY.findall(expr) for label in clause.split(",") if label.strip()}
        known = TARGET_LABELS.union(*(exported.get(n, set()) for n in names))
        assert grouped <= known, f"{title}: groups by {grouped - known}, which {names} do not have"
