"""Validates a simulator config (format: see :mod:`xcflushd_sim.model`) into lookup tables.

The JSON-able dict is compiled once into immutable-by-convention objects with every index a
request needs (user_key -> app, token -> app, metric ancestors, plan limits in output order),
so that answering a request is only dict look-ups.
"""

import re
from typing import Any, Dict, List, Optional, Tuple

from .periods import PERIOD_INDEX, PERIODS

BACKEND_VERSIONS = ("1", "2", "oauth")


class ConfigError(ValueError):
    """The simulator config is malformed; the message says where."""


class Limit:
    """One usage limit of a plan: ``max_value`` per ``period`` on ``metric``."""

    __slots__ = ("metric", "period", "max_value")

    def __init__(self, metric: str, period: str, max_value: int):
        self.metric = metric
        self.period = period
        self.max_value = max_value


class App:
    """An application: ids, keys, plan, state and the optional OAuth/referrer settings."""

    __slots__ = ("app_id", "app_keys", "user_key", "plan", "state", "referrers", "referrer_res",
                 "redirect_url", "access_tokens")

    def __init__(self, spec: Dict[str, Any], where: str, plans: Dict[str, List[Limit]]):
        _check_keys(spec, where, {"app_id", "app_keys", "user_key", "plan", "state", "referrers",
                                  "redirect_url", "access_tokens"})
        user_key = _opt_str(spec, "user_key", where)
        app_id = _opt_str(spec, "app_id", where) or user_key
        if not app_id:
            raise ConfigError(f"{where}: app_id (or user_key) is required")
        self.app_id: str = app_id
        self.user_key: Optional[str] = user_key
        self.app_keys: Tuple[str, ...] = tuple(_str_list(spec, "app_keys", where))
        self.plan: str = _opt_str(spec, "plan", where) or ""
        if self.plan not in plans:
            raise ConfigError(f"{where}: plan {self.plan!r} is not defined in the service")
        self.state: str = _opt_str(spec, "state", where) or "active"
        self.referrers: Tuple[str, ...] = tuple(_str_list(spec, "referrers", where))
        # apisonator: Regexp.escape(filter).gsub('\*', '.*'), anchored at both ends.
        self.referrer_res = tuple(re.compile(re.escape(f).replace(r"\*", ".*"))
                                  for f in self.referrers)
        self.redirect_url: Optional[str] = _opt_str(spec, "redirect_url", where)
        self.access_tokens: Tuple[str, ...] = tuple(_str_list(spec, "access_tokens", where))


class Service:
    """A service with its metrics hierarchy, plans (limits) and applications."""

    def __init__(self, spec: Dict[str, Any], where: str, provider_key: str):
        _check_keys(spec, where, {"id", "default", "backend_version", "tokens", "metrics", "plans",
                                  "applications", "provider_key", "state",
                                  "referrer_filters_required"})
        sid = spec.get("id")
        if isinstance(sid, int) and not isinstance(sid, bool):
            sid = str(sid)
        if not isinstance(sid, str) or not sid.strip():
            raise ConfigError(f"{where}: id must be a non-empty string")
        self.id: str = sid
        where = f"service {sid!r}"
        self.provider_key: str = _opt_str(spec, "provider_key", where) or provider_key
        if not self.provider_key:
            raise ConfigError(f"{where}: no provider_key (top-level or per service)")
        self.default = bool(spec.get("default", False))
        self.backend_version = str(spec.get("backend_version", "2"))
        if self.backend_version not in BACKEND_VERSIONS:
            raise ConfigError(f"{where}: backend_version must be one of {BACKEND_VERSIONS}")
        self.state: str = _opt_str(spec, "state", where) or "active"
        self.referrer_filters_required = bool(spec.get("referrer_filters_required", True))
        self.tokens = frozenset(_str_list(spec, "tokens", where))

        self.parents: Dict[str, Optional[str]] = self._metrics(spec.get("metrics", {}), where)
        self.ancestors: Dict[str, Tuple[str, ...]] = {m: self._ancestors(m, where)
                                                      for m in self.parents}
        children: Dict[str, List[str]] = {}
        for metric, parent in self.parents.items():
            if parent is not None:
                children.setdefault(parent, []).append(metric)
        # The hierarchy extension's children="a b" attribute, per metric ("" for leaves).
        self.children_attr: Dict[str, str] = {m: " ".join(children.get(m, ()))
                                              for m in self.parents}

        self.plans: Dict[str, List[Limit]] = self._plans(spec.get("plans", {}), where)
        self.apps: Dict[str, App] = {}
        self.app_by_user_key: Dict[str, str] = {}
        self.app_by_token: Dict[str, str] = {}
        apps = spec.get("applications", [])
        if not isinstance(apps, list):
            raise ConfigError(f"{where}: applications must be a list")
        for i, app_spec in enumerate(apps):
            app_where = f"{where} application #{i}"
            if not isinstance(app_spec, dict):
                raise ConfigError(f"{app_where}: must be an object")
            app = App(app_spec, app_where, self.plans)
            if app.app_id in self.apps:
                raise ConfigError(f"{app_where}: duplicate app_id {app.app_id!r}")
            self.apps[app.app_id] = app
            if app.user_key is not None:
                if app.user_key in self.app_by_user_key:
                    raise ConfigError(f"{app_where}: duplicate user_key")
                self.app_by_user_key[app.user_key] = app.app_id
            for token in app.access_tokens:
                self.app_by_token[token] = app.app_id

    @staticmethod
    def _metrics(spec: Any, where: str) -> Dict[str, Optional[str]]:
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: metrics must be an object {{name: parent-or-null}}")
        for name, parent in spec.items():
            if not name or name != name.strip():
                raise ConfigError(f"{where}: metric name {name!r} is empty or padded")
            if parent is not None and parent not in spec:
                raise ConfigError(f"{where}: metric {name!r} has unknown parent {parent!r}")
        return dict(spec)

    def _ancestors(self, metric: str, where: str) -> Tuple[str, ...]:
        chain: List[str] = []
        parent = self.parents[metric]
        while parent is not None:
            if parent == metric or parent in chain:
                raise ConfigError(f"{where}: metric hierarchy has a cycle at {metric!r}")
            chain.append(parent)
            parent = self.parents[parent]
        return tuple(chain)

    def _plans(self, spec: Any, where: str) -> Dict[str, List[Limit]]:
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: plans must be an object {{plan: {{metric: limits}}}}")
        plans: Dict[str, List[Limit]] = {}
        for plan, metrics in spec.items():
            plan_where = f"{where} plan {plan!r}"
            if not isinstance(metrics, dict):
                raise ConfigError(f"{plan_where}: must be an object {{metric: {{period: max}}}}")
            limits: List[Limit] = []
            for metric, periods in metrics.items():
                if metric not in self.parents:
                    raise ConfigError(f"{plan_where}: unknown metric {metric!r}")
                if not isinstance(periods, dict):
                    raise ConfigError(f"{plan_where}: limits of {metric!r} must be an object")
                # Output order: plan's metric order, then finest period first (as apisonator).
                for period in sorted(periods, key=lambda p: PERIOD_INDEX.get(p, -1)):
                    value = periods[period]
                    if period not in PERIOD_INDEX:
                        raise ConfigError(f"{plan_where}: period {period!r} not in {PERIODS}")
                    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                        raise ConfigError(f"{plan_where}: {metric}/{period} must be an int >= 0")
                    limits.append(Limit(metric, period, value))
            plans[plan] = limits
        return plans


