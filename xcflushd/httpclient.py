"""A small HTTP/1.1 client for one backend: blocking calls and multiplexed batches.

Under the GIL the client's CPU per call and its thread hand-offs are what
bound a flush cycle (README, "Performance"). So requests are built in one
buffer and sent with one call, responses parsed incrementally from a buffer,
and a flush cycle's thousands of calls run from ONE thread over many
keep-alive connections with a selector (``request_many``): no thread
hand-off per call, about 0.1 ms of CPU per call against 1 ms for requests'
Session. The priority path uses ``request`` from its worker threads, one
keep-alive connection per thread.

It keeps a full client's promises: timeouts always set (connect, and a
deadline per response), TLS verified with the system trust store, proxies
from ``--backend-proxy`` or ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``
(CONNECT tunnels for HTTPS), Content-Length, chunked and close-delimited
bodies, and capped sizes. Failures raise or yield BackendUnavailable with a
message that never holds the request (query strings carry credentials).
"""

import base64
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

from . import __version__, metrics
from .defaults import MAX_RESPONSE_BYTES
from .errors import BackendUnavailable

_MAX_HEAD = 65536
_MAX_HEADERS = 100


class Response(NamedTuple):
    status: int
    headers: Dict[str, str]  # names lower-cased
    body: bytes


class Request(NamedTuple):
    method: str
    path: str              # for error messages: never the query
    data: bytes            # the whole request, ready to send
    weight: int = 1        # what it holds (e.g. transactions), for request_many's max_weight


class ProtocolError(Exception):
    """The peer did not speak HTTP/1.1 as expected."""


class _ClosedBeforeResponse(ConnectionError):
    """The server closed the connection without answering (typical of an idle keep-alive)."""


class ResponseParser:
    """Incremental response parser: ``feed`` bytes until it returns the response.

    Returns ``(response, keep_alive)``; ``eof()`` completes a body delimited by
    the connection's close.
    """

    def __init__(self, method: str):
        self.method = method
        self.buf = bytearray()
        self.status: Optional[int] = None
        self.headers: Dict[str, str] = {}
        self.keep_alive = True
        self.mode = ""           # "length", "chunked", "close" or "none"
        self.length = 0
        self.chunks: List[bytes] = []
        self.received = 0

    def feed(self, data: bytes) -> Optional[Tuple[Response, bool]]:
        self.buf += data
        self.received += len(data)
        while self.status is None:
            if not self._head():
                return None
        return self._body()

    def eof(self) -> Tuple[Response, bool]:
        if self.received == 0:
            raise _ClosedBeforeResponse()
        if self.status is not None and self.mode == "close":
            return Response(self.status, self.headers, bytes(self.buf)), False
        raise ProtocolError("truncated response")

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                raise ProtocolError("response head too large")
            return False
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError("not an HTTP/1.x status line")
        if len(lines) > _MAX_HEADERS:
            raise ProtocolError("too many response headers")
        status = int(parts[1])
        if status < 200:
            return True  # 1xx interim response: read the next head
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        self.keep_alive = connection == "keep-alive" if parts[0] == "HTTP/1.0" else connection != "close"
        if self.method == "HEAD" or status in (204, 304):
            self.mode = "none"
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.mode = "chunked"
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise ProtocolError("bad Content-Length")
            self.mode, self.length = "length", int(length)
            if self.length > MAX_RESPONSE_BYTES:
                raise ProtocolError(f"HTTP {status} with a {self.length}-byte body")
        else:
            self.mode, self.keep_alive = "close", False
        self.status, self.headers = status, headers
        return True

    def _body(self) -> Optional[Tuple[Response, bool]]:
        if self.mode == "none":
            return self._done(b"")
        if self.mode == "length":
            if len(self.buf) < self.length:
                return None
            if len(self.buf) > self.length:
                self.keep_alive = False  # bytes nobody asked for: do not reuse the connection
            return self._done(bytes(self.buf[:self.length]))
        if self.mode == "close":
            if len(self.buf) > MAX_RESPONSE_BYTES:
                raise ProtocolError("oversized body")
            return None
        return self._chunked()

    def _chunked(self) -> Optional[Tuple[Response, bool]]:
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return None
            try:
                size = int(bytes(self.buf[:line_end]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0 and self.buf[line_end + 2:line_end + 4] != b"\r\n":
                    return None
                return self._done(b"".join(self.chunks))
            if len(self.buf) < line_end + 2 + size + 2:
                return None
            self.chunks.append(bytes(self.buf[line_end + 2:line_end + 2 + size]))
            del self.buf[:line_end + 2 + size + 2]
            if sum(map(len, self.chunks)) > MAX_RESPONSE_BYTES:
                raise ProtocolError("oversized body")

    def _done(self, body: bytes) -> Tuple[Response, bool]:
        return Response(self.status, self.headers, body), self.keep_alive


def _proxy_for(backend: urllib.parse.SplitResult, proxy_url: Optional[str]) -> Optional[urllib.parse.SplitResult]:
    if proxy_url:
        return urllib.parse.urlsplit(proxy_url)
    if urllib.request.proxy_bypass_environment(backend.hostname):
        return None
    env_proxy = urllib.request.getproxies_environment().get(backend.scheme)
    return urllib.parse.urlsplit(env_proxy) if env_proxy else None


_ENDPOINTS = {"/transactions/authorize.xml": "authorize", "/transactions/oauth_authorize.xml": "oauth_authorize",
              "/transactions.xml": "report"}


def _metered(path: str, outcome, started: float) -> None:
    """Count one finished backend call (xcflushd_backend_requests_total)."""
    endpoint = _ENDPOINTS.get(path)
    if endpoint is not None:
        metrics.backend_call(endpoint, outcome.status if isinstance(outcome, Response) else None,
                             time.monotonic() - started)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or type(exc).__name__})"
    if isinstance(exc, _ClosedBeforeResponse):
        return "connection closed before a response"
    return (str(exc) or type(exc).__name__)[:120]


