"""The 3scale Service Management API: authorize, oauth_authorize and report.

Builds the calls (parameters encoded once, decision 2; extensions
``hierarchy=1`` and ``rejection_reason_header=1``, decision 3), sends them
through ``transport`` (libcurl), and turns answers into AuthStatus values or errors.
Responses are parsed with expat in C: a first pass refuses any DTD (so no
entity can be declared, let alone expanded, as defusedxml's ``forbid_dtd``),
then ElementTree's C parser builds the tree. defusedxml does the same guard
with a pure-Python tree builder, which cost about 30 us of a call's ~130 us.
The backend's own one-line status document is read without a tree, by one
regular expression over its bytes (``_canonical_status``); any other
spelling of it takes the XML parser, and both read the same.
Anything that is not the API's XML fails that call only, never the daemon.
"""

import logging
import pyexpat
import re
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union
from xml.etree.ElementTree import Element, ParseError, XMLParser

from .errors import BackendError, BackendRejected, BackendUnavailable
from .keys import Credentials
from .transport import Engine, Request, Response

log = logging.getLogger(__name__)

EXTENSIONS = "hierarchy=1&rejection_reason_header=1"
#: A check of metric names (known_metrics.py): apisonator then checks every
#: name in ``usage`` before any validator, and answers without a body.
NO_BODY = "no_body=1"
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
# What quote_plus leaves as it is: such a name or value needs no call into urllib.
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*\Z").match
# Report parameter names (``transactions[0][usage][hits]``): plain but for brackets.
_BRACKETED = re.compile(r"[A-Za-z0-9_.~\[\]-]*\Z").match


def _quote(text: str) -> str:
    if _PLAIN(text):
        return text
    if _BRACKETED(text):
        return text.replace("[", "%5B").replace("]", "%5D")
    return urllib.parse.quote_plus(text, errors="surrogateescape")


def urlencode(params: Iterable[Tuple[str, str]]) -> str:
    """``urllib.parse.urlencode(params, errors="surrogateescape")``, for str names and values.

    Credentials and metric names are nearly always plain ASCII, and report
    parameter names plain but for brackets: those are encoded here, the rest
    go to quote_plus. The same string as urllib's, for a fraction of the CPU
    (four Python calls per name and per value there; a report body has
    thousands).
    """
    return "&".join(_quote(k) + "=" + _quote(v) for k, v in params)


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

    def any_service(self) -> Optional[str]:
        """A service these credentials cover: the provider's default ("") with a provider key, else
        the first with a token; None without either."""
        if self._provider_key:
            return ""
        return min(self._tokens) if self._tokens else None

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
    refused_metric: Optional[str] = None  # the name a metric_invalid answer gives


class DTDForbidden(ValueError):
    """The document declares a DTD: it could declare entities, which the API never sends."""


def _refuse_dtd(*_args) -> None:
    raise DTDForbidden("DTD")


#: An XML declaration that keeps the document in UTF-8 (ASCII bytes mean ASCII characters).
_PLAIN_DECL = re.compile(rb'<\?xml version="1\.[0-9]"(?: encoding="(?i:utf-8|us-ascii)")?'
                         rb'(?: standalone="(?:yes|no)")? ?\?>')


def _cannot_hold_dtd(body: bytes) -> bool:
    """True when the bytes show there is no DTD: UTF-8 (no NUL, no other declared
    encoding) and no ``<!`` anywhere, which every DTD starts with. Other
    documents (comments and CDATA start with ``<!`` too) take the checking pass."""
    if b"<!" in body or b"\0" in body:
        return False
    if body[:5] == b"<?xml":
        return _PLAIN_DECL.match(body) is not None
    return body[:1] == b"<"


