"""All HTTP to 3scale's Service Management API: authorize, oauth_authorize, report.

Under the GIL the client's CPU per call is what bounds a flush cycle (README,
"Performance"): requests' Session spends about 1 ms of CPU per call, the
standard library's http.client 0.26 ms, this module's small HTTP/1.1 client
(one keep-alive connection per worker thread, one buffered reader per
connection) under 0.1 ms. It keeps a full client's promises: timeouts always
set, TLS verified with the system trust store, proxies from
``--backend-proxy`` or ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (CONNECT
tunnels for HTTPS), chunked and close-delimited bodies.

Responses are parsed with defusedxml (no DTDs, so no entity expansion) and
read up to MAX_RESPONSE_BYTES; anything that is not the API's XML is a
BackendUnavailable for that call, never a crash.
"""

import base64
import logging
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from . import __version__
from .defaults import MAX_RESPONSE_BYTES
from .errors import BackendRejected, BackendUnavailable
from .keys import Credentials

log = logging.getLogger(__name__)

EXTENSIONS = "hierarchy=1&rejection_reason_header=1"
LIMITS_EXCEEDED = "limits_exceeded"
_LIMITS_EXCEEDED_TEXT = "usage limits are exceeded"
#: Error codes of an authorize call that are about the application itself.
APPLICATION_ERRORS = frozenset({
    "application_not_found", "user_key_invalid", "authentication_error", "access_token_invalid",
    "metric_invalid", "usage_value_invalid",
})
# Per-call credentials we send on authorize. user_id is never sent: the
# current backend rejects it (decision 2).
_AUTH_PARAMS = ("app_id", "app_key", "user_key", "referrer", "access_token")


class ServiceCredentials:
    """Who we are to the backend: a provider key and/or per-service tokens.

    A service token wins for its service; the provider key covers the rest.
    """

    def __init__(self, provider_key: Optional[str] = None, service_tokens: Optional[Dict[str, str]] = None):
        self._provider_key = provider_key or None
        self._tokens = dict(service_tokens or {})

    def params(self, service_id: str) -> List[Tuple[str, str]]:
        token = self._tokens.get(service_id)
        if token:
            return [("service_token", token), ("service_id", service_id)]
        if self._provider_key:
            return [("provider_key", self._provider_key), ("service_id", service_id)]
        raise BackendRejected(0, "no_credentials", f"no provider key or service token for service {service_id}")

    def __repr__(self):
        key = "set" if self._provider_key else "unset"
        return f"ServiceCredentials(provider_key={key}, services_with_token={sorted(self._tokens)})"


class UsageReport(NamedTuple):
    metric: str
    period: str
    current_value: int
    max_value: int


class AuthStatus(NamedTuple):
    """An authorize answer, reduced to what the authorizer needs."""

    authorized: bool
    reason_code: Optional[str]          # error code, rejection code, or None
    limits_exceeded: bool
    usage_reports: Tuple[UsageReport, ...]
    hierarchy: Dict[str, List[str]]


class Response(NamedTuple):
    status: int
    headers: Dict[str, str]  # names lower-cased
    body: bytes


def _proxy_for(backend: urllib.parse.SplitResult, proxy_url: Optional[str]) -> Optional[urllib.parse.SplitResult]:
    if proxy_url:
        return urllib.parse.urlsplit(proxy_url)
    if urllib.request.proxy_bypass_environment(backend.hostname):
        return None
    env_proxy = urllib.request.getproxies_environment().get(backend.scheme)
    return urllib.parse.urlsplit(env_proxy) if env_proxy else None


class ProtocolError(Exception):
    """The peer did not speak HTTP/1.1 as expected."""


class _Connection:
    """One keep-alive HTTP/1.1 connection: a socket and its buffered reader."""

    __slots__ = ("sock", "rfile")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


