"""The libcurl transport against real sockets: framing, keep-alive, failures,
proxies from the environment, TLS, and the backend's garbage through the simulator."""

import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
from xcftest import free_port

from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.errors import BackendError, BackendUnavailable
from xcflushd.keys import Credentials
from xcflushd.transport import Engine


class ScriptedServer:
    """Answers each request on a connection with the next canned reply; records what it got."""

    def __init__(self, replies, close_after=None, tls_context=None):
        self.replies = list(replies)
        self.close_after = close_after   # close each connection after N replies
        self.requests = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.tls = tls_context
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        if self.tls:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except ssl.SSLError:
                conn.close()
                return
        served = 0
        buf = b""
        with conn:
            while self.replies:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                reply = self.replies.pop(0)
                try:
                    if callable(reply):
                        reply(conn)
                    else:
                        conn.sendall(reply)
                except OSError:  # the client gave up first (a cap or a deadline hit): its call is what is tested
                    return
                served += 1
                if self.close_after and served >= self.close_after:
                    return

    def close(self):
        self.sock.close()


def transport(port, scheme="http", **kw):
    kw.setdefault("connect_timeout", 2)
    kw.setdefault("read_timeout", 2)
    return Engine(f"{scheme}://127.0.0.1:{port}", **kw)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_content_length_chunked_close_delimited_and_interim_responses():
    server = ScriptedServer([
        OK,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    ])
    t = transport(server.port)
    assert t.request(t.build("GET", "/a")).body == b"ok"
    assert t.request(t.build("GET", "/b")).body == b"abcde"
    assert t.request(t.build("POST", "/c", body=b"x=1")).status == 202
    assert t.request(t.build("GET", "/d")).body == b"until close"
    assert server.connections == 1  # keep-alive held until the close-delimited body
    assert b"Content-Length: 3\r\n" in server.requests[2] and server.requests[2].endswith(b"\r\n\r\nx=1")
    t.close()
    server.close()


def test_stale_keep_alive_connection_is_retried_once():
    server = ScriptedServer([OK, OK], close_after=1)
    t = transport(server.port)
    assert t.request(t.build("GET", "/a")).body == b"ok"
    time.sleep(0.1)  # the server has closed the idle connection
    assert t.request(t.build("GET", "/b")).body == b"ok"
    assert server.connections == 2
    t.close()
    server.close()


@pytest.mark.parametrize("reply,message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "missing"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "HTTP/0.9"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "file size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nabc\r\n0\r\n\r\n", "chunk"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk", "Content-Length"),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", "status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nok", "file size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "head truncated"),  # closed before the blank line
    (b"HTTP/1.1 200 OK\r\n", "head truncated"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * 200000 + b"\r\n\r\n", "too large"),
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n", "proxy refused"),
])
def test_broken_responses_are_errors_for_that_call(reply, message):
    server = ScriptedServer([lambda conn: (conn.sendall(reply), conn.shutdown(socket.SHUT_WR))])
    t = transport(server.port)
    with pytest.raises(BackendUnavailable, match=message):
        t.request(t.build("GET", "/x"))
    t.close()
    server.close()


def test_read_timeout_is_enforced_blocking_and_multiplexed():
    server = ScriptedServer([lambda conn: time.sleep(3)] * 3)
    t = transport(server.port, connect_timeout=0.2, read_timeout=0.3)  # deadline per call: 0.5 s
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="timed out"):
        t.request(t.build("GET", "/slow"))
    outcomes = list(t.request_many([(i, t.build("GET", "/slow")) for i in range(2)], 4))
    assert time.monotonic() - started < 2
    assert sorted(tag for tag, _ in outcomes) == [0, 1]
    assert all(isinstance(o, BackendUnavailable) and "timed out" in str(o) for _, o in outcomes)
    t.close()
    server.close()


def test_connection_refused_is_an_error_not_a_crash():
    t = transport(free_port())
    with pytest.raises(BackendUnavailable):
        t.request(t.build("GET", "/"))
    [(tag, outcome)] = list(t.request_many([("only", t.build("GET", "/"))], 4))
    assert tag == "only" and isinstance(outcome, BackendUnavailable)


def test_request_many_reuses_connections_and_survives_stale_ones():
    server = ScriptedServer([OK] * 40, close_after=5)
    t = transport(server.port)
    outcomes = dict(t.request_many([(i, t.build("GET", f"/{i}")) for i in range(40)], 4))
    assert sorted(outcomes) == list(range(40))
    assert all(getattr(o, "body", None) == b"ok" for o in outcomes.values()), outcomes
    assert server.connections <= 12
    t.close()
    server.close()


def test_http_proxy_gets_absolute_uri():
    proxy = ScriptedServer([OK])
    t = Engine("http://backend.invalid:8080/base", 2, 2, proxy=f"http://127.0.0.1:{proxy.port}")
    assert t.request(t.build("GET", "/transactions/authorize.xml", "a=1")).body == b"ok"
    request = proxy.requests[0]
    assert request.startswith(b"GET http://backend.invalid:8080/base/transactions/authorize.xml?a=1 HTTP/1.1")
    t.close()
    proxy.close()


def test_environment_proxy_and_no_proxy(monkeypatch):
    """Without --backend-proxy, libcurl reads the environment (http_proxy: lower case only)."""
    proxy = ScriptedServer([OK, OK])
    backend = ScriptedServer([OK])
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "localhost")
    via_proxy = Engine("http://backend.invalid:8080", 2, 2)
    assert via_proxy.request(via_proxy.build("GET", "/x")).body == b"ok"
    assert proxy.requests[0].startswith(b"GET http://backend.invalid:8080/x HTTP/1.1")
    direct = Engine(f"http://localhost:{backend.port}", 2, 2)
    assert direct.request(direct.build("GET", "/y")).body == b"ok"
    assert backend.requests[0].startswith(b"GET /y HTTP/1.1") and len(proxy.requests) == 1
    for t in (via_proxy, direct):
        t.close()
    proxy.close()
    backend.close()


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return server_ctx, str(d / "cert.pem")


def test_tls_is_verified(tls_pair):
    server_ctx, ca = tls_pair
    server = ScriptedServer([OK, OK, OK], tls_context=server_ctx)
    t = transport(server.port, scheme="https", ca_file=ca)
    assert t.request(t.build("GET", "/")).body == b"ok"
    [(_, outcome)] = list(t.request_many([(1, t.build("GET", "/"))], 2))
    assert outcome.body == b"ok"
    untrusted = transport(server.port, scheme="https")  # system trust store: self-signed refused
    with pytest.raises(BackendUnavailable, match="certificate"):
        untrusted.request(untrusted.build("GET", "/"))
    t.close()
    untrusted.close()
    server.close()


@pytest.mark.parametrize("kind", ["500", "503_html", "reset", "truncated", "garbage", "empty_4xx", "xml_bomb",
                                  "huge", "wrong_content_type", "timeout"])
def test_backend_garbage_fails_each_call_and_nothing_else(sim, kind):
    sim.backend.set_faults({"rate": 1.0, "kinds": [kind], "endpoints": ["authorize"], "timeout_s": 1.5})
    client = make_client(sim.url, ServiceCredentials("pk-test"), 1, 0.5)
    creds = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
    with pytest.raises(BackendError):
        client.authorize("555", creds)
    outcomes = list(client.authorize_many([(i, "555", creds) for i in range(6)], 3))
    assert len(outcomes) == 6 and all(isinstance(o, BackendError) for _, o in outcomes)
    sim.backend.set_faults({"rate": 0.0})
    assert client.authorize("555", creds).authorized  # the client recovered
    client.close()
