"""Every backend call of the process, on libcurl: one thread, one ``CurlMulti``.

libcurl does the protocol: strict HTTP/1.1 framing (and HTTP/2 when a
backend offers it), non-blocking connects with happy eyeballs, TLS verified
with the system trust store (or ``--backend-ca-file``), every proxy kind
(http:// and https:// proxies, Basic/Digest/NTLM, CONNECT tunnels,
``NO_PROXY``), DNS cache and keep-alive reuse. This module only turns a
backend request into an easy handle and the transfer back into a Response
or a BackendUnavailable whose message never holds the query string
(credentials travel in it) nor the proxy password.

The engine thread multiplexes both paths: priority authorizations (at most
``priority_concurrency`` in flight, a bounded queue, started ahead of
anything else) and flush-cycle calls, which ``request_many`` feeds from the
caller's thread at the caller's concurrency. Limits kept here, not left to
the peer: a connect timeout, a deadline per call, a response size cap
enforced while receiving, a strict status line and Content-Length.

When a connect fails (refused, unresolvable, timed out) the backend is taken
as unreachable: queued calls then fail at once with the same reason instead
of each waiting its own connect timeout, and a probe connect every
``PROBE_INTERVAL`` seconds finds out when it is back.
"""

import collections
import logging
import os
import re
import select
import ssl
import threading
import time
import urllib.parse
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import pycurl

from . import __version__, metrics
from .defaults import MAX_RESPONSE_BYTES
from .errors import BackendUnavailable
from .ratelog import RateLimitedLog

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0           # seconds between connect probes while the backend is unreachable
_BEAT = 0.5                    # the engine loop wakes at least this often (watchdog heartbeat)
_STATUS_LINE = re.compile(rb"HTTP/[0-9](?:\.[0-9])? [1-5][0-9][0-9](?:[ \r\n]|$)")
_CONNECT_ERRORS = frozenset({pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY,
                             pycurl.E_COULDNT_CONNECT})
_PROXY_REFUSED = "proxy refused our credentials (HTTP 407)"
_ENDPOINTS = {"/transactions/authorize.xml": "authorize", "/transactions/oauth_authorize.xml": "oauth_authorize",
              "/transactions.xml": "report"}


class Response:
    """A well-framed answer. Its header dict is built on first use: most
    callers read only the status and the body, and building it was ~7 % of a
    call's Python time."""

    __slots__ = ("status", "body", "_headers", "_lines")

    def __init__(self, status: int, headers: Optional[Dict[str, str]] = None, body: bytes = b"",
                 lines: Optional[List[bytes]] = None):
        self.status = status
        self.body = body
        self._headers = headers
        self._lines = lines  # the header lines after the status line, when headers is None

    @property
    def headers(self) -> Dict[str, str]:
        """Names lower-cased."""
        if self._headers is None:
            headers = {}
            for line in self._lines or ():
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            self._headers, self._lines = headers, None
        return self._headers

    def header(self, name: str, default: str = "") -> str:
        """One header (``name`` lower-case), without building the dict; the last one wins, as in it."""
        if self._headers is not None:
            return self._headers.get(name, default)
        target = name.encode("latin-1")
        found = None
        for line in self._lines or ():
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == target:
                found = value
        return default if found is None else found.strip().decode("latin-1")

    def __iter__(self):
        return iter((self.status, self.headers, self.body))

    def __eq__(self, other):
        return isinstance(other, Response) and tuple(self) == tuple(other)

    def __repr__(self):
        return f"Response(status={self.status}, headers={self.headers!r}, body={self.body[:80]!r})"


class Request(NamedTuple):
    method: str
    path: str                 # for messages and metrics: never the query
    url: str                  # the whole URL, query included
    body: Optional[bytes]
    headers: List[str]
    weight: int = 1           # what it carries (transactions), for request_many's max_weight
    endpoint: str = ""        # metrics label


Outcome = Union[Response, BackendUnavailable]


class Dropped(BackendUnavailable):
    """The priority queue was full: the call was not made."""


