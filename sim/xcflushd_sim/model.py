"""In-memory state and semantics of the simulated 3scale backend (no HTTP here).

:class:`Backend` holds the configuration, the usage counters, the ledgers tests assert on,
and implements authorize / oauth_authorize / report as apisonator does (see
``threescale-backend.md`` §1–5 and §8). All public methods are thread-safe: one lock guards
all mutable state, and each request holds it only for its in-memory work.

Config format (a JSON-able dict)::

    {"provider_key": "pk-demo",
     "services": [
       {"id": "555",                  # service id (string)
        "default": true,              # the provider key's default service (else: the first)
        "backend_version": "2",       # "1": user_key, "2": app_id/app_key, "oauth"
        "tokens": ["st-555"],         # service tokens accepted with service_id=555
        "provider_key": "pk-other",   # optional: another provider owns this service
        "state": "active",            # optional: anything else -> 409 service_not_active
        "referrer_filters_required": true,   # optional: false disables referrer checks
        "metrics": {"hits": null, "search": "hits", "update": "hits"},   # name -> parent
        "plans": {"Basic": {"hits": {"day": 1000, "month": 20000, "eternity": 10000000},
                            "search": {"minute": 10}},
                  "free": {}},        # a plan without limits: no <usage_reports>
        "applications": [
          {"app_id": "a1b2c3", "app_keys": ["s3cr3t"], "plan": "Basic",
           "state": "active",                  # anything else -> 409 application_not_active
           "referrers": ["*.example.org"],     # filters, "*" is a wildcard
           "redirect_url": "http://localhost/cb",   # OAuth
           "access_tokens": ["tok1"]},         # OAuth access tokens (2017 behaviour)
          {"app_id": "api1", "user_key": "uk1", "plan": "free"}]}]}

Periods: minute, hour, day, week, month, year, eternity. The plan's key is the ``<plan>``
name. An app without ``app_id`` is identified by its ``user_key``. :func:`demo_config` builds
a large config for runs and benchmarks.

Era: current apisonator, except that ``access_token`` is still accepted on oauth_authorize
(as in 2017). ``user_id`` anywhere (query, report body, a transaction) is a 400
``end_users_no_longer_supported``.

Reports are applied synchronously, right after their envelope is validated, even though the
real backend applies them later in a worker: tests then need no "wait until processed" step.
The observable contract is kept: the HTTP answer is 202 whenever the envelope is valid, and a
batch with one invalid transaction is dropped whole and only shows up in :meth:`errors`.

Ledgers (what tests and benchmarks assert on), each ``{service_id: {app_id: {metric: int}}}``:

* ``received``: usage as reported in applied batches, before propagation to parent metrics.
  An app reached by ``user_key`` is keyed by its app id. ``#N`` (set) stores N.
* ``dropped``: usage in batches dropped by validation (unknown apps keyed by the app_id sent,
  or ``user_key:<key>``).
* ``unacknowledged``: the part of ``received`` whose HTTP answer was deliberately lost (fault
  ``report_applied_then_reset``); a correct at-least-once client reports it again.
"""

import copy
import re
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import errors
from .config import App, CompiledConfig, ConfigError, Limit, Service, demo_config
from .errors import Denial, SimError
from .faults import ENDPOINTS, FaultPlan
from .params import no_body
from .periods import (
    PERIODS,
    REPORT_DEADLINE_FUTURE_S,
    REPORT_DEADLINE_PAST_S,
    BoundsCache,
    format_time,
    parse_timestamp,
)

__all__ = ["Backend", "AuthStatus", "UsageReport", "ConfigError", "demo_config"]

MAX_ERRORS = 1000
"""How many dropped-batch errors are kept (oldest go first), as apisonator's error log."""

_PRUNE_ABOVE = 2
"""A counter keeps one value per period instance (reports may carry timestamps from 24 h ago
to 1 h ahead). Past instances are dropped once a counter holds more than this many: only the
current one is ever read."""