class Transport:
    """Keep-alive HTTP/1.1 to one backend."""

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
        self._idle: List[socket.socket] = []   # request_many's keep-alive connections
        self._open: set = set()
        self._lock = threading.Lock()

    # ---- building -----------------------------------------------------------

    def build(self, method: str, path: str, query: str = "", body: Optional[bytes] = None,
              headers: Optional[Dict[str, str]] = None, weight: int = 1) -> Request:
        target = self.path_prefix + path + ("?" + query if query else "")
        if self.proxy is not None and not self.https:
            target = f"http://{self.host_header}{target}"
        head = f"{method} {target} HTTP/1.1\r\n{self._fixed_headers}"
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        return Request(method, path, (head + "\r\n").encode("latin-1") + (body or b""), weight)

    # ---- connections ----------------------------------------------------------

    def _proxy_auth(self) -> Dict[str, str]:
        if self.proxy and self.proxy.username:
            user = urllib.parse.unquote(self.proxy.username)
            password = urllib.parse.unquote(self.proxy.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Proxy-Authorization": f"Basic {token}"}
        return {}

    def _connect(self) -> socket.socket:
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
        with self._lock:
            self._open.add(sock)
        return sock

    def _tunnel(self, sock: socket.socket) -> None:
        """CONNECT through the proxy, so TLS runs end to end with the backend."""
        target = f"{self.base.hostname}:{self.port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in self._proxy_auth().items())
        sock.sendall((head + "\r\n").encode("latin-1"))
        buf = b""
        while b"\r\n\r\n" not in buf:  # byte by byte: TLS bytes after the head must stay in the socket
            byte = sock.recv(1)
            if not byte or len(buf) > _MAX_HEAD:
                raise ProtocolError("proxy closed the tunnel request")
            buf += byte
        parts = buf.split(None, 2)
        if len(parts) < 2 or parts[1] != b"200":
            raise ProtocolError("proxy refused the tunnel")

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        sock.close()

    def close(self) -> None:
        with self._lock:
            socks, self._open, self._idle = list(self._open), set(), []
        for sock in socks:
            sock.close()

    # ---- one call, blocking ---------------------------------------------------

    def request(self, req: Request) -> Response:
        """One call on this thread's keep-alive connection; raises BackendUnavailable."""
        started = time.monotonic()
        try:
            response = self._request(req)
        except BackendUnavailable as exc:
            _metered(req.path, exc, started)
            raise
        _metered(req.path, response, started)
        return response

    def _request(self, req: Request) -> Response:
        for attempt in (1, 2):
            sock = getattr(self._local, "sock", None)
            reused = sock is not None
            try:
                if sock is None:
                    sock = self._local.sock = self._connect()
                sock.settimeout(self.read_timeout)
                sock.sendall(req.data)
                parser = ResponseParser(req.method)
                # A deadline for the whole answer, as request_many has: a server that
                # trickles a byte now and then must not hold a priority worker forever.
                deadline = time.monotonic() + self.read_timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout("timed out")
                    sock.settimeout(left)
                    data = sock.recv(65536)
                    done = parser.feed(data) if data else parser.eof()
                    if done:
                        break
            except (ConnectionResetError, BrokenPipeError, _ClosedBeforeResponse) as exc:
                self._forget_local(sock)
                if reused and attempt == 1:
                    continue  # an idle keep-alive closed by the server: once more, on a fresh one
                raise BackendUnavailable(f"{req.path}: {_describe(exc)}") from None
            except (OSError, ProtocolError, ValueError) as exc:
                self._forget_local(sock)
                raise BackendUnavailable(f"{req.path}: {_describe(exc)}") from None
            response, keep_alive = done
            if not keep_alive:
                self._forget_local(sock)
            return response
        raise AssertionError("unreachable")

    def _forget_local(self, sock: Optional[socket.socket]) -> None:
        if sock is not None:
            self._close(sock)
        self._local.sock = None

    # ---- many calls, multiplexed ------------------------------------------------

    def request_many(self, requests: Iterable[Tuple[Any, Request]], concurrency: int,
                     max_weight: Optional[int] = None, on_idle: Optional[Callable[[], None]] = None
                     ) -> Iterator[Tuple[Any, Union[Response, BackendUnavailable]]]:
        """``_request_many``, each call counted in the metrics as it finishes."""
        def timed():
            for tag, req in requests:
                yield (tag, req.path, time.monotonic()), req  # taken when the call starts

        calls = self._request_many(timed(), concurrency, max_weight, on_idle)
        try:
            for (tag, path, started), outcome in calls:
                _metered(path, outcome, started)
                yield tag, outcome
        finally:
            calls.close()

    def _request_many(self, requests: Iterable[Tuple[Any, Request]], concurrency: int,
                      max_weight: Optional[int] = None, on_idle: Optional[Callable[[], None]] = None
                      ) -> Iterator[Tuple[Any, Union[Response, BackendUnavailable]]]:
        """Run calls concurrently from this thread; yield ``(tag, response or error)`` as they finish.

        At most ``concurrency`` calls are in flight, and, when ``max_weight``
        is given, no new one starts while their weights add up to it (the
        caller holds what each call carries until it finishes). ``requests``
        is consumed lazily, so it may read its input as it goes. ``on_idle``
        runs whenever nothing is ready and the loop is about to wait.
        """
        selector = selectors.DefaultSelector()
        in_flight: Dict[socket.socket, _Call] = {}
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < concurrency and (
                        max_weight is None or sum(c.request.weight for c in in_flight.values()) < max_weight):
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    failure = self._start(_Call(*item), selector, in_flight)
                    if failure:
                        yield failure
                if not in_flight:
                    return
                now = time.monotonic()
                wait = max(0.0, min(call.deadline for call in in_flight.values()) - now)
                events = selector.select(0)
                if not events:
                    if on_idle is not None:
                        on_idle()
                    events = selector.select(wait)
                for key, _ in events:
                    outcome = self._receive(key.fileobj, in_flight, selector)
                    if outcome:
                        yield outcome
                now = time.monotonic()
                for sock, call in list(in_flight.items()):
                    if call.deadline <= now and sock in in_flight:
                        # The caller may have held this generator past the deadline (a
                        # Redis stall under an acknowledgement): an answer that arrived
                        # meanwhile is an answer. Timing it out would put back usage the
                        # backend already took, to be reported twice.
                        outcome = self._receive(sock, in_flight, selector)
                        if outcome:
                            yield outcome
                        elif in_flight.get(sock) is call:
                            self._abandon(sock, in_flight, selector)
                            yield call.tag, BackendUnavailable(f"{call.request.path}: timed out")
        finally:
            for sock in list(in_flight):
                self._abandon(sock, in_flight, selector)
            selector.close()

    def _start(self, call: "_Call", selector, in_flight,
               fresh: bool = False) -> Optional[Tuple[Any, BackendUnavailable]]:
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle and not fresh else None
            call.reused = sock is not None
            try:
                if sock is None:
                    sock = self._connect()
                sock.settimeout(self.read_timeout)
                sock.sendall(call.request.data)
                sock.setblocking(False)
            except (ConnectionResetError, BrokenPipeError) as exc:
                if sock is not None:
                    self._close(sock)
                if call.reused:
                    continue  # stale idle connection: take another, or a fresh one
                return call.tag, BackendUnavailable(f"{call.request.path}: {_describe(exc)}")
            except (OSError, ProtocolError, ValueError) as exc:
                if sock is not None:
                    self._close(sock)
                return call.tag, BackendUnavailable(f"{call.request.path}: {_describe(exc)}")
            call.parser = ResponseParser(call.request.method)
            call.deadline = time.monotonic() + self.read_timeout
            in_flight[sock] = call
            selector.register(sock, selectors.EVENT_READ)
            return None

    def _receive(self, sock, in_flight, selector) -> Optional[Tuple[Any, Union[Response, BackendUnavailable]]]:
        call = in_flight[sock]
        try:
            done = None
            while done is None:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError):
                    return None  # more to come
                done = call.parser.feed(data) if data else call.parser.eof()
                if done is None and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    return None
        except (ConnectionResetError, BrokenPipeError, _ClosedBeforeResponse) as exc:
            self._abandon(sock, in_flight, selector)
            if call.reused and call.parser.received == 0 and call.attempt == 1:
                call.attempt = 2  # idle keep-alive closed by the server: once more, on a fresh one
                return self._start(call, selector, in_flight, fresh=True)  # idle ones may be stale too
            return call.tag, BackendUnavailable(f"{call.request.path}: {_describe(exc)}")
        except (OSError, ProtocolError, ValueError) as exc:
            self._abandon(sock, in_flight, selector)
            return call.tag, BackendUnavailable(f"{call.request.path}: {_describe(exc)}")
        response, keep_alive = done
        selector.unregister(sock)
        del in_flight[sock]
        if keep_alive:
            sock.settimeout(self.read_timeout)
            with self._lock:
                self._idle.append(sock)
        else:
            self._close(sock)
        return call.tag, response

    def _abandon(self, sock, in_flight, selector) -> None:
        in_flight.pop(sock, None)
        try:
            selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        self._close(sock)


class _Call:
    __slots__ = ("tag", "request", "parser", "deadline", "reused", "attempt")

    def __init__(self, tag: Any, request: Request):
        self.tag = tag
        self.request = request
        self.parser: Optional[ResponseParser] = None
        self.deadline = 0.0
        self.reused = False
        self.attempt = 1