class _Call:
    __slots__ = ("request", "done", "tag", "priority", "event")

    def __init__(self, request: Request, done: Callable[[Any, Outcome], None], tag: Any = None,
                 priority: bool = False, event: Optional[threading.Event] = None):
        self.request, self.done, self.tag, self.priority = request, done, tag, priority
        self.event = event  # set once per loop turn, not per call: one wake-up for many answers


class _Slot:
    """An easy handle with the state of the transfer it carries.

    The body goes into a bytearray and header lines into a list, both by
    C-level callbacks (a Python callback per line costs a measurable share of
    a call's CPU). A bytearray, not a list of chunks: libcurl hands over each
    chunk of a chunked body on its own, and a list of 1-byte chunks held ~40
    bytes of objects per body byte (78 MB peak RSS for 400 KB of 1-byte chunks);
    the body cap is libcurl's MAXFILESIZE, which since 8.4 also aborts a
    transfer while it receives, and libcurl bounds the head itself.
    """

    __slots__ = ("handle", "call", "chunks", "head", "started")

    def __init__(self, handle: pycurl.Curl):
        self.handle = handle
        self.call: Optional[_Call] = None
        self.chunks = bytearray()
        self.head: List[bytes] = []
        handle.setopt(pycurl.WRITEFUNCTION, self.chunks.extend)
        handle.setopt(pycurl.HEADERFUNCTION, self.head.append)
        self.started = 0.0

    def reset(self, call: _Call) -> None:
        self.call = call
        self.chunks.clear()
        self.head.clear()
        self.started = time.monotonic()

    def response(self, status: int) -> Union[Response, str]:
        """The response, or why its head is not acceptable."""
        head = self.head
        start = 0
        for i, line in enumerate(head):  # the last head: after 1xx answers or a proxy's CONNECT answer
            if line[:5].upper() == b"HTTP/":  # libcurl takes "http/1.1" too: seen here, refused below
                start = i
        if not head or not _STATUS_LINE.match(head[start]):
            return "malformed status line"
        if b"\r\n" not in head[start:] and b"\n" not in head[start:]:  # no blank line: libcurl 8
            return "response head truncated"                           # takes a head cut off by a close as whole
        return Response(status, None, bytes(self.chunks), head[start + 1:])


def _system_ca() -> Tuple[Optional[str], Optional[str]]:
    """The system trust store (the wheel's bundled OpenSSL does not know where it is)."""
    paths = ssl.get_default_verify_paths()
    cafile = next((p for p in (paths.cafile, paths.openssl_cafile) if p and os.path.isfile(p)), None)
    capath = next((p for p in (paths.capath, paths.openssl_capath) if p and os.path.isdir(p)), None)
    return cafile, capath


