"""Fault injection, each kind observed from a real client; reports never applied by a fault."""

import http.client
import socket
import time
from urllib.parse import urlsplit

import defusedxml.ElementTree as DET
import pytest
import requests
from defusedxml import EntitiesForbidden

from xcflushd_sim.faults import KINDS
from xcflushd_sim.server import Simulator

from .helpers import NOW, XML_TYPE, spec_config

AUTH_QUERY = "/transactions/authorize.xml?app_id=a1b2c3&app_key=s3cr3t&provider_key=pk123"
REPORT_BODY = ("transactions[0][app_id]=a1b2c3&transactions[0][usage][hits]=3"
               "&provider_key=pk123&service_id=555")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def faulty(kind, endpoints=("authorize", "oauth_authorize", "report"), **extra):
    spec = {"rate": 1.0, "kinds": [kind], "endpoints": list(endpoints), "seed": 1}
    spec.update(extra)
    return Simulator(spec_config(), clock=lambda: NOW, faults=spec).start()


def raw_request(sim, method, path, body=None, headers=None, timeout=5.0):
    """One request on a fresh http.client connection; returns (status, headers, body)."""
    parts = urlsplit(sim.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_500_plain_text():
    with faulty("500") as sim:
        r = requests.get(sim.url + AUTH_QUERY)
        assert (r.status_code, r.content) == (500, b"Internal Server Error\n")
        assert r.headers["Content-Type"] == "text/plain"
        assert sim.backend.state()["faults_injected"] == 1


def test_503_html():
    with faulty("503_html") as sim:
        r = requests.get(sim.url + AUTH_QUERY)
        assert r.status_code == 503
        assert r.headers["Content-Type"] == "text/html"
        assert r.content.startswith(b"<html>")


def test_empty_4xx():
    with faulty("empty_4xx") as sim:
        r = requests.get(sim.url + AUTH_QUERY)
        assert (r.status_code, r.content) == (403, b"")


def test_garbage_is_not_xml():
    with faulty("garbage") as sim:
        r = requests.get(sim.url + AUTH_QUERY)
        assert r.status_code == 200
        with pytest.raises(DET.ParseError):
            DET.fromstring(r.content)


def test_xml_bomb_is_refused_by_a_safe_parser():
    with faulty("xml_bomb") as sim:
        r = requests.get(sim.url + AUTH_QUERY)
        assert r.status_code == 200
        assert b"<!ENTITY lol9" in r.content
        with pytest.raises(EntitiesForbidden):
            DET.fromstring(r.content)


def test_huge_body():
    with faulty("huge", huge_bytes=3 * 1024 * 1024) as sim:
        status, headers, body = raw_request(sim, "GET", AUTH_QUERY)
        assert status == 200
        assert len(body) == int(headers["Content-Length"]) >= 3 * 1024 * 1024


def test_truncated_keeps_status_and_content_length_matches():
    with faulty("truncated") as sim:
        status, headers, body = raw_request(sim, "GET", AUTH_QUERY)
        assert status == 200
        assert int(headers["Content-Length"]) == len(body) > 0
        assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?><status>')
        assert not body.endswith(b"</status>")
        sim.backend.set_usage("555", "a1b2c3", "hits", 5000, "day")
        assert raw_request(sim, "GET", AUTH_QUERY)[0] == 409


def test_wrong_content_type_serves_valid_xml_as_html():
    with faulty("wrong_content_type") as sim:
        r = requests.get(sim.url + AUTH_QUERY)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/html")
        assert DET.fromstring(r.content).findtext("authorized") == "true"


def test_reset_is_a_connection_reset():
    with faulty("reset") as sim:
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)) as info:
            raw_request(sim, "GET", AUTH_QUERY)
        # RemoteDisconnected (a clean FIN) subclasses ConnectionResetError: compare exactly.
        assert type(info.value) is ConnectionResetError, "expected an RST, not a FIN"
        assert sim.backend.calls()["authorize"] == 1
        assert sim.backend.statuses() == {}


def test_timeout_holds_the_connection_without_blocking_others():
    with faulty("timeout", endpoints=["report"], timeout_s=1.0) as sim:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(sim.url + "/transactions.xml", data=REPORT_BODY, headers=FORM,
                          timeout=0.3)
        # meanwhile another connection is served at once
        assert requests.get(sim.url + AUTH_QUERY, timeout=1).status_code == 200
        assert time.monotonic() - started < 0.9
        assert sim.backend.received() == {}