_SANE_VALUE = re.compile(r"\A[ \t\r\n\f\v]*#?[0-9]+[ \t\r\n\f\v]*\Z")
_RUBY_INT = re.compile(r"[ \t\r\n\f\v]*([+-]?[0-9]+)")

Ledger = Dict[str, Dict[str, Dict[str, int]]]


def _ruby_to_i(value: Any) -> int:
    """Ruby's ``to_i``: leading integer of a string, else 0 (so ``"#5".to_i == 0``)."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _RUBY_INT.match(value)
        return int(m.group(1)) if m else 0
    return 0


def _is_set(value: Any) -> bool:
    return isinstance(value, str) and value[:1] == "#"


def _get_from(value: Any, current: int) -> int:
    """apisonator ``Usage.get_from``: ``#N`` sets to N, anything else increments."""
    return _ruby_to_i(value[1:]) if _is_set(value) else current + _ruby_to_i(value)


class UsageReport:
    """One ``<usage_report>``: a plan limit with its current value in the current period."""

    __slots__ = ("metric", "period", "start", "end", "max_value", "current_value")

    def __init__(self, metric: str, period: str, start: Optional[int], end: Optional[int],
                 max_value: int, current_value: int):
        self.metric = metric
        self.period = period
        self.start = start  # None for eternity
        self.end = end
        self.max_value = max_value
        self.current_value = current_value

    @property
    def exceeded(self) -> bool:
        return self.current_value > self.max_value


class AuthStatus:
    """The outcome of an authorization, ready to be rendered as a status document."""

    __slots__ = ("authorized", "denial", "plan", "reports", "hierarchy", "application",
                 "app_keys")

    def __init__(self, denial: Optional[Denial], plan: str, reports: List[UsageReport],
                 hierarchy: Optional[List[Tuple[str, str]]],
                 application: Optional[Tuple[str, str, str, str]],
                 app_keys: Optional[Tuple[str, str, Tuple[str, ...]]]):
        self.authorized = denial is None
        self.denial = denial
        self.plan = plan
        self.reports = reports
        self.hierarchy = hierarchy      # [(metric, children)] when hierarchy=1
        self.application = application  # (id, first key, redirect field, url) for oauth
        self.app_keys = app_keys        # (app id, service id, keys) when list_app_keys=1


def _credential(params: Dict[str, Any], name: str) -> Optional[str]:
    """apisonator ``normalize_non_empty_keys!``: non-strings and blank strings are absent."""
    value = params.get(name)
    if not isinstance(value, str) or not value.strip():
        return None
    return value


def _ledger_add(ledger: Ledger, service_id: str, app_id: str, metric: str, value: Any) -> None:
    metrics = ledger.setdefault(service_id, {}).setdefault(app_id, {})
    if _is_set(value):
        metrics[metric] = _ruby_to_i(value[1:])
    else:
        n = _ruby_to_i(value)
        if n:
            metrics[metric] = metrics.get(metric, 0) + n