class Engine:
    """The backend's HTTP client: thread-safe submission, one loop thread doing the I/O."""

    def __init__(self, url: str, connect_timeout: float, read_timeout: float,
                 proxy: Optional[str] = None, proxy_user: Optional[str] = None,
                 proxy_password: Optional[str] = None, ca_file: Optional[str] = None,
                 priority_concurrency: int = 128, priority_queue: int = 10000, max_connections: int = 256):
        self.base = urllib.parse.urlsplit(url)
        if self.base.scheme not in ("http", "https") or not self.base.hostname:
            raise ValueError("backend URL must be http(s)://host[:port]")
        self.prefix = url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.proxy = proxy
        self.proxy_user = proxy_user
        self.proxy_password = proxy_password
        self.ca_file = ca_file
        self.priority_concurrency = max(1, priority_concurrency)
        self.priority_queue = max(1, priority_queue)
        self._secrets = [s for s in (proxy_password,) if s]
        self._lock = threading.Lock()
        self._priority: Deque[_Call] = collections.deque()
        self._flush: Deque[_Call] = collections.deque()
        self._priority_in_flight = 0
        self._idle: List[_Slot] = []
        self._active: Dict[pycurl.Curl, _Slot] = {}
        self._timer: Optional[float] = None
        self._down: Optional[str] = None      # why the backend is unreachable, while it is
        self._probe: Optional[pycurl.Curl] = None
        self._next_probe = 0.0
        self._closing = False
        self._notify: set = set()             # events of callers with new outcomes, set after a turn
        self._sleeping = False                # the loop waits in select: a submission must wake it
        self._thread: Optional[threading.Thread] = None
        self.last_beat = time.monotonic()     # the loop's heartbeat, for the watchdog
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self.multi.setopt(pycurl.M_MAXCONNECTS, max_connections)
        # epoll itself, not the selectors module: libcurl's socket callback
        # runs twice per call (a connection is unwatched between transfers),
        # and selectors' bookkeeping cost ~10 % of the engine's Python time.
        self.selector = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, select.EPOLLIN)
        self._fixed_headers = [f"X-3scale-User-Agent: plugin-python-xcflushd-v{__version__}"]
        self._cafile, self._capath = (ca_file, None) if ca_file else _system_ca()
        self._callback_errors = RateLimitedLog(log, "backend call callback errors")

    # ---- building -------------------------------------------------------------

    def build(self, method: str, path: str, query: str = "", body: Optional[bytes] = None,
              headers: Optional[Dict[str, str]] = None, weight: int = 1) -> Request:
        url = self.prefix + path + ("?" + query if query else "")
        lines = self._fixed_headers + [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines.append("Expect:")  # no 100-continue round trip for large report bodies
        return Request(method, path, url, body, lines, weight, _ENDPOINTS.get(path, path))

    def _new_slot(self) -> _Slot:
        h = pycurl.Curl()
        h.setopt(pycurl.NOSIGNAL, 1)
        h.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        h.setopt(pycurl.USERAGENT, f"xcflushd/{__version__}")
        h.setopt(pycurl.CONNECTTIMEOUT_MS, int(self.connect_timeout * 1000))
        # The deadline of one call: connect, send, and the whole answer.
        h.setopt(pycurl.TIMEOUT_MS, int((self.connect_timeout + self.read_timeout) * 1000))
        h.setopt(pycurl.MAXFILESIZE, MAX_RESPONSE_BYTES)
        self._tls_and_proxy(h)
        return _Slot(h)

    def _tls_and_proxy(self, h: pycurl.Curl) -> None:
        for option, value in ((pycurl.CAINFO, self._cafile), (pycurl.CAPATH, self._capath)):
            if value:
                h.setopt(option, value)
        if self.proxy:  # else libcurl reads http_proxy, HTTPS_PROXY, ALL_PROXY and NO_PROXY itself
            h.setopt(pycurl.PROXY, self.proxy)
            h.setopt(pycurl.PROXYAUTH, pycurl.HTTPAUTH_BASIC | pycurl.HTTPAUTH_DIGEST | pycurl.HTTPAUTH_NTLM)
            if self.proxy_user is not None:
                h.setopt(pycurl.PROXYUSERNAME, self.proxy_user)
                h.setopt(pycurl.PROXYPASSWORD, self.proxy_password or "")
            for option, value in ((pycurl.PROXY_CAINFO, self._cafile), (pycurl.PROXY_CAPATH, self._capath)):
                if value:
                    h.setopt(option, value)

    # ---- submitting (any thread) -------------------------------------------------

    def submit_priority(self, request: Request, done: Callable[[Any, Outcome], None], tag: Any = None) -> bool:
        """Queue a priority call; False (and no call) when the queue is full or the engine stops.

        ``done(tag, outcome)`` runs on the engine thread: it must be quick.
        """
        with self._lock:
            if self._closing or len(self._priority) >= self.priority_queue:
                return False
            self._priority.append(_Call(request, done, tag, True))
            self._ensure_thread()
            wake = self._sleeping
        if wake:
            self._wake()
        return True

    def _submit_flush(self, calls: List[_Call]) -> None:
        with self._lock:
            if self._closing:
                failed = calls
            else:
                self._flush.extend(calls)
                self._ensure_thread()
                failed = []
            wake = self._sleeping
        for call in failed:
            self._run_done(call, BackendUnavailable(f"{call.request.path}: stopping"))
            if call.event is not None:
                call.event.set()
        if wake and not failed:
            self._wake()

    def request(self, request: Request) -> Response:
        """One priority call, blocking the calling thread; raises BackendUnavailable."""
        box: List[Outcome] = []
        event = threading.Event()

        def done(_tag, outcome):
            box.append(outcome)
            event.set()

        if not self.submit_priority(request, done):
            raise Dropped(f"{request.path}: priority queue full")
        event.wait()
        if isinstance(box[0], BackendUnavailable):
            raise box[0]
        return box[0]

    def request_many(self, requests: Iterable[Tuple[Any, Request]], concurrency: int,
                     max_weight: Optional[int] = None, on_idle: Optional[Callable[[], None]] = None
                     ) -> Iterator[Tuple[Any, Outcome]]:
        """Run calls on the engine; yield ``(tag, response or error)`` as they finish.

        At most ``concurrency`` are in flight and, when ``max_weight`` is
        given, no new one starts while their weights add up to it.
        ``requests`` is consumed lazily on the calling thread (it may read its
        input as it goes); ``on_idle`` runs there whenever no answer is ready.
        """
        ready: Deque[Tuple[Tuple[Any, int], Outcome]] = collections.deque()
        event = threading.Event()

        def done(call_tag, outcome):
            ready.append((call_tag, outcome))

        source = iter(requests)
        exhausted = False
        in_flight = weight = 0
        while True:
            batch = []
            while not exhausted and in_flight < concurrency and (max_weight is None or weight < max_weight):
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                # The tag carries the weight, not the call: a call that
                # referred to itself through its tag was a reference cycle,
                # freed only by the cyclic GC, so finished report calls
                # (their bodies and their reports) piled up until a gen-2
                # collection: +13 MB peak RSS in a 50 000-application cycle.
                batch.append(_Call(item[1], done, (item[0], item[1].weight), event=event))
                in_flight += 1
                weight += item[1].weight
            if batch:
                self._submit_flush(batch)
            if not in_flight:
                return
            if not ready:
                event.clear()
                if not ready:
                    if on_idle is not None:
                        on_idle()
                    while not ready:
                        event.wait(1.0)
            while ready:
                (tag, call_weight), outcome = ready.popleft()
                in_flight -= 1
                weight -= call_weight
                yield tag, outcome

    # ---- the engine thread ---------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="backend-engine", daemon=True)
            self._thread.start()

    def alive(self) -> bool:
        """True unless the loop thread has ended (not started yet counts as alive)."""
        return self._thread is None or self._thread.is_alive()

    def idle(self) -> bool:
        """Nothing queued and no call in flight (any thread may ask)."""
        with self._lock:
            return not (self._priority or self._flush or self._active or self._priority_in_flight)

    def start(self) -> "Engine":
        """Start the loop thread now (it also starts on the first call)."""
        with self._lock:
            if not self._closing:
                self._ensure_thread()
        return self

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is awake anyway

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception as exc:  # the engine must outlive any one surprise
                log.error("backend engine error (%s: %s)", type(exc).__name__, str(exc)[:160])
                time.sleep(0.05)

    def _step(self) -> bool:
        """One turn of the loop; True when the engine has closed."""
        self.last_beat = now = time.monotonic()
        if self._closing:
            self._fail_everything("stopping")
            return True
        self._start_pending(now)
        timeout = _BEAT
        if self._timer is not None:
            timeout = max(0.0, min(timeout, self._timer - now))
        if self._down is not None and self._probe is None:
            timeout = max(0.0, min(timeout, self._next_probe - now))
        with self._lock:
            if self._flush or (self._priority and self._priority_in_flight < self.priority_concurrency):
                timeout = 0.0  # submitted meanwhile: look, do not sleep
            self._sleeping = timeout > 0
        events = self.selector.poll(timeout)
        self._sleeping = False
        for fd, mask in events:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            # As selectors: an error or hang-up wakes the reader and the writer.
            flags = (pycurl.CSELECT_IN if mask & ~select.EPOLLOUT else 0) | \
                    (pycurl.CSELECT_OUT if mask & ~select.EPOLLIN else 0)
            self.multi.socket_action(fd, flags)
        if self._timer is not None and time.monotonic() >= self._timer:
            self._timer = None
            self.multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self._collect()
        self._wake_callers()
        return False

    def _wake_callers(self) -> None:
        while self._notify:
            self._notify.pop().set()

    def _on_socket(self, what, fd, multi, socketp) -> None:
        if what == pycurl.POLL_REMOVE:
            try:
                self.selector.unregister(fd)
            except (OSError, ValueError):
                pass  # closed already: epoll forgot it by itself
            return
        events = (select.EPOLLIN if what & pycurl.POLL_IN else 0) | \
                 (select.EPOLLOUT if what & pycurl.POLL_OUT else 0)
        try:
            self.selector.modify(fd, events)
        except FileNotFoundError:
            self.selector.register(fd, events)

    def _on_timer(self, timeout_ms: int) -> None:
        self._timer = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000.0

    def _start_pending(self, now: float) -> None:
        if self._down is not None and self._probe is None and now >= self._next_probe:
            self._start_probe()
        try:
            self._start_queued()
        finally:
            self._wake_callers()  # calls failed at once, while the backend is unreachable

    def _start_queued(self) -> None:
        while True:
            with self._lock:
                if self._priority and self._priority_in_flight < self.priority_concurrency:
                    call = self._priority.popleft()
                    self._priority_in_flight += 1
                elif self._flush:
                    call = self._flush.popleft()
                else:
                    return
            try:
                self._start(call)
            except Exception as exc:  # a call that cannot start is one failed call, never a lost one
                self._active = {h: s for h, s in self._active.items() if s.call is not call}
                self._finish(call, BackendUnavailable(f"{call.request.path}: not sent ({type(exc).__name__})"),
                             None, None)

    def _start(self, call: _Call) -> None:
        if self._down is not None:  # unreachable: fail now, not after a connect timeout of its own
            self._finish(call, BackendUnavailable(f"{call.request.path}: backend unreachable ({self._down})"),
                         None, None)
            return
        slot = self._idle.pop() if self._idle else self._new_slot()
        slot.reset(call)
        h = slot.handle
        req = call.request
        h.setopt(pycurl.URL, req.url)
        h.setopt(pycurl.HTTPHEADER, req.headers)
        if req.body is None:
            h.setopt(pycurl.HTTPGET, 1)
        else:
            h.setopt(pycurl.POSTFIELDS, req.body)
        self._active[h] = slot
        self.multi.add_handle(h)

    def _collect(self) -> None:
        while True:
            queued, ok, failed = self.multi.info_read()
            for h in ok:
                if h is self._probe:
                    self._probe_done(None)
                    continue
                self._transfer_done(h, None, "")
            for h, errno, message in failed:
                if h is self._probe:
                    self._probe_done(message)
                    continue
                self._transfer_done(h, errno, message)
            if not queued:
                return

    def _transfer_done(self, h: pycurl.Curl, errno: Optional[int], message: str) -> None:
        slot = self._active.pop(h)
        self.multi.remove_handle(h)
        call, slot.call = slot.call, None
        seconds = time.monotonic() - slot.started
        response = slot.response(h.getinfo(pycurl.RESPONSE_CODE)) if errno is None else None
        if isinstance(response, Response) and response.status == 407:
            response = _PROXY_REFUSED  # the proxy's answer, not the backend's: not delivered
        elif errno is not None and h.getinfo(pycurl.HTTP_CONNECTCODE) == 407:
            response = _PROXY_REFUSED + " to CONNECT"
        if isinstance(response, Response):
            outcome: Outcome = response
            code: Optional[int] = response.status
        else:
            reason = response or self._reason(errno, message, call.request)
            outcome, code = BackendUnavailable(f"{call.request.path}: {reason}"), None
            if errno in _CONNECT_ERRORS or (errno == pycurl.E_OPERATION_TIMEDOUT
                                            and h.getinfo(pycurl.CONNECT_TIME) == 0):
                self._went_down(reason)
        slot.chunks.clear()
        slot.head.clear()
        if call.request.body is not None:
            h.setopt(pycurl.POSTFIELDS, b"")  # an idle handle must not keep a report body alive
        if code is not None and self._down is not None:
            self._came_back()
        self._idle.append(slot)
        self._finish(call, outcome, code, seconds)

    def _finish(self, call: _Call, outcome: Outcome, code: Optional[int], seconds: Optional[float]) -> None:
        """``seconds`` None: the call was failed without being sent (not a backend call)."""
        if call.priority:
            with self._lock:
                self._priority_in_flight -= 1
        if seconds is not None:
            metrics.backend_call(call.request.endpoint, code, seconds)
        self._run_done(call, outcome)
        if call.event is not None:
            self._notify.add(call.event)

    def _run_done(self, call: _Call, outcome: Outcome) -> None:
        """``call.done(tag, outcome)``; what it raises is logged (it may repeat on every call), never lost."""
        try:
            call.done(call.tag, outcome)
        except Exception as exc:
            self._callback_errors.error("backend call %s: its callback failed (%s: %s)", call.request.path,
                                        type(exc).__name__, " ".join(str(exc)[:160].split()))

    def _reason(self, errno: Optional[int], message: str, request: Request) -> str:
        # CURLE_TOO_LARGE (a head over libcurl's limits) comes without a message
        text = " ".join(str(message).split()) or ("too large" if errno == 100 else "no reason given")
        query = request.url.partition("?")[2]
        if query:
            text = text.replace(query, "...")
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"{text[:160]} (curl {errno})"

    # ---- reachability ------------------------------------------------------------

    def _went_down(self, reason: str) -> None:
        if self._down is None:
            log.warning("backend unreachable (%s): failing queued calls at once, probing every %.0fs",
                        reason, PROBE_INTERVAL)
            self._down = reason
            self._next_probe = time.monotonic() + min(PROBE_INTERVAL, self.connect_timeout)

    def _came_back(self) -> None:
        log.info("backend reachable again")
        self._down = None

    def _start_probe(self) -> None:
        h = pycurl.Curl()
        h.setopt(pycurl.NOSIGNAL, 1)
        h.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        h.setopt(pycurl.CONNECT_ONLY, 1)
        h.setopt(pycurl.CONNECTTIMEOUT_MS, int(self.connect_timeout * 1000))
        h.setopt(pycurl.TIMEOUT_MS, int(self.connect_timeout * 1000))
        h.setopt(pycurl.URL, self.prefix + "/")
        self._tls_and_proxy(h)
        self._probe = h
        self.multi.add_handle(h)

    def _probe_done(self, error: Optional[str]) -> None:
        h, self._probe = self._probe, None
        self.multi.remove_handle(h)
        h.close()
        if error is None:
            if self._down is not None:
                self._came_back()
        else:
            self._next_probe = time.monotonic() + PROBE_INTERVAL

    # ---- stopping ------------------------------------------------------------------

    def _fail_everything(self, reason: str) -> None:
        with self._lock:
            pending = list(self._priority) + list(self._flush)
            self._priority.clear()
            self._flush.clear()
        for h, slot in list(self._active.items()):
            self.multi.remove_handle(h)
            call, slot.call = slot.call, None
            self._finish(call, BackendUnavailable(f"{call.request.path}: {reason}"), None,
                         time.monotonic() - slot.started)
            h.close()
        self._active.clear()
        for call in pending:  # never sent
            self._run_done(call, BackendUnavailable(f"{call.request.path}: {reason}"))
            if call.event is not None:
                self._notify.add(call.event)
        self._wake_callers()
        if self._probe is not None:
            self.multi.remove_handle(self._probe)
            self._probe.close()
            self._probe = None
        for slot in self._idle:
            slot.handle.close()
        self._idle = []
        self.multi.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close(self, timeout: float = 5.0) -> None:
        """Fail whatever is queued or in flight, close every connection, end the thread."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            thread = self._thread
            self._sleeping = True
        if thread is None:
            self.multi.close()
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            return
        self._wake()
        thread.join(timeout)
