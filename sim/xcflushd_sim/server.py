"""HTTP front of the simulator: routes, wire details, fault execution, control endpoints.

3scale endpoints (``application/vnd.3scale-v2.0+xml`` on every answer)::

    GET  /transactions/authorize.xml         200/409 status XML, 4xx error XML
    GET  /transactions/oauth_authorize.xml   same, with the <application> section
    POST /transactions.xml                   202, empty body (4xx error XML for the envelope)
    GET  /transactions/errors.xml            dropped report batches of the caller's service
    DELETE /transactions/errors.xml          ... and forget them
    GET  /status   GET /check.txt   HEAD /available

Anything else is a 404 with an empty body. Control endpoints, JSON, not part of 3scale::

    GET  /_sim/state      ledgers, counters, errors (see Backend.state)
    POST /_sim/reset      forget usage/ledgers/counters/errors, keep config and faults
    GET|POST /_sim/faults     read / replace the fault config (JSON body)
    GET|POST /_sim/config     read / replace the backend config (JSON body)
    GET|POST /_sim/latency    read / set {"latency_ms": N}

Wire choices, for speed and for clients that care: HTTP/1.1 keep-alive, TCP_NODELAY, every
answer written with one ``send`` and a ``Content-Length``, no per-request log line unless the
logger is at DEBUG. Each connection has its own thread, so a held ("timeout") or slow
(latency) request never blocks another one.
"""

import json
import logging
import socket
import ssl
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterable, Optional, Tuple

from . import errors
from .config import ConfigError
from .errors import EmptyReply, SimError
from .faults import GARBAGE_BODY, HTML_503_BODY, INTERNAL_ERROR_BODY, XML_BOMB_BODY
from .model import Backend
from .params import flag, no_body, parse_nested, parse_options_header
from .xmldoc import error_document, errors_list_document, status_document

__all__ = ["Simulator"]

log = logging.getLogger(__name__)

XML_TYPE = "application/vnd.3scale-v2.0+xml"
JSON_TYPE = "application/json"
IDLE_TIMEOUT_S = 120.0
"""An idle keep-alive connection is closed after this long (and its thread ends)."""
MAX_BODY = 64 * 1024 * 1024
"""Larger request bodies are refused with 413 without being read."""

_REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request",
            403: "Forbidden", 404: "Not Found", 409: "Conflict", 411: "Length Required",
            413: "Payload Too Large", 422: "Unprocessable Entity",
            500: "Internal Server Error", 503: "Service Unavailable"}
_STATUS_JSON = json.dumps({"status": "ok", "version": {"backend": "xcflushd-sim"}}).encode()
_LINGER_RST = struct.pack("ii", 1, 0)

Reply = Tuple[int, str, bytes, Iterable[Tuple[str, str]]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A burst of new connections (a client pool filling up) must not overflow the backlog:
    # a dropped SYN costs the client a one-second retransmit.
    request_queue_size = 1024

    def __init__(self, address: Tuple[str, int], sim: "Simulator"):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.sim = sim
        self.connections: set = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self):
        conn, addr = super().get_request()
        if self.sim.tls is not None:
            # The handshake happens on the first read, in the connection's own thread:
            # a client that never speaks TLS holds only that thread, not the accept loop.
            conn = self.sim.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr


class _Headers(dict):
    """Request headers by lower-cased name; ``get`` is case-insensitive like the stdlib's."""

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    server: _Server

    # --- connection bookkeeping, so that stop() can close idle keep-alive connections ---

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def parse_request(self) -> bool:
        """Parse the request line and headers without the ``email`` package.

        The stdlib parses headers with ``email.feedparser``, about half of this server's
        CPU per request; a dict of lower-cased names is all the routes need.
        """
        self.command = ""
        self.request_version = version = "HTTP/1.1"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.send_error(400, "Bad request line")
            return False
        self.command, self.path, self.request_version = words
        version = words[2]
        headers = _Headers()
        while True:
            line = self.rfile.readline(65537)
            if len(line) > 65536 or len(headers) > 100:
                self.send_error(431, "Request header fields too large")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("iso-8859-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers = headers  # type: ignore[assignment]
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.close_connection = connection != "keep-alive"
        else:
            self.close_connection = connection == "close"
            if headers.get("expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), format % args)

    # --- dispatch -------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        body = self._read_body()
        if body is None:
            return
        path, _, query = self.path.partition("?")
        route = _ROUTES.get((method if method != "HEAD" else "GET", path))
        if route is None:
            # HEAD /available is the load balancer's liveness probe; the rest is not found.
            available = (method, path) == ("HEAD", "/available")
            reply: Optional[Reply] = (200 if available else 404, XML_TYPE, b"", ())
        else:
            reply = route(self, query.encode("latin-1"), body)
        if reply is not None:
            self._send(*reply, head=method == "HEAD")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %s in %.1f ms", method, self.path,
                      reply[0] if reply else "-", (time.perf_counter() - started) * 1000)

    def _read_body(self) -> Optional[bytes]:
        """Read the request body (Content-Length or chunked); None when already answered."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            size = 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    n = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    self._send(400, "text/plain", b"bad chunked encoding\n", ())
                    return None
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                size += n
                if size > MAX_BODY:
                    self.close_connection = True
                    self._send(413, "text/plain", b"request body too large\n", ())
                    return None
                chunks.append(self.rfile.read(n))
                self.rfile.readline(1024)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            self.close_connection = True
            self._send(413 if n > 0 else 400, "text/plain", b"bad Content-Length\n", ())
            return None
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, ctype: str, body: bytes, headers: Iterable[Tuple[str, str]],
              head: bool = False) -> None:
        """Write status line, headers and body with a single send."""
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        if ctype:
            lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in headers)
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(data if head else data + body)

    # --- the 3scale endpoints --------------------------------------------------------------

    def _authorize(self, query: bytes, body: bytes) -> Optional[Reply]:
        return self._transaction("authorize", query, body)

    def _oauth_authorize(self, query: bytes, body: bytes) -> Optional[Reply]:
        return self._transaction("oauth_authorize", query, body)

    def _report(self, query: bytes, body: bytes) -> Optional[Reply]:
        return self._transaction("report", query, body)

    def _transaction(self, endpoint: str, query: bytes, body: bytes) -> Optional[Reply]:
        """Count, delay, maybe inject a fault, else answer as the backend would."""
        sim = self.server.sim
        backend = sim.backend
        backend.record_call(endpoint)
        if sim.latency > 0:
            # Waits on the stop event rather than sleeping, so stop() is never held up.
            sim._stopping.wait(sim.latency)
        kind = backend.pick_fault(endpoint)
        if kind is None:
            reply = self._answer(endpoint, query, body)
        else:
            reply = self._fault(kind, endpoint, query, body)
        if reply is not None:
            backend.record_status(endpoint, reply[0])
        return reply

    def _answer(self, endpoint: str, query: bytes, body: bytes,
                acknowledged: bool = True) -> Reply:
        backend = self.server.sim.backend
        params: Optional[Dict[str, Any]] = None
        ext = parse_options_header(self.headers.get("3scale-options"))
        try:
            if endpoint == "report":
                media_type = (self.headers.get("Content-Type") or "").split(";", 1)[0]
                media_type = media_type.strip().lower()
                if media_type and media_type not in ("application/x-www-form-urlencoded",
                                                     "multipart/form-data"):
                    raise errors.content_type_invalid(media_type)
                params = parse_nested(query)
                if media_type != "multipart/form-data":  # multipart bodies are not parsed
                    params.update(parse_nested(body))
                backend.report(params, ext, acknowledged=acknowledged)
                return 202, XML_TYPE, b"", ()
            params = parse_nested(query)
            status = backend.authorize(params, ext, oauth=endpoint == "oauth_authorize")
        except SimError as err:
            return self._error(err, ext, params)
        headers = []
        if not status.authorized and flag(ext, "rejection_reason_header"):
            headers.append(("3scale-rejection-reason", status.denial.code))
        document = b"" if no_body(ext, params) else status_document(status)
        return (200 if status.authorized else 409), XML_TYPE, document, headers

    @staticmethod
    def _error(err: SimError, ext: Dict[str, Any], params: Optional[Dict[str, Any]]) -> Reply:
        if isinstance(err, EmptyReply) or no_body(ext, params):
            return err.http_status, XML_TYPE, b"", ()
        return err.http_status, XML_TYPE, error_document(err), ()

    def _fault(self, kind: str, endpoint: str, query: bytes, body: bytes) -> Optional[Reply]:
        """Execute an injected fault; None when the connection was dropped unanswered."""
        if kind == "500":
            return 500, "text/plain", INTERNAL_ERROR_BODY, ()
        if kind == "503_html":
            return 503, "text/html", HTML_503_BODY, ()
        if kind == "empty_4xx":
            return 403, XML_TYPE, b"", ()
        if kind == "garbage":
            return 200, XML_TYPE, GARBAGE_BODY, ()
        if kind == "xml_bomb":
            return 200, XML_TYPE, XML_BOMB_BODY, ()
        if kind == "huge":
            return 200, XML_TYPE, self.server.sim.backend.faults.huge, ()
        if kind == "truncated":
            status, ctype, document, headers = self._answer(endpoint, query, body)
            return status, ctype, document[: len(document) // 2], headers
        if kind == "wrong_content_type":
            status, _, document, headers = self._answer(endpoint, query, body)
            return status, "text/html; charset=utf-8", document, headers
        if kind == "timeout":
            self.server.sim._stopping.wait(self.server.sim.backend.faults.timeout_s)
            self.close_connection = True
            return None
        if kind == "report_applied_then_reset":
            self._answer(endpoint, query, body, acknowledged=False)
        self._reset_connection()  # "reset", "report_applied_then_reset"
        return None

    def _reset_connection(self) -> None:
        """Abort the connection: with SO_LINGER 0, close() sends an RST, not a FIN."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            # rfile holds a reference to the socket; close() only closes the fd once that
            # reference is gone.
            self.rfile.close()
            self.connection.close()
        except OSError:
            pass

    def _transaction_errors(self, query: bytes, body: bytes) -> Reply:
        params: Optional[Dict[str, Any]] = None
        try:
            params = parse_nested(query)
            found = self.server.sim.backend.transaction_errors(
                params, delete=self.command == "DELETE")
        except SimError as err:
            return self._error(err, {}, params)
        if self.command == "DELETE":
            return 200, XML_TYPE, b"", ()
        return 200, XML_TYPE, errors_list_document(found), ()

    def _status(self, query: bytes, body: bytes) -> Reply:
        return 200, JSON_TYPE, _STATUS_JSON, ()

    def _check(self, query: bytes, body: bytes) -> Reply:
        return 200, "text/plain", b"ok", ()

    # --- control endpoints -----------------------------------------------------------------

    @staticmethod
    def _json(status: int, document: Any) -> Reply:
        return status, JSON_TYPE, json.dumps(document, sort_keys=True).encode(), ()

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise ValueError(f"body is not JSON: {exc}") from None

    def _sim_state(self, query: bytes, body: bytes) -> Reply:
        return self._json(200, self.server.sim.backend.state())

    def _sim_reset(self, query: bytes, body: bytes) -> Reply:
        self.server.sim.backend.reset()
        return self._json(200, {"ok": True})

    def _sim_faults(self, query: bytes, body: bytes) -> Reply:
        backend = self.server.sim.backend
        if self.command == "GET":
            return self._json(200, backend.faults.spec)
        try:
            return self._json(200, backend.set_faults(self._json_body(body)))
        except ValueError as exc:
            return self._json(400, {"error": str(exc)})

    def _sim_config(self, query: bytes, body: bytes) -> Reply:
        backend = self.server.sim.backend
        if self.command == "GET":
            return self._json(200, backend.config())
        try:
            backend.configure(self._json_body(body))
        except (ValueError, ConfigError) as exc:
            return self._json(400, {"error": str(exc)})
        return self._json(200, {"ok": True})

    def _sim_latency(self, query: bytes, body: bytes) -> Reply:
        sim = self.server.sim
        if self.command == "POST":
            try:
                latency_ms = self._json_body(body)["latency_ms"]
                if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) \
                        or latency_ms < 0:
                    raise ValueError("latency_ms must be a number >= 0")
            except (ValueError, KeyError, TypeError) as exc:
                return self._json(400, {"error": f"expected {{\"latency_ms\": N}}: {exc}"})
            sim.latency = latency_ms / 1000.0
        return self._json(200, {"latency_ms": sim.latency * 1000.0})


