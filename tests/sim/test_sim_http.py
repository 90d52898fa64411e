"""Wire behaviour (keep-alive, lengths, routes) and the /_sim/ control endpoints."""

import http.client
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from xcflushd_sim.model import demo_config
from xcflushd_sim.server import Simulator

from .helpers import XML_TYPE, auth, report, spec_config

AUTH_PATH = "/transactions/authorize.xml?app_id=a1b2c3&app_key=s3cr3t&provider_key=pk123"


def connection(sim):
    parts = urlsplit(sim.url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)


def test_keep_alive_one_connection_many_answers_all_with_content_length(sim):
    conn = connection(sim)
    requests_made = [
        ("GET", AUTH_PATH, None, 200),
        ("GET", "/transactions/authorize.xml?app_id=nobody&provider_key=pk123", None, 404),
        ("GET", AUTH_PATH + "&usage=1", None, 403),                    # bare 403
        ("GET", "/nowhere", None, 404),
        ("POST", "/transactions.xml", "transactions[0][app_id]=a1b2c3&transactions[0][usage]"
                                      "[hits]=1&provider_key=pk123", 202),
        ("POST", "/transactions/authorize.xml", "", 404),              # wrong method
        ("GET", "/status", None, 200),
        ("GET", AUTH_PATH, None, 200),
    ]
    sockets = set()
    for method, path, body, status in requests_made:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        content = response.read()
        sockets.add(id(conn.sock))
        assert response.status == status, path
        assert response.getheader("Content-Length") == str(len(content))
        assert response.getheader("Connection") is None
    assert len(sockets) == 1, "the connection was not kept alive"
    conn.close()


def test_unknown_routes_are_404_with_empty_body(sim, http):
    for path in ("/", "/transactions/authrep.xml", "/_sim/nothing", "/transactions.xml"):
        r = http.get(sim.url + path)
        assert (r.status_code, r.content) == (404, b""), path
        assert r.headers["Content-Type"] == XML_TYPE


def test_status_check_and_available(sim, http):
    r = http.get(sim.url + "/status")
    assert r.json()["status"] == "ok"
    assert r.headers["Content-Type"] == "application/json"
    r = http.get(sim.url + "/check.txt")
    assert (r.status_code, r.text, r.headers["Content-Type"]) == (200, "ok", "text/plain")
    assert http.head(sim.url + "/available").status_code == 200