def _parse_xml(body: bytes, what: str) -> Element:
    try:
        # Pass 1: well-formed and DTD-free, no tree built (only these two
        # handlers exist, so it stays in C). Pass 2 runs on a document that
        # cannot hold an entity declaration. The common status document
        # skips pass 1: it was a fifth of an authorize call's instructions.
        if not _cannot_hold_dtd(body):
            check = pyexpat.ParserCreate()
            check.StartDoctypeDeclHandler = _refuse_dtd
            check.EntityDeclHandler = _refuse_dtd
            check.Parse(body, True)
        parser = XMLParser()
        parser.feed(body)
        return parser.close()
    except (ParseError, pyexpat.ExpatError, ValueError, LookupError) as exc:  # LookupError: unknown encoding
        raise BackendUnavailable(f"{what}: unparsable XML ({type(exc).__name__})") from None


def _error_from(resp: Response, what: str) -> BackendRejected:
    code, message = "", ""
    if resp.body.strip():
        try:
            root = _parse_xml(resp.body, what)
            if root.tag == "error":  # one line, bounded: it goes into logs and the dead-letter entry
                code, message = root.get("code", "")[:100], " ".join((root.text or "")[:4000].split())[:200]
                code = "".join(c if c.isprintable() and not c.isspace() else "?" for c in code)
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
    """Turn an authorize/oauth_authorize response into an AuthStatus or raise a BackendError.

    Nothing else: whatever an answer holds, it costs one failed call, never
    the renewer's answer for every later asker nor a cycle's authorize phase.
    """
    try:
        return _status(resp)
    except BackendError:
        raise
    except Exception as exc:
        raise _unreadable("authorize", exc) from None


def _unreadable(what: str, exc: Exception) -> BackendUnavailable:
    # The type only: a message may quote the body, and bodies carry application keys.
    return BackendUnavailable(f"{what}: unreadable answer ({type(exc).__name__})")


def _status(resp: Response) -> AuthStatus:
    what = "authorize"
    if resp.status >= 500 or resp.status < 200 or 300 <= resp.status < 400:
        raise BackendUnavailable(f"{what}: HTTP {resp.status}")
    if resp.status != 409 and resp.status >= 400:
        err = _error_from(resp, what)
        if err.code in APPLICATION_ERRORS:
            refused = _refused_metric(resp.body) if err.code == "metric_invalid" else None
            return AuthStatus(False, err.code, False, (), {}, refused)
        # Anything else (our own credentials, a malformed request, an empty
        # body) says nothing about the application: no denial gets cached.
        raise err
    ctype = resp.header("content-type")
    if "xml" not in ctype:
        raise BackendUnavailable(f"{what}: HTTP {resp.status} with content type {ctype[:60]!r}")
    document = _canonical_status(resp.body) or _tree_status(resp.body, resp.status)
    authorized, reason, reports, hierarchy = document
    reason_code = None
    limits = False
    if not authorized:
        reason_code = resp.header("3scale-rejection-reason") or None
        limits = reason_code == LIMITS_EXCEEDED or (reason or "").lower() == _LIMITS_EXCEEDED_TEXT
        if limits:
            reason_code = LIMITS_EXCEEDED
    return AuthStatus(authorized, reason_code, limits, reports, hierarchy)


def _refused_metric(body: bytes) -> Optional[str]:
    """The name in apisonator's ``metric "<name>" is invalid``, as it wrote it; None for any other text."""
    try:
        text = _parse_xml(body, "authorize").text or ""
    except BackendUnavailable:
        return None
    prefix, suffix = 'metric "', '" is invalid'
    if len(text) >= len(prefix) + len(suffix) and text.startswith(prefix) and text.endswith(suffix):
        return text[len(prefix):-len(suffix)]
    return None


def parse_check(resp: Response) -> None:
    """The answer to a ``no_body`` authorize that checks metric names: None when every name
    is known (200, or any 409: apisonator found the application and every name before its
    validators ran); BackendRejected for a 4xx, whose body is empty (a 404 is an unknown
    application or an unknown metric, it does not say which); BackendUnavailable otherwise."""
    if resp.status in (200, 409):
        return None
    if 400 <= resp.status < 500:
        raise BackendRejected(resp.status, "", "authorize with no_body=1")
    raise BackendUnavailable(f"authorize: HTTP {resp.status}")


#: What a status document says: (authorized, reason text, usage reports, hierarchy).
StatusDocument = Tuple[bool, Optional[str], Tuple[UsageReport, ...], Dict[str, List[str]]]


