"""All HTTP to 3scale's Service Management API: authorize, oauth_authorize, report.

The client runs on http.client with one keep-alive connection per worker
thread. Under the GIL the client's CPU per call bounds a flush cycle, and
http.client costs about a quarter of what requests' Session does per call
(README, "Performance"). It keeps requests' promises: timeouts always set, TLS
verified with the system trust store, proxies from ``--backend-proxy`` or
``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``.

Responses are parsed with defusedxml (no DTDs, so no entity expansion) and
read up to MAX_RESPONSE_BYTES; anything that is not the API's XML is a
BackendUnavailable for that call, never a crash.
"""

import base64
import http.client
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
    headers: http.client.HTTPMessage
    body: bytes


def _proxy_for(backend: urllib.parse.SplitResult, proxy_url: Optional[str]) -> Optional[urllib.parse.SplitResult]:
    if proxy_url:
        return urllib.parse.urlsplit(proxy_url)
    if urllib.request.proxy_bypass_environment(backend.hostname):
        return None
    env_proxy = urllib.request.getproxies_environment().get(backend.scheme)
    return urllib.parse.urlsplit(env_proxy) if env_proxy else None


class Transport:
    """Keep-alive HTTP(S) connections to one backend, one per calling thread."""

    def __init__(self, url: str, connect_timeout: float, read_timeout: float,
                 proxy_url: Optional[str] = None, ssl_context: Optional[ssl.SSLContext] = None):
        self.base = urllib.parse.urlsplit(url)
        if self.base.scheme not in ("http", "https") or not self.base.hostname:
            raise ValueError("backend URL must be http(s)://host[:port]")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.base.scheme == "https" else None)
        self.proxy = _proxy_for(self.base, proxy_url)
        self.host_header = self.base.netloc.rpartition("@")[2]
        self.path_prefix = self.base.path.rstrip("/")
        self._local = threading.local()
        self._all: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _proxy_auth(self) -> Dict[str, str]:
        if self.proxy and self.proxy.username:
            user = urllib.parse.unquote(self.proxy.username)
            password = urllib.parse.unquote(self.proxy.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Proxy-Authorization": f"Basic {token}"}
        return {}

    def _new_connection(self) -> http.client.HTTPConnection:
        port = self.base.port or (443 if self.base.scheme == "https" else 80)
        if self.proxy is None:
            target_host, target_port = self.base.hostname, port
        else:
            target_host, target_port = self.proxy.hostname, self.proxy.port or 8080
        if self.base.scheme == "https":
            conn = http.client.HTTPSConnection(target_host, target_port, timeout=self.connect_timeout,
                                               context=self.ssl_context)
            if self.proxy is not None:
                conn.set_tunnel(self.base.hostname, port, headers=self._proxy_auth())
        else:
            conn = http.client.HTTPConnection(target_host, target_port, timeout=self.connect_timeout)
        conn.connect()
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._all.append(conn)
        return conn

    def _drop(self, conn):
        conn.close()
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        self._local.conn = None

    def request(self, method: str, path: str, query: str = "", body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Response:
        target = self.path_prefix + path + ("?" + query if query else "")
        hdrs = {"Host": self.host_header, "User-Agent": f"xcflushd/{__version__}",
                "X-3scale-User-Agent": f"plugin-python-xcflushd-v{__version__}"}
        if self.proxy is not None and self.base.scheme == "http":
            target = f"http://{self.host_header}{target}"
            hdrs.update(self._proxy_auth())
        if headers:
            hdrs.update(headers)
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._local.conn = self._new_connection()
                conn.request(method, target, body=body, headers=hdrs)
                resp = conn.getresponse()
                length = resp.getheader("Content-Length")
                if length is not None and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
                    self._drop(conn)
                    raise BackendUnavailable(f"{path}: HTTP {resp.status} with a {length}-byte body")
                data = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    self._drop(conn)
                    raise BackendUnavailable(f"{path}: HTTP {resp.status} with an oversized body")
                if resp.will_close:
                    self._drop(conn)
                return Response(resp.status, resp.headers, data)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                if conn is not None:
                    self._drop(conn)
                # A reused keep-alive connection may have been closed by the
                # server while idle: one retry on a fresh connection.
                if reused and attempt == 1:
                    continue
                raise BackendUnavailable(f"{path}: connection lost ({type(exc).__name__})") from None
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    self._drop(conn)
                raise BackendUnavailable(f"{path}: {_describe(exc)}") from None
        raise AssertionError("unreachable")

    def close(self):
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or type(exc).__name__})"
    if isinstance(exc, http.client.IncompleteRead):
        return "truncated response"
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
    ctype = resp.headers.get("Content-Type", "")
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