def test_http_1_0_client_gets_an_answer_and_a_closed_connection(sim):
    parts = urlsplit(sim.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(f"GET {AUTH_PATH} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in head
    assert body.startswith(b"<?xml")


def test_chunked_request_body(sim):
    conn = connection(sim)
    body = [b"transactions[0][app_id]=a1b2c3&", b"transactions[0][usage][hits]=4",
            b"&provider_key=pk123"]
    conn.request("POST", "/transactions.xml", body=iter(body), encode_chunked=True,
                 headers={"Content-Type": "application/x-www-form-urlencoded",
                          "Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 202
    assert sim.backend.received() == {"555": {"a1b2c3": {"hits": 4}}}


def test_state_document(sim, http):
    auth(http, sim, "app_id=a1b2c3&app_key=s3cr3t&provider_key=pk123")
    auth(http, sim, "app_id=nobody&provider_key=pk123")
    report(http, sim, "transactions[0][app_id]=a1b2c3&transactions[0][usage][search]=2"
                      "&provider_key=pk123")
    report(http, sim, "transactions[0][app_id]=ghost&transactions[0][usage][hits]=9"
                      "&provider_key=pk123")
    state = http.get(sim.url + "/_sim/state").json()
    assert state["received"] == {"555": {"a1b2c3": {"search": 2}}}
    assert state["dropped"] == {"555": {"ghost": {"hits": 9}}}
    assert state["calls"] == {"authorize": 2, "oauth_authorize": 0, "report": 2}
    assert state["statuses"] == {"200": 1, "404": 1, "202": 2}
    assert state["faults_injected"] == 0
    assert state["applied_but_unacknowledged"] == 0
    [error] = state["errors"]
    assert error["code"] == "application_not_found"
    assert error["transactions"] == [{"app_id": "ghost", "usage": {"hits": "9"}}]


def test_reset_clears_usage_and_ledgers_but_keeps_config_and_faults(sim, http):
    report(http, sim, "transactions[0][app_id]=a1b2c3&transactions[0][usage][hits]=2"
                      "&provider_key=pk123")
    sim.backend.set_faults({"rate": 1.0, "kinds": ["500"], "endpoints": ["oauth_authorize"]})
    assert http.post(sim.url + "/_sim/reset").json() == {"ok": True}
    state = http.get(sim.url + "/_sim/state").json()
    assert state["received"] == {} and state["errors"] == [] and state["statuses"] == {}
    assert state["calls"] == {"authorize": 0, "oauth_authorize": 0, "report": 0}
    assert sim.backend.usage("555", "a1b2c3") == {}
    assert auth(http, sim, "app_id=a1b2c3&app_key=s3cr3t&provider_key=pk123").status_code == 200
    assert sim.backend.state()["faults"]["rate"] == 1.0


def test_config_replacement(sim, http):
    current = http.get(sim.url + "/_sim/config").json()
    assert current == spec_config()
    new = spec_config()
    new["services"][0]["applications"].append({"app_id": "newapp", "plan": "Free"})
    assert http.post(sim.url + "/_sim/config", json=new).json() == {"ok": True}
    assert auth(http, sim, "app_id=newapp&provider_key=pk123").status_code == 200
    for bad in ({"services": []}, {"services": [{"id": "1", "plans": {"p": {"nope": {}}}}]},
                "not an object"):
        r = http.post(sim.url + "/_sim/config", json=bad)
        assert r.status_code == 400 and r.json()["error"], bad
    r = http.post(sim.url + "/_sim/config", data=b"{not json")
    assert r.status_code == 400
    assert auth(http, sim, "app_id=newapp&provider_key=pk123").status_code == 200


def test_latency_applies_to_3scale_calls_only_and_can_change_at_run_time(http):
    with Simulator(spec_config(), latency=0.15) as sim:
        started = time.monotonic()
        http.get(sim.url + "/_sim/state")
        assert time.monotonic() - started < 0.1
        started = time.monotonic()
        assert auth(http, sim, "app_id=a1b2c3&app_key=s3cr3t&provider_key=pk123").ok
        assert time.monotonic() - started >= 0.15
        assert http.post(sim.url + "/_sim/latency", json={"latency_ms": 0}).json() == \
            {"latency_ms": 0.0}
        started = time.monotonic()
        assert auth(http, sim, "app_id=a1b2c3&app_key=s3cr3t&provider_key=pk123").ok
        assert time.monotonic() - started < 0.1
        assert http.post(sim.url + "/_sim/latency", json={"latency_ms": -1}).status_code == 400


def test_latency_does_not_serialise_requests(http):
    import concurrent.futures

    with Simulator(spec_config(), latency=0.2) as sim:
        url = sim.url + AUTH_PATH
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: requests.get(url).status_code, range(8)))
        assert statuses == [200] * 8
        assert time.monotonic() - started < 0.8


def test_context_manager_start_stop_and_url():
    sim = Simulator(demo_config(3))
    with sim.start() as same:
        assert same is sim
        url = sim.url
        assert url.startswith("http://127.0.0.1:")
        r = requests.get(url + "/transactions/authorize.xml?app_id=app-0&app_key=key-0"
                               "&provider_key=pk-demo")
        assert r.status_code == 200
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url + "/status", timeout=1)
    with pytest.raises(RuntimeError):
        _ = sim.url
    sim.stop()  # a second stop is harmless