class Backend:
    """The simulated backend. ``clock`` returns POSIX seconds (tests pass a fixed one)."""

    def __init__(self, config: Dict[str, Any], clock: Optional[Callable[[], float]] = None):
        self._lock = threading.Lock()
        self._clock = clock or time.time
        self._cfg = CompiledConfig(config)
        self._now_bounds = BoundsCache()
        self._ts_bounds = BoundsCache()
        self.faults = FaultPlan(None)
        self._clear()

    # --- configuration ------------------------------------------------------------------

    def configure(self, config: Dict[str, Any]) -> None:
        """Replace the config (ConfigError if invalid). Usage, ledgers and counters are kept."""
        compiled = CompiledConfig(config)
        with self._lock:
            self._cfg = compiled

    def config(self) -> Dict[str, Any]:
        """A deep copy of the config in force."""
        with self._lock:
            return copy.deepcopy(self._cfg.source)

    def set_faults(self, faults: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """Replace the fault config (see :mod:`xcflushd_sim.faults`); returns it normalised."""
        return self.faults.configure(faults)

    # --- state for assertions -----------------------------------------------------------

    def _clear(self) -> None:
        self._counters: Dict[Tuple[str, str], Dict[Tuple[str, str], Dict[int, int]]] = {}
        self._received: Ledger = {}
        self._dropped: Ledger = {}
        self._unacked: Ledger = {}
        self._calls = {ep: 0 for ep in ENDPOINTS}
        self._statuses: Dict[str, Dict[int, int]] = {ep: {} for ep in ENDPOINTS}
        self._errors: deque = deque(maxlen=MAX_ERRORS)
        self._errors_total = 0
        self._faults_injected: Dict[str, int] = {}
        self._applied_unacked = 0

    def reset(self) -> None:
        """Forget usage, ledgers, counters and errors; keep the config and fault settings."""
        with self._lock:
            self._clear()
        self.faults.reseed()

    def received(self) -> Ledger:
        with self._lock:
            return copy.deepcopy(self._received)

    def dropped(self) -> Ledger:
        with self._lock:
            return copy.deepcopy(self._dropped)

    def unacknowledged(self) -> Ledger:
        with self._lock:
            return copy.deepcopy(self._unacked)

    def calls(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def statuses(self) -> Dict[int, int]:
        """HTTP statuses sent on the three transaction endpoints, all endpoints together."""
        with self._lock:
            total: Dict[int, int] = {}
            for per_endpoint in self._statuses.values():
                for status, n in per_endpoint.items():
                    total[status] = total.get(status, 0) + n
            return total

    def errors(self) -> List[Dict[str, Any]]:
        """Dropped report batches, oldest first: service_id, code, message, timestamp,
        transactions."""
        with self._lock:
            return copy.deepcopy(list(self._errors))

    def state(self) -> Dict[str, Any]:
        """Everything above as one JSON-able dict (the ``/_sim/state`` document)."""
        with self._lock:
            statuses: Dict[str, int] = {}
            for per_endpoint in self._statuses.values():
                for status, n in per_endpoint.items():
                    statuses[str(status)] = statuses.get(str(status), 0) + n
            return {
                "received": copy.deepcopy(self._received),
                "dropped": copy.deepcopy(self._dropped),
                "unacknowledged": copy.deepcopy(self._unacked),
                "calls": dict(self._calls),
                "statuses": statuses,
                "statuses_by_endpoint": {ep: {str(s): n for s, n in st.items()}
                                         for ep, st in self._statuses.items()},
                "errors": copy.deepcopy(list(self._errors)),
                "errors_total": self._errors_total,
                "faults_injected": sum(self._faults_injected.values()),
                "faults_by_kind": dict(self._faults_injected),
                "applied_but_unacknowledged": self._applied_unacked,
                "faults": copy.deepcopy(self.faults.spec),
            }

    def usage(self, service_id: str, app_id: str) -> Dict[str, Dict[str, int]]:
        """Current counters of an app: ``{metric: {period: value}}`` (non-zero only)."""
        now = self._clock()
        with self._lock:
            bounds = self._now_bounds.get(now)
            out: Dict[str, Dict[str, int]] = {}
            for (metric, period), slot in self._counters.get((service_id, app_id), {}).items():
                value = slot.get(bounds[period][0], 0)
                if value:
                    out.setdefault(metric, {})[period] = value
            return out

    def set_usage(self, service_id: str, app_id: str, metric: str, value: int,
                  period: Optional[str] = None) -> None:
        """Set an app's counter for the current ``period`` (all periods when None).

        A test helper (e.g. an app already over its daily limit); no propagation to parents.
        """
        now = self._clock()
        with self._lock:
            service = self._cfg.services[service_id]
            if app_id not in service.apps or metric not in service.parents:
                raise KeyError(f"unknown app {app_id!r} or metric {metric!r}")
            if period is not None and period not in PERIODS:
                raise ValueError(f"unknown period {period!r}")
            counters = self._counters.setdefault((service_id, app_id), {})
            for p, (start, _) in self._now_bounds.get(now).items():
                if period is None or p == period:
                    counters.setdefault((metric, p), {})[start] = int(value)

    # --- counting (called by the HTTP layer) ---------------------------------------------

    def record_call(self, endpoint: str) -> None:
        with self._lock:
            self._calls[endpoint] += 1

    def record_status(self, endpoint: str, status: int) -> None:
        with self._lock:
            per_endpoint = self._statuses[endpoint]
            per_endpoint[status] = per_endpoint.get(status, 0) + 1

    def pick_fault(self, endpoint: str) -> Optional[str]:
        """Decide (and count) whether this request gets an injected fault."""
        kind = self.faults.pick(endpoint)
        if kind is not None:
            with self._lock:
                self._faults_injected[kind] = self._faults_injected.get(kind, 0) + 1
        return kind

    # --- service credentials -------------------------------------------------------------

    @staticmethod
    def _provider_key(cfg: CompiledConfig, params: Dict[str, Any]) -> str:
        """apisonator listener: provider_key wins, else (service_token, service_id)."""
        provider_key = _credential(params, "provider_key")
        if provider_key is not None:
            return provider_key
        token = params.get("service_token")
        token = token if isinstance(token, str) and token else None
        service_id = _credential(params, "service_id")
        if token is not None and service_id is not None:
            service = cfg.services.get(service_id)
            if service is not None and token in service.tokens:
                return service.provider_key
        if token is None:
            raise errors.provider_key_or_service_token_required()
        if service_id is None:
            raise errors.service_id_missing()
        raise errors.service_token_invalid(token, service_id)

    @staticmethod
    def _service(cfg: CompiledConfig, provider_key: str, service_id: Optional[str]) -> Service:
        """apisonator ``Service.load_with_provider_key!``."""
        if service_id is not None:
            if provider_key not in cfg.default_service:
                raise errors.provider_key_invalid(provider_key)
            service = cfg.services.get(service_id)
            if service is None or service.provider_key != provider_key:
                raise errors.service_id_invalid(service_id)
            return service
        default = cfg.default_service.get(provider_key)
        if default is None:
            raise errors.provider_key_invalid_or_service_missing(provider_key)
        return cfg.services[default]

    # --- authorization --------------------------------------------------------------------

    def authorize(self, params: Dict[str, Any], extensions: Optional[Dict[str, Any]] = None,
                  oauth: bool = False) -> AuthStatus:
        """authorize.xml (``oauth=False``) or oauth_authorize.xml; raises SimError."""
        ext = extensions or {}
        now = self._clock()
        with self._lock:
            cfg = self._cfg
            provider_key = self._provider_key(cfg, params)
            if params.get("user_id") is not None:
                raise errors.end_users_no_longer_supported()
            usage = params.get("usage")
            if usage is not None and not isinstance(usage, dict):
                raise errors.EmptyReply(403)
            service = self._service(cfg, provider_key, _credential(params, "service_id"))
            app = self._auth_app(service, params, oauth)
            if usage and no_body(ext, params):
                # apisonator ``preload_usage_limits`` (since 3scale 2.10): with no_body the names
                # in usage are looked up, as given (not stripped), before any validator.
                for name in usage:
                    if name not in service.parents:
                        raise errors.metric_invalid(name)

            bounds = self._now_bounds.get(now)
            counters = self._counters.get((service.id, app.app_id), {})
            limits = service.plans[app.plan]
            values = []
            for limit in limits:
                slot = counters.get((limit.metric, limit.period))
                values.append(slot.get(bounds[limit.period][0], 0) if slot else 0)
            flat = ext.get("flat_usage") == "1"
            denial, redirect_field = self._validate(service, app, params, oauth,
                                                    limits, values, usage, flat)

            reports = []
            for limit, value in zip(limits, values):
                start, end = bounds[limit.period]
                if end is None:
                    start = None
                reports.append(UsageReport(limit.metric, limit.period, start, end,
                                           limit.max_value, value))
            hierarchy = None
            if ext.get("hierarchy") == "1":
                hierarchy = [(r.metric, service.children_attr[r.metric]) for r in reports]
            application = None
            if oauth:
                application = (app.app_id, app.app_keys[0] if app.app_keys else "",
                               redirect_field, app.redirect_url or "")
            app_keys = None
            if ext.get("list_app_keys") == "1":
                app_keys = (app.app_id, service.id, app.app_keys)
            return AuthStatus(denial, app.plan, reports, hierarchy, application, app_keys)

    @staticmethod
    def _auth_app(service: Service, params: Dict[str, Any], oauth: bool) -> App:
        """Find the application of an authorization (transactor ``validate``)."""
        app_id = _credential(params, "app_id")
        user_key = params.get("user_key")
        user_key = user_key if isinstance(user_key, str) and user_key else None
        if oauth and app_id is None:
            # 2017: an access token stands for its application when no app_id is given.
            token = params.get("access_token")
            if isinstance(token, str) and token:
                app_id = service.app_by_token.get(token)
                if app_id is None:
                    raise errors.access_token_invalid(token)
            else:
                raise errors.application_not_found(None)
        return service.apps[Backend._app_id(service, app_id, user_key)]

    @staticmethod
    def _app_id(service: Service, app_id: Optional[str], user_key: Optional[str]) -> str:
        """The application an app_id or a user_key names (apisonator ``Application.extract_id!``)."""
        if app_id is not None:
            if user_key is not None:
                raise errors.authentication_error()
            if app_id not in service.apps:
                raise errors.application_not_found(app_id)
            return app_id
        if user_key is not None:
            found = service.app_by_user_key.get(user_key)
            if found is None:
                raise errors.user_key_invalid(user_key)
            return found
        raise errors.application_not_found(None)

    def _validate(self, service: Service, app: App, params: Dict[str, Any], oauth: bool,
                  limits: List[Limit], values: List[int], usage: Optional[Dict[str, Any]],
                  flat: bool) -> Tuple[Optional[Denial], str]:
        """Run the validators in apisonator's order; the first rejection wins."""
        redirect_field = "redirect_url"
        app_key = params.get("app_key")
        # app_key is stripped but kept when empty: present-but-empty forces a key check.
        app_key = app_key.strip() if isinstance(app_key, str) else None
        if oauth and service.backend_version != "oauth":
            return errors.OAUTH_NOT_ENABLED, redirect_field
        if oauth or service.backend_version == "oauth":
            # OauthKey (also OIDC on plain authorize): only checked when app_key is given.
            if app_key is not None and (app_key == "" or app_key not in app.app_keys):
                return errors.application_key_invalid(app_key), redirect_field
        elif service.backend_version != "1" and app.app_keys and app_key not in app.app_keys:
            return errors.application_key_invalid(app_key), redirect_field
        if oauth:
            field, value = "redirect_url", None
            if "redirect_url" in params:
                value = params["redirect_url"]
            elif "redirect_uri" in params:
                field = redirect_field = "redirect_uri"
                value = params["redirect_uri"]
            if value and value != app.redirect_url:
                return errors.redirect_invalid(field, value), redirect_field
        if service.referrer_filters_required and app.referrer_res:
            referrer = params.get("referrer")
            if referrer != "*" and not (isinstance(referrer, str) and any(
                    r.fullmatch(referrer) for r in app.referrer_res)):
                return errors.referrer_not_allowed(referrer), redirect_field
        if app.state != "active":
            return errors.APPLICATION_NOT_ACTIVE, redirect_field
        if service.state != "active":
            return errors.SERVICE_NOT_ACTIVE, redirect_field
        if not self._within_limits(service, limits, values, usage, flat):
            return errors.LIMITS_EXCEEDED, redirect_field
        return None, redirect_field

    def _within_limits(self, service: Service, limits: List[Limit], values: List[int],
                       usage: Optional[Dict[str, Any]], flat: bool) -> bool:
        """Without usage: any limit with current > max denies. With (predicted) usage: only
        the listed metrics and their ancestors count, as current + usage > max."""
        if usage is None:
            return all(value <= limit.max_value for limit, value in zip(limits, values))
        _, processed = self._process_usage(service, usage, flat)
        for limit, value in zip(limits, values):
            delta = processed.get(limit.metric)
            if delta is not None and _get_from(delta, value) > limit.max_value:
                return False
        return True

    @staticmethod
    def _process_usage(service: Service, raw: Dict[str, Any],
                       flat: bool) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Validate usage and propagate it to ancestors (``Metric::Collection#process_usage``).

        Returns (usage as given, with stripped names; usage including ancestors).
        """
        usage: Dict[str, Any] = {}
        for name, value in raw.items():
            name = name.strip()
            if not isinstance(value, str) or not _SANE_VALUE.match(value):
                raise errors.usage_value_invalid(name, value)
            if name not in service.parents:
                raise errors.metric_invalid(name)
            usage[name] = value
        if flat:
            return usage, usage
        processed = dict(usage)
        for name, value in usage.items():
            setting = _is_set(value)
            for ancestor in service.ancestors[name]:
                if setting:
                    processed[ancestor] = value
                else:
                    processed[ancestor] = _ruby_to_i(processed.get(ancestor)) + _ruby_to_i(value)
        return usage, processed

    # --- reports -----------------------------------------------------------------------------

    def report(self, params: Dict[str, Any], extensions: Optional[Dict[str, Any]] = None,
               acknowledged: bool = True) -> bool:
        """transactions.xml: validate the envelope (SimError), then apply the whole batch or
        drop it and record one error. Returns whether usage was applied.

        ``acknowledged=False`` marks a batch whose 202 the HTTP layer will not deliver.
        """
        ext = extensions or {}
        now = self._clock()
        with self._lock:
            cfg = self._cfg
            provider_key = self._provider_key(cfg, params)
            transactions = params.get("transactions")
            if transactions is None or transactions in ("", {}, []):
                raise errors.transactions_is_blank()
            if not isinstance(transactions, dict):
                raise errors.transactions_format_invalid()
            if any(tx is None for tx in transactions.values()):
                raise errors.transactions_has_nil_transaction()
            if params.get("user_id") is not None or any(
                    isinstance(tx, dict) and tx.get("user_id") is not None
                    for tx in transactions.values()):
                raise errors.end_users_no_longer_supported()
            service = self._service(cfg, provider_key, _credential(params, "service_id"))

            batch = self._without_zeros(transactions.values())
            if not batch:
                return False  # nothing left to enqueue: still a 202
            try:
                composed = self._compose(service, batch, ext.get("flat_usage") == "1", now)
            except SimError as err:
                self._drop(service, batch, err, now)
                return False
            now_bounds = self._now_bounds.get(now)
            for app_id, usage, processed, ts in composed:
                self._bump(service.id, app_id, processed, ts, now_bounds)
                for metric, value in usage.items():
                    _ledger_add(self._received, service.id, app_id, metric, value)
                    if not acknowledged:
                        _ledger_add(self._unacked, service.id, app_id, metric, value)
            if not acknowledged:
                self._applied_unacked += 1
            return True

    @staticmethod
    def _without_zeros(transactions) -> List[Any]:
        """apisonator ``filter_usages_with_0``: drop usage entries equal to "0", then drop the
        transactions left without usage — before any validation, so such a transaction can
        never invalidate a batch."""
        kept = []
        for tx in transactions:
            if isinstance(tx, dict) and isinstance(tx.get("usage"), dict):
                usage = {m: v for m, v in tx["usage"].items() if v != "0"}
                if not usage:
                    continue
                tx = dict(tx, usage=usage)
            kept.append(tx)
        return kept

    def _compose(self, service: Service, batch: List[Any], flat: bool,
                 now: float) -> List[Tuple[str, Dict[str, Any], Dict[str, Any], float]]:
        """Validate a whole batch in apisonator's order (every app, then every usage, then
        every timestamp); raise the first SimError. Returns (app, usage, processed, ts)."""
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for tx in batch:
            app_id = self._report_app(service, tx)
            groups.setdefault(app_id, []).append(tx)
        composed = []
        for app_id, txs in groups.items():
            for tx in txs:
                usage = tx.get("usage") if isinstance(tx, dict) else None
                if not usage:
                    continue  # validated app, nothing to count
                if not isinstance(usage, dict):
                    raise errors.usage_value_invalid("usage", None)
                parsed, processed = self._process_usage(service, usage, flat)
                composed.append((app_id, parsed, processed, tx.get("timestamp")))
        result = []
        for app_id, parsed, processed, raw_ts in composed:
            ts = parse_timestamp(raw_ts)
            ts = now if ts is None else ts
            diff = int(ts // 1) - int(now // 1)
            if diff < -REPORT_DEADLINE_PAST_S:
                raise errors.transaction_timestamp_too_old()
            if diff > REPORT_DEADLINE_FUTURE_S:
                raise errors.transaction_timestamp_too_new()
            result.append((app_id, parsed, processed, ts))
        return result

    @staticmethod
    def _report_app(service: Service, tx: Any) -> str:
        """apisonator ``Application.extract_id!`` on one transaction."""
        app_id = tx.get("app_id") if isinstance(tx, dict) else None
        user_key = tx.get("user_key") if isinstance(tx, dict) else None
        app_id = app_id if isinstance(app_id, str) else None
        user_key = user_key if isinstance(user_key, str) else None
        return Backend._app_id(service, app_id, user_key)

    def _bump(self, service_id: str, app_id: str, processed: Dict[str, Any], ts: float,
              now_bounds) -> None:
        """Add (or set, ``#N``) usage to every period instance holding ``ts``."""
        counters = self._counters.setdefault((service_id, app_id), {})
        bounds = self._ts_bounds.get(ts)
        for metric, value in processed.items():
            setting = _is_set(value)
            n = _ruby_to_i(value[1:]) if setting else _ruby_to_i(value)
            if not n and not setting:
                continue
            for period, (start, _) in bounds.items():
                slot = counters.get((metric, period))
                if slot is None:
                    counters[(metric, period)] = {start: n}
                    continue
                slot[start] = n if setting else slot.get(start, 0) + n
                if len(slot) > _PRUNE_ABOVE:
                    current = now_bounds[period][0]
                    for old in [s for s in slot if s < current]:
                        del slot[old]

    def _drop(self, service: Service, batch: List[Any], err: SimError, now: float) -> None:
        """Record a dropped batch: one error, and its usage in the ``dropped`` ledger."""
        self._errors.append({"service_id": service.id, "code": err.code,
                             "message": err.message, "timestamp": format_time(int(now)),
                             "transactions": copy.deepcopy(batch)})
        self._errors_total += 1
        for tx in batch:
            if not isinstance(tx, dict) or not isinstance(tx.get("usage"), dict):
                continue
            app_id, user_key = tx.get("app_id"), tx.get("user_key")
            if isinstance(app_id, str):
                key = app_id
            elif isinstance(user_key, str):
                key = service.app_by_user_key.get(user_key, f"user_key:{user_key}")
            else:
                key = "?"
            for metric, value in tx["usage"].items():
                if isinstance(value, str) and _SANE_VALUE.match(value):
                    _ledger_add(self._dropped, service.id, key, metric.strip(), value)

    # --- the 2017 error log endpoint ----------------------------------------------------

    def transaction_errors(self, params: Dict[str, Any], delete: bool = False) -> List[Dict]:
        """Errors of the caller's service, newest first (``/transactions/errors.xml``)."""
        with self._lock:
            cfg = self._cfg
            service = self._service(cfg, self._provider_key(cfg, params),
                                    _credential(params, "service_id"))
            mine = [e for e in self._errors if e["service_id"] == service.id]
            if delete:
                self._errors = deque((e for e in self._errors if e["service_id"] != service.id),
                                     maxlen=MAX_ERRORS)
            return list(reversed(mine))