def _tree_status(body: bytes, http_status: int) -> StatusDocument:
    """Any well-formed status document, through the XML parser."""
    what = "authorize"
    root = _parse_xml(body, what)
    authorized_el = root.find("authorized") if root.tag == "status" else None
    if authorized_el is None or authorized_el.text not in ("true", "false"):
        raise BackendUnavailable(f"{what}: HTTP {http_status} without a status document")
    reports = []
    for el in root.iterfind("usage_reports/usage_report"):
        metric, period = el.get("metric"), el.get("period")
        try:
            if metric is None or period is None:  # a None metric would fail the Redis write of a whole batch
                raise TypeError
            reports.append(UsageReport(metric, period, int(el.findtext("current_value")),
                                       int(el.findtext("max_value"))))
        except (TypeError, ValueError):
            raise BackendUnavailable(f"{what}: malformed usage_report") from None
    hierarchy: Dict[str, List[str]] = {}
    for el in root.iterfind("hierarchy/metric"):
        name = el.get("name")
        if name:
            hierarchy[name] = (el.get("children") or "").split()
    return authorized_el.text == "true", root.findtext("reason"), tuple(reports), hierarchy


# The backend's own status document (threescale-backend.md 4.1): one line,
# fixed element order, built by string concatenation. Its bytes are matched
# whole by a regular expression whose text and attribute characters are
# printable ASCII without & < > (and " in attributes): such a document is
# well-formed XML without entities, comments, CDATA or a DTD, in which every
# character stands for itself, so the groups are exactly what the XML parser
# would give. Anything else (whitespace between elements, an escaped
# character, another order, non-ASCII text) goes to the XML parser. Matching
# costs about a fifth of building the tree.
_TEXT = rb"[\x20-\x25\x27-\x3b\x3d\x3f-\x7e]*"
_ATTR = rb"[\x20\x21\x23-\x25\x27-\x3b\x3d\x3f-\x7e]*"


def _usage_report(group: Callable[[bytes], bytes]) -> bytes:
    return (rb'<usage_report metric="' + group(_ATTR) + rb'" period="' + group(_ATTR) + rb'"(?: exceeded="true")?>'
            rb"(?:<period_start>" + _TEXT + rb"</period_start><period_end>" + _TEXT + rb"</period_end>)?"
            rb"<max_value>" + group(rb"[0-9]+") + rb"</max_value><current_value>" + group(rb"[0-9]+") +
            rb"</current_value></usage_report>")


def _metric(group: Callable[[bytes], bytes]) -> bytes:
    return rb'<metric name="' + group(_ATTR) + rb'" children="' + group(_ATTR) + rb'"/>'


def _capture(pattern: bytes) -> bytes:
    return b"(" + pattern + b")"


def _within(pattern: bytes) -> bytes:
    return pattern


_CANONICAL = re.compile(
    rb'<\?xml version="1\.0" encoding="UTF-8"\?><status><authorized>(true|false)</authorized>'
    rb"(?:<reason>(" + _TEXT + rb")</reason>)?"
    rb"(?:<application><id>" + _TEXT + rb"</id><key>" + _TEXT + rb"</key>"
    rb"(?:<redirect_url>" + _TEXT + rb"</redirect_url>|<redirect_uri>" + _TEXT + rb"</redirect_uri>)?</application>)?"
    rb"<plan>" + _TEXT + rb"</plan>"
    rb"(?:<usage_reports>((?:" + _usage_report(_within) + rb")*)</usage_reports>)?"
    rb'(?:<app_keys app="' + _ATTR + rb'" svc="' + _ATTR + rb'">(?:<key id="' + _ATTR + rb'"/>)*</app_keys>)?'
    rb"(?:<hierarchy>((?:" + _metric(_within) + rb")*)</hierarchy>)?"
    rb"</status>").fullmatch
_REPORTS = re.compile(_usage_report(_capture)).findall
_METRICS = re.compile(_metric(_capture)).findall