def test_timeout_hold_ends_with_a_closed_connection():
    with faulty("timeout", timeout_s=0.2) as sim:
        with pytest.raises(http.client.RemoteDisconnected):
            raw_request(sim, "GET", AUTH_QUERY, timeout=2)


def test_stop_releases_held_connections_at_once():
    sim = faulty("timeout", timeout_s=60)
    parts = urlsplit(sim.url)
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall(f"GET {AUTH_QUERY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    time.sleep(0.1)
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 1.0
    sock.settimeout(2)
    assert sock.recv(100) == b""
    sock.close()


@pytest.mark.parametrize("kind", ["500", "503_html", "reset", "empty_4xx", "timeout"])
def test_report_faults_never_apply_usage(kind):
    with faulty(kind, timeout_s=0.2) as sim:
        try:
            r = requests.post(sim.url + "/transactions.xml", data=REPORT_BODY, headers=FORM,
                              timeout=1)
            assert r.status_code >= 400
        except requests.exceptions.ConnectionError:
            pass
        assert sim.backend.received() == {}
        assert sim.backend.usage("555", "a1b2c3") == {}
        assert sim.backend.calls()["report"] == 1


@pytest.mark.parametrize("kind", ["truncated", "garbage", "xml_bomb", "huge",
                                  "wrong_content_type"])
def test_body_mangling_kinds_are_not_injected_on_reports(kind):
    with faulty(kind) as sim:
        r = requests.post(sim.url + "/transactions.xml", data=REPORT_BODY, headers=FORM)
        assert (r.status_code, r.headers["Content-Type"]) == (202, XML_TYPE)
        assert sim.backend.received() == {"555": {"a1b2c3": {"hits": 3}}}
        assert sim.backend.state()["faults_injected"] == 0


def test_report_applied_then_reset_applies_and_is_counted():
    with faulty("report_applied_then_reset") as sim:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(sim.url + "/transactions.xml", data=REPORT_BODY, headers=FORM)
        assert sim.backend.received() == {"555": {"a1b2c3": {"hits": 3}}}
        state = sim.backend.state()
        assert state["applied_but_unacknowledged"] == 1
        assert state["unacknowledged"] == {"555": {"a1b2c3": {"hits": 3}}}
        # not eligible on authorize
        assert requests.get(sim.url + AUTH_QUERY).status_code == 200


def test_endpoint_filter_and_runtime_change():
    with faulty("500", endpoints=["report"]) as sim:
        assert requests.get(sim.url + AUTH_QUERY).status_code == 200
        assert requests.post(sim.url + "/transactions.xml", data=REPORT_BODY,
                             headers=FORM).status_code == 500
        r = requests.post(sim.url + "/_sim/faults", json={"rate": 0.0})
        assert r.status_code == 200 and r.json()["rate"] == 0.0
        assert requests.post(sim.url + "/transactions.xml", data=REPORT_BODY,
                             headers=FORM).status_code == 202
        assert sim.backend.state()["statuses_by_endpoint"]["report"] == {"500": 1, "202": 1}


def test_rate_and_seed_are_reproducible():
    def run():
        spec = {"rate": 0.3, "kinds": ["500", "empty_4xx"], "seed": 7}
        with Simulator(spec_config(), faults=spec) as sim:
            session = requests.Session()
            return [session.get(sim.url + AUTH_QUERY).status_code for _ in range(60)]
    first, second = run(), run()
    assert first == second
    assert {200, 500, 403} == set(first)
    assert 5 < sum(s != 200 for s in first) < 35


def test_bad_fault_configs_are_refused():
    with Simulator(spec_config()) as sim:
        for bad in ({"rate": 2}, {"kinds": ["nope"]}, {"endpoints": ["x"]}, {"sneaky": 1},
                    {"seed": "x"}, [1]):
            r = requests.post(sim.url + "/_sim/faults", json=bad)
            assert r.status_code == 400, bad
            assert "error" in r.json()
        with pytest.raises(ValueError):
            sim.backend.set_faults({"rate": -0.1})


def test_every_kind_is_tested_here():
    tested = {"500", "503_html", "empty_4xx", "garbage", "xml_bomb", "huge", "truncated",
              "wrong_content_type", "reset", "timeout", "report_applied_then_reset"}
    assert tested == set(KINDS)