_ROUTES = {
    ("GET", "/transactions/authorize.xml"): _Handler._authorize,
    ("GET", "/transactions/oauth_authorize.xml"): _Handler._oauth_authorize,
    ("POST", "/transactions.xml"): _Handler._report,
    ("GET", "/transactions/errors.xml"): _Handler._transaction_errors,
    ("DELETE", "/transactions/errors.xml"): _Handler._transaction_errors,
    ("GET", "/status"): _Handler._status,
    ("GET", "/check.txt"): _Handler._check,
    ("GET", "/_sim/state"): _Handler._sim_state,
    ("POST", "/_sim/reset"): _Handler._sim_reset,
    ("GET", "/_sim/faults"): _Handler._sim_faults,
    ("POST", "/_sim/faults"): _Handler._sim_faults,
    ("GET", "/_sim/config"): _Handler._sim_config,
    ("POST", "/_sim/config"): _Handler._sim_config,
    ("GET", "/_sim/latency"): _Handler._sim_latency,
    ("POST", "/_sim/latency"): _Handler._sim_latency,
}


class Simulator:
    """A 3scale backend on a local port, served from a background thread.

    ``latency`` (seconds) delays every 3scale call; ``faults`` is a fault config
    (:mod:`xcflushd_sim.faults`); ``clock`` (POSIX seconds) fixes the backend's time for
    exact period boundaries in tests. ``backend`` is the thread-safe :class:`Backend`.
    ``tls`` (a server-side ``ssl.SSLContext``) serves HTTPS instead of HTTP.
    """

    def __init__(self, config: Dict[str, Any], host: str = "127.0.0.1", port: int = 0,
                 latency: float = 0.0, faults: Optional[Dict[str, Any]] = None,
                 clock=None, tls: Optional[ssl.SSLContext] = None):
        self.backend = Backend(config, clock=clock)
        self.tls = tls
        if faults:
            self.backend.set_faults(faults)
        self.latency = float(latency)
        self._address = (host, port)
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    def start(self) -> "Simulator":
        """Bind and serve in a daemon thread; returns self (OSError if the bind fails)."""
        if self._server is None:
            self._stopping.clear()
            self._server = _Server(self._address, self)
            # stop() waits for the accept loop to notice; a short poll keeps test teardown
            # fast, and 50 wake-ups a second cost nothing measurable.
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.02},
                                            name="xcflushd-backend-sim", daemon=True)
            self._thread.start()
        return self

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the bound port, also when started with port 0); https with ``tls``."""
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        host, port = self._server.server_address[:2]
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and drop open connections (held "timeout" requests end at once)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            connections = list(server.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