def _canonical_status(body: bytes) -> Optional[StatusDocument]:
    """The backend's own one-line document, without an XML parser; None for any other."""
    match = _CANONICAL(body)
    if match is None:
        return None
    authorized, reason, reports, hierarchy = match.groups()
    try:
        usage = tuple(UsageReport(metric.decode("ascii"), period.decode("ascii"), int(current), int(maximum))
                      for metric, period, maximum, current in _REPORTS(reports or b""))
    except ValueError:  # more digits than int() takes (sys.get_int_max_str_digits): as the tree path says
        raise BackendUnavailable("authorize: malformed usage_report") from None
    return (authorized == b"true", None if reason is None else reason.decode("ascii"), usage,
            {name.decode("ascii"): children.decode("ascii").split()
             for name, children in _METRICS(hierarchy or b"") if name})


_warned_user_id = False


def _warn_user_id_once():
    global _warned_user_id
    if not _warned_user_id:
        _warned_user_id = True
        log.warning("credentials carry user_id, which the current backend rejects: it is not sent")


class BackendClient:
    """The calls xcflushd makes. Thread-safe; share one per process.

    Every call runs on the transport's one engine. ``submit_authorize`` queues
    a priority authorization (the renewer's path) and ``authorize`` waits for
    one; ``authorize_many``/``report_many`` feed a flush cycle's calls from
    the calling thread and yield outcomes as they finish.
    """

    def __init__(self, transport: Engine, service_credentials: ServiceCredentials):
        self.transport = transport
        self.service_credentials = service_credentials
        # Called with every call's outcome (answer, None or error), on the thread that reads it:
        # the daemon's outage tracker. Must not raise.
        self.observer: Optional[Callable[[Any], None]] = None

    # ---- requests and outcomes ------------------------------------------------

    def _authorize_request(self, service_id: str, creds: Credentials, metrics: Sequence[str] = (),
                           no_body: bool = False) -> Request:
        """``metrics`` go as ``usage[m]=0``: apisonator then checks their names (known_metrics.py);
        a predicted 0 changes no per-metric value (decision 4)."""
        params = []
        for name, value in creds.items():
            if name in _AUTH_PARAMS:
                params.append((name, value))
            elif name == "user_id":
                _warn_user_id_once()
        params += [(f"usage[{metric}]", "0") for metric in metrics]
        params += self.service_credentials.params(service_id)
        path = "/transactions/oauth_authorize.xml" if creds.oauth else "/transactions/authorize.xml"
        return self.transport.build("GET", path, urlencode(params),
                                    headers={"3scale-options": NO_BODY if no_body else EXTENSIONS})

    def _report_request(self, service_id: str, transactions: Sequence[Tuple[Credentials, Dict[str, int]]]) -> Request:
        params = self.service_credentials.params(service_id)
        for i, (creds, usage) in enumerate(transactions):
            params.extend(transaction_params(i, creds, usage))
        body = urlencode(params).encode()
        return self.transport.build("POST", "/transactions.xml", body=body,
                                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                                    weight=len(transactions))

    @staticmethod
    def _report_outcome(resp: Response) -> None:
        if 200 <= resp.status < 300:
            return
        if 400 <= resp.status < 500:
            try:
                err = _error_from(resp, "report")
            except Exception as exc:  # as parse_status: one failed call, whatever the body holds
                raise _unreadable("report", exc) from None
            raise err
        raise BackendUnavailable(f"report: HTTP {resp.status}")

    # ---- one call ---------------------------------------------------------------

    def authorize(self, service_id: str, creds: Credentials, metrics: Sequence[str] = ()) -> AuthStatus:
        """One priority authorization, blocking the calling thread."""
        return parse_status(self.transport.request(self._authorize_request(service_id, creds, metrics)))

    def submit_authorize(self, service_id: str, creds: Credentials,
                         done: Callable[[Union[AuthStatus, BackendError]], None],
                         metrics: Sequence[str] = ()) -> bool:
        """Queue a priority authorization; ``done(status or error)`` runs on the engine thread.

        False when the priority queue is full: no call is made and ``done`` never runs.
        Raises BackendRejected (no credentials for that service) without queueing.
        """
        def finished(_tag, outcome):
            done(self._outcome(outcome, parse_status))

        return self.transport.submit_priority(self._authorize_request(service_id, creds, metrics), finished)

    # ---- many calls -------------------------------------------------------------

    def authorize_many(self, items: Iterable[Tuple[Any, str, Credentials]], concurrency: int,
                       on_idle: Optional[Callable[[], None]] = None,
                       ) -> Iterator[Tuple[Any, Union[AuthStatus, BackendError]]]:
        """``(tag, service_id, credentials[, metrics])`` in; ``(tag, AuthStatus or error)`` out, as they finish."""
        return self._many(((i[0], i[1], i[2:]) for i in items), concurrency,
                          lambda service_id, what: self._authorize_request(service_id, *what), parse_status,
                          on_idle=on_idle)

    def check_many(self, items: Iterable[Tuple[Any, str, Credentials, Sequence[str]]], concurrency: int,
                   on_idle: Optional[Callable[[], None]] = None) -> Iterator[Tuple[Any, Optional[BackendError]]]:
        """``(tag, service_id, credentials, metrics)`` in; ``(tag, None or error)`` out (see parse_check)."""
        return self._many(((i[0], i[1], i[2:]) for i in items), concurrency,
                          lambda service_id, what: self._authorize_request(service_id, *what, no_body=True),
                          parse_check, on_idle=on_idle)

    def report_many(self, items: Iterable[Tuple[Any, str, Sequence[Tuple[Credentials, Dict[str, int]]]]],
                    concurrency: int, max_transactions: Optional[int] = None,
                    on_idle: Optional[Callable[[], None]] = None) -> Iterator[Tuple[Any, Optional[BackendError]]]:
        """``(tag, service_id, transactions)`` in; ``(tag, None or error)`` out, as they finish.

        ``max_transactions`` bounds the transactions in flight (each call's
        weight is its number of transactions); ``on_idle`` runs whenever no
        answer is ready and the calls in flight are awaited.
        """
        return self._many(items, concurrency, self._report_request, self._report_outcome, max_transactions, on_idle)

    def _many(self, items, concurrency, build, outcome, max_weight=None, on_idle=None):
        unbuildable: List[Tuple[Any, BackendError]] = []

        def requests():
            for tag, service_id, what in items:
                try:
                    yield tag, build(service_id, what)
                except BackendRejected as exc:  # no credentials for that service
                    unbuildable.append((tag, exc))

        for tag, resp in self.transport.request_many(requests(), concurrency, max_weight, on_idle):
            while unbuildable:
                yield unbuildable.pop()
            yield tag, self._outcome(resp, outcome)
        while unbuildable:
            yield unbuildable.pop()

    def _outcome(self, resp, parse):
        """What a call came to: the parsed answer or one BackendError; the observer sees each."""
        if not isinstance(resp, BackendError):
            try:
                resp = parse(resp)
            except BackendError as exc:
                resp = exc
        if self.observer is not None:
            self.observer(resp)
        return resp

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


def client_for(settings, service_credentials: ServiceCredentials, **sizes) -> BackendClient:
    """A client that reaches the backend as ``settings`` say (URL, timeouts, proxy, CA):
    the daemon's and ``check-backend``'s, so the probe tests the daemon's own route.
    ``sizes``: priority_concurrency, priority_queue, max_connections."""
    return make_client(settings.backend_url, service_credentials, settings.connect_timeout,
                       settings.read_timeout, settings.backend_proxy, proxy_user=settings.backend_proxy_user,
                       proxy_password=settings.backend_proxy_password, ca_file=settings.backend_ca_file, **sizes)


def make_client(url: str, service_credentials: ServiceCredentials, connect_timeout: float,
                read_timeout: float, proxy_url: Optional[str] = None, **transport_options) -> BackendClient:
    """``transport_options``: proxy_user, proxy_password, ca_file, priority_concurrency, priority_queue."""
    return BackendClient(Engine(url, connect_timeout, read_timeout, proxy_url, **transport_options),
                         service_credentials)