class CompiledConfig:
    """All services plus the provider-key and service-token indexes."""

    def __init__(self, config: Any):
        if not isinstance(config, dict):
            raise ConfigError("config must be a JSON object")
        _check_keys(config, "config", {"provider_key", "services"})
        provider_key = config.get("provider_key") or ""
        if not isinstance(provider_key, str):
            raise ConfigError("config: provider_key must be a string")
        services = config.get("services")
        if not isinstance(services, list) or not services:
            raise ConfigError("config: services must be a non-empty list")
        self.services: Dict[str, Service] = {}
        # provider key -> its default service id (flagged default, else its first service)
        self.default_service: Dict[str, str] = {}
        for i, spec in enumerate(services):
            if not isinstance(spec, dict):
                raise ConfigError(f"config: service #{i} must be an object")
            service = Service(spec, f"service #{i}", provider_key)
            if service.id in self.services:
                raise ConfigError(f"service {service.id!r}: duplicate id")
            self.services[service.id] = service
        for service in self.services.values():
            self.default_service.setdefault(service.provider_key, service.id)
        flagged: Dict[str, str] = {}
        for service in self.services.values():
            if service.default:
                if service.provider_key in flagged:
                    raise ConfigError(f"service {service.id!r}: a second default service")
                flagged[service.provider_key] = service.id
        self.default_service.update(flagged)
        self.source = config


def _check_keys(spec: Dict[str, Any], where: str, allowed: set) -> None:
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")


def _opt_str(spec: Dict[str, Any], key: str, where: str) -> Optional[str]:
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value


def _str_list(spec: Dict[str, Any], key: str, where: str) -> List[str]:
    value = spec.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    return value


def demo_config(n_apps: int = 10, *, n_services: int = 2, provider_key: str = "pk-demo",
                limit: int = 10 ** 9) -> Dict[str, Any]:
    """A config with ``n_apps`` applications spread round-robin over ``n_services`` services.

    * Service ids ``"1001"``, ``"1002"``, ...; the first is the provider's default. Odd-numbered
      services (1001, 1003, ...) use app_id/app_key (backend_version "2"), even-numbered ones
      use user keys (backend_version "1"). Service tokens ``st-<service id>``.
    * Application ``n`` (0-based) is ``app-<n>``; on app_id services its key is ``key-<n>``,
      on user_key services its user key is ``uk-<n>``.
    * Metrics ``hits`` (parent of ``search`` and ``update``) and ``bytes`` (no parent); plan
      ``default`` limits hits per day and month and search per minute to ``limit`` (high
      enough never to trip by default); plan ``unlimited`` has no limits (every 10th app).
    """
    if n_apps < 0 or n_services < 1:
        raise ValueError("n_apps must be >= 0 and n_services >= 1")
    services = []
    for s in range(n_services):
        sid = str(1001 + s)
        services.append({
            "id": sid, "default": s == 0, "backend_version": "2" if s % 2 == 0 else "1",
            "tokens": [f"st-{sid}"],
            "metrics": {"hits": None, "search": "hits", "update": "hits", "bytes": None},
            "plans": {"default": {"hits": {"day": limit, "month": limit},
                                  "search": {"minute": limit}},
                      "unlimited": {}},
            "applications": [],
        })
    for n in range(n_apps):
        service = services[n % n_services]
        app: Dict[str, Any] = {"app_id": f"app-{n}",
                               "plan": "unlimited" if n % 10 == 9 else "default"}
        if service["backend_version"] == "1":
            app["user_key"] = f"uk-{n}"
        else:
            app["app_keys"] = [f"key-{n}"]
        service["applications"].append(app)
    return {"provider_key": provider_key, "services": services}