class Transport:
    """Keep-alive HTTP/1.1 to one backend, one connection per calling thread.

    A deliberately small client: requests are built in one buffer and sent
    with one call; responses are read with one buffered reader per connection
    (Content-Length, chunked, or until close). That is all the Service
    Management API uses, and it costs a fraction of a general client's CPU.
    """

    def __init__(self, url: str, connect_timeout: float, read_timeout: float,
                 proxy_url: Optional[str] = None, ssl_context: Optional[ssl.SSLContext] = None):
        self.base = urllib.parse.urlsplit(url)
        if self.base.scheme not in ("http", "https") or not self.base.hostname:
            raise ValueError("backend URL must be http(s)://host[:port]")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.https = self.base.scheme == "https"
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.https else None)
        self.port = self.base.port or (443 if self.https else 80)
        self.proxy = _proxy_for(self.base, proxy_url)
        self.host_header = self.base.netloc.rpartition("@")[2]
        self.path_prefix = self.base.path.rstrip("/")
        fixed = {"Host": self.host_header, "User-Agent": f"xcflushd/{__version__}",
                 "X-3scale-User-Agent": f"plugin-python-xcflushd-v{__version__}"}
        if self.proxy is not None and not self.https:
            fixed.update(self._proxy_auth())
        self._fixed_headers = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._local = threading.local()
        self._all: List[_Connection] = []
        self._lock = threading.Lock()

    def _proxy_auth(self) -> Dict[str, str]:
        if self.proxy and self.proxy.username:
            user = urllib.parse.unquote(self.proxy.username)
            password = urllib.parse.unquote(self.proxy.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Proxy-Authorization": f"Basic {token}"}
        return {}

    def _connect(self) -> _Connection:
        if self.proxy is None:
            address = (self.base.hostname, self.port)
        else:
            address = (self.proxy.hostname, self.proxy.port or 8080)
        sock = socket.create_connection(address, timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.proxy is not None and self.https:
                self._tunnel(sock)
            if self.https:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.base.hostname)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        conn = _Connection(sock)
        with self._lock:
            self._all.append(conn)
        return conn

    def _tunnel(self, sock: socket.socket) -> None:
        """CONNECT through the proxy, so TLS runs end to end with the backend."""
        target = f"{self.base.hostname}:{self.port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in self._proxy_auth().items())
        sock.sendall((head + "\r\n").encode("latin-1"))
        reader = sock.makefile("rb", buffering=0)  # unbuffered: TLS bytes must stay in the socket
        status = _status_line(_readline(reader))
        while _readline(reader) not in (b"\r\n", b"\n"):
            pass
        if status != 200:
            raise ProtocolError(f"proxy refused the tunnel (HTTP {status})")

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        self._local.conn = None

    def request(self, method: str, path: str, query: str = "", body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Response:
        target = self.path_prefix + path + ("?" + query if query else "")
        if self.proxy is not None and not self.https:
            target = f"http://{self.host_header}{target}"
        head = f"{method} {target} HTTP/1.1\r\n{self._fixed_headers}"
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        data = (head + "\r\n").encode("latin-1") + (body or b"")
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._local.conn = self._connect()
                conn.sock.sendall(data)
                response, keep_alive = _read_response(conn.rfile, method)
            except (ConnectionResetError, BrokenPipeError, _ClosedBeforeResponse) as exc:
                if conn is not None:
                    self._drop(conn)
                # A reused keep-alive connection may have been closed by the
                # server while idle: one retry on a fresh connection.
                if reused and attempt == 1:
                    continue
                raise BackendUnavailable(f"{path}: connection lost ({type(exc).__name__})") from None
            except (OSError, ProtocolError, ValueError) as exc:
                if conn is not None:
                    self._drop(conn)
                raise BackendUnavailable(f"{path}: {_describe(exc)}") from None
            if not keep_alive:
                self._drop(conn)
            return response
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


class _ClosedBeforeResponse(ConnectionError):
    """The server closed the connection without answering (typical of an idle keep-alive)."""


_MAX_LINE = 65536
_MAX_HEADERS = 100


def _readline(reader) -> bytes:
    line = reader.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise ProtocolError("header line too long")
    return line


def _status_line(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError("not an HTTP/1.x status line")
    return int(parts[1])


def _read_response(reader, method: str) -> Tuple[Response, bool]:
    """Read one response. Returns it and whether the connection can be reused."""
    while True:
        line = _readline(reader)
        if not line:
            raise _ClosedBeforeResponse()
        status = _status_line(line)
        http10 = line.startswith(b"HTTP/1.0")
        headers: Dict[str, str] = {}
        while True:
            line = _readline(reader)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ProtocolError("truncated response headers")
            if len(headers) >= _MAX_HEADERS:
                raise ProtocolError("too many response headers")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break  # 1xx interim responses are skipped
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" if http10 else connection != "close"
    if method == "HEAD" or status in (204, 304):
        return Response(status, headers, b""), keep_alive
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Response(status, headers, _read_chunked(reader)), keep_alive
    length = headers.get("content-length")
    if length is None:
        return Response(status, headers, _read_capped(reader)), False
    if not length.isdigit():
        raise ProtocolError("bad Content-Length")
    size = int(length)
    if size > MAX_RESPONSE_BYTES:
        raise ProtocolError(f"HTTP {status} with a {size}-byte body")
    data = reader.read(size)
    if len(data) < size:
        raise ProtocolError("truncated response")
    return Response(status, headers, data), keep_alive


def _read_capped(reader) -> bytes:
    data = reader.read(MAX_RESPONSE_BYTES + 1)
    if len(data) > MAX_RESPONSE_BYTES:
        raise ProtocolError("oversized body")
    return data


def _read_chunked(reader) -> bytes:
    chunks, total = [], 0
    while True:
        size_line = _readline(reader).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise ProtocolError("bad chunk size") from None
        if size == 0:
            while _readline(reader) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        total += size
        if total > MAX_RESPONSE_BYTES:
            raise ProtocolError("oversized body")
        chunk = reader.read(size)
        if len(chunk) < size:
            raise ProtocolError("truncated response")
        chunks.append(chunk)
        reader.read(2)  # CRLF after the chunk


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    return text[:120]


def _parse_xml(body: bytes, what: str):
    try:
        return fromstring(body, forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError) as exc:
        raise BackendUnavailable(f"{what}: unparsable XML ({type(exc).__name__})") from None


def _error_from(resp: Response, what: str) -> BackendRejected:
    code, message = "", ""
    if resp.body.strip():
        try:
            root = _parse_xml(resp.body, what)
            if root.tag == "error":
                code, message = root.get("code", ""), (root.text or "")[:200]
        except BackendUnavailable:
            message = "body is not an error document"
    return BackendRejected(resp.status, code, _scrub(message))


def _scrub(message: str) -> str:
    # Error messages quote the provider key or service token that failed
    # (e.g. 'provider key "K" is invalid'): never let those reach a log.
    start = message.find('"')
    if start != -1 and any(w in message[:start] for w in ("provider key", "service token")):
        return message[:start] + '"..."' + message[message.find('"', start + 1) + 1:]
    return message


def parse_status(resp: Response) -> AuthStatus:
    """Turn an authorize/oauth_authorize response into an AuthStatus or raise."""
    what = "authorize"
    if resp.status >= 500 or resp.status < 200 or 300 <= resp.status < 400:
        raise BackendUnavailable(f"{what}: HTTP {resp.status}")
    if resp.status != 409 and resp.status >= 400:
        err = _error_from(resp, what)
        if err.code in APPLICATION_ERRORS:
            return AuthStatus(False, err.code, False, (), {})
        # Anything else (our own credentials, a malformed request, an empty
        # body) says nothing about the application: no denial gets cached.
        raise err
    ctype = resp.headers.get("content-type", "")
    if "xml" not in ctype:
        raise BackendUnavailable(f"{what}: HTTP {resp.status} with content type {ctype[:60]!r}")
    root = _parse_xml(resp.body, what)
    authorized_el = root.find("authorized") if root.tag == "status" else None
    if authorized_el is None or authorized_el.text not in ("true", "false"):
        raise BackendUnavailable(f"{what}: HTTP {resp.status} without a status document")
    authorized = authorized_el.text == "true"
    reports = []
    for el in root.iterfind("usage_reports/usage_report"):
        try:
            reports.append(UsageReport(el.get("metric"), el.get("period"),
                                       int(el.findtext("current_value")), int(el.findtext("max_value"))))
        except (TypeError, ValueError):
            raise BackendUnavailable(f"{what}: malformed usage_report") from None
    hierarchy: Dict[str, List[str]] = {}
    for el in root.iterfind("hierarchy/metric"):
        name = el.get("name")
        if name:
            hierarchy[name] = (el.get("children") or "").split()
    reason_code = None
    limits = False
    if not authorized:
        reason_code = resp.headers.get("3scale-rejection-reason") or None
        limits = reason_code == LIMITS_EXCEEDED or (root.findtext("reason") or "").lower() == _LIMITS_EXCEEDED_TEXT
        if limits:
            reason_code = LIMITS_EXCEEDED
    return AuthStatus(authorized, reason_code, limits, tuple(reports), hierarchy)


_warned_user_id = False


def _warn_user_id_once():
    global _warned_user_id
    if not _warned_user_id:
        _warned_user_id = True
        log.warning("credentials carry user_id, which the current backend rejects: it is not sent")


class BackendClient:
    """The three calls xcflushd makes. Thread-safe; share one per process."""

    def __init__(self, transport: Transport, service_credentials: ServiceCredentials):
        self.transport = transport
        self.service_credentials = service_credentials
        self.calls = {"authorize": 0, "report": 0}  # approximate under threads; for STATUS/bench

    def authorize(self, service_id: str, creds: Credentials) -> AuthStatus:
        params = []
        for name, value in creds.items():
            if name in _AUTH_PARAMS:
                params.append((name, value))
            elif name == "user_id":
                _warn_user_id_once()
        params += self.service_credentials.params(service_id)
        path = "/transactions/oauth_authorize.xml" if creds.oauth else "/transactions/authorize.xml"
        self.calls["authorize"] += 1
        resp = self.transport.request("GET", path, urllib.parse.urlencode(params, errors="surrogateescape"),
                                      headers={"3scale-options": EXTENSIONS})
        return parse_status(resp)

    def report(self, service_id: str, transactions: Sequence[Tuple[Credentials, Dict[str, int]]]) -> None:
        """Report one service's transactions in one call. Returns on 2xx, raises otherwise."""
        params = self.service_credentials.params(service_id)
        for i, (creds, usage) in enumerate(transactions):
            params.extend(transaction_params(i, creds, usage))
        body = urllib.parse.urlencode(params, errors="surrogateescape").encode()
        self.calls["report"] += 1
        resp = self.transport.request("POST", "/transactions.xml", body=body,
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        if 200 <= resp.status < 300:
            return
        if 400 <= resp.status < 500:
            raise _error_from(resp, "report")
        raise BackendUnavailable(f"report: HTTP {resp.status}")

    def close(self):
        self.transport.close()


def transaction_params(i: int, creds: Credentials, usage: Dict[str, int]) -> List[Tuple[str, str]]:
    params = []
    app_id, user_key = creds.get("app_id"), creds.get("user_key")
    if app_id is not None:
        params.append((f"transactions[{i}][app_id]", app_id))
    if user_key is not None:
        params.append((f"transactions[{i}][user_key]", user_key))
    if app_id is None and user_key is None and creds.oauth:
        params.append((f"transactions[{i}][access_token]", creds.get("access_token")))
    if creds.get("user_id") is not None:
        _warn_user_id_once()
    params.extend((f"transactions[{i}][usage][{m}]", str(v)) for m, v in usage.items())
    return params


def make_client(url: str, service_credentials: ServiceCredentials, connect_timeout: float,
                read_timeout: float, proxy_url: Optional[str] = None) -> BackendClient:
    return BackendClient(Transport(url, connect_timeout, read_timeout, proxy_url), service_credentials)


def monotonic_ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)
