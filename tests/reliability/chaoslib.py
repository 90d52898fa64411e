"""Helpers of the reliability suite: exact usage accounting, a pausable gateway
load, and a look at the daemon's Redis connections.

Accounting (issue 7): for every (report key, metric)

    received by the simulator + dropped by it + still in Redis - written by the gateway = excess

``excess < 0`` is lost usage. ``excess > 0`` is usage counted twice, which
decision 6 allows only where an acknowledgement was lost: the simulator's
``report_applied_then_reset`` fault (its ``unacknowledged`` ledger) and a
daemon killed between the backend's 202 and the DEL of the ``to_flush:`` key.
"Still in Redis" is every place the daemon may keep usage: report hashes,
``to_flush:`` hand-over hashes, quarantined hashes and the dead letter.
"""

import collections
import copy
import json
import os
import random
import threading
import time
from contextlib import contextmanager
from typing import Counter, Dict, Iterable, List, Optional, Tuple

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from xcftest import DEMO_CONFIG, wait_until  # noqa: F401 (re-exported to the tests here)

from xcflushd.defaults import DEAD_LETTER_HASH, QUARANTINE_PREFIX, TO_FLUSH_PREFIX
from xcflushd.errors import MalformedKey
from xcflushd.keys import Credentials, auth_key, report_key, split_suffixed
from xcflushd_sim.gateway import Gateway

Key = Tuple[str, str]  # (report key, metric)

LOAD_APPS = 40

#: How long the chaos suite runs: "long" for `make chaos`, anything else for CI.
LONG = os.environ.get("XCFLUSHD_CHAOS", "") == "long"


def no_retry_client(port: int) -> redis.Redis:
    """A client that never re-sends a command.

    redis-py's default client retries a command whose reply was lost: a
    re-sent HINCRBY is usage the gateway (apicast-xc, which does not retry)
    would never write. The load generator must write exactly once.
    """
    return redis.Redis(port=port, decode_responses=True, encoding_errors="surrogateescape",
                       retry=Retry(NoBackoff(), 0), client_name="chaos-gateway")


def member_of(name: str) -> Optional[str]:
    """The report key a Redis key holds usage for, or None when it holds none."""
    if name.startswith(QUARANTINE_PREFIX):
        name = name[len(QUARANTINE_PREFIX):]
    if name.startswith("report,"):
        return name
    if name.startswith(TO_FLUSH_PREFIX):
        try:
            return split_suffixed(name, TO_FLUSH_PREFIX)[0]
        except MalformedKey:
            return name[len(TO_FLUSH_PREFIX):]
    return None


def is_counter(value) -> bool:
    """What HINCRBY can leave in a report hash: 0 <= n < 2**63 (the gateway only adds)."""
    try:
        return 0 <= int(value) < 1 << 63
    except (TypeError, ValueError):
        return False


def handed_over_usage(client: redis.Redis) -> Counter:
    """Usage in ``to_flush:`` keys: the most a kill now can have counted twice (decision 6)."""
    usage: Counter = collections.Counter()
    for name in client.scan_iter(match=TO_FLUSH_PREFIX + "*", count=1000):
        member = member_of(name)
        for metric, value in client.hgetall(name).items():
            if is_counter(value):
                usage[(member, metric)] += int(value)
    return usage


def usage_in_redis(client: redis.Redis) -> Tuple[Counter, Dict[str, int]]:
    """Usage held anywhere in Redis, and how many keys of each kind hold it."""
    usage: Counter = collections.Counter()
    places: Counter = collections.Counter()
    for name in client.scan_iter(count=1000):
        member = member_of(name)
        if member is None or client.type(name) != "hash":
            continue
        kind = "quarantine" if name.startswith(QUARANTINE_PREFIX) else name.split(",", 1)[0].split(":", 1)[0]
        places[kind] += 1
        for metric, value in client.hgetall(name).items():
            if is_counter(value):
                usage[(member, metric)] += int(value)
            else:
                places["not_counters"] += 1
    for field, entry in client.hgetall(DEAD_LETTER_HASH).items():
        places["dead_letter"] += 1
        member = field
        try:
            member = split_suffixed(field, "")[0]
        except MalformedKey:
            pass
        for metric, value in json.loads(entry).get("usage", {}).items():
            if isinstance(value, int) and is_counter(value):
                usage[(member, metric)] += value
    return usage, dict(places)


class App:
    """One application of the load: how the gateway names it and how the simulator does."""

    def __init__(self, service_id: str, creds: Credentials, sim_app_id: str, metrics: Iterable[str],
                 known: bool = True):
        self.service_id = service_id
        self.creds = creds
        self.sim_app_id = sim_app_id
        self.metrics = tuple(metrics)
        self.known = known
        self.report_key = report_key(service_id, creds)
        self.auth_key = auth_key(service_id, creds)


def ledger_by_key(ledger: Dict, apps: List[App]) -> Counter:
    """A simulator ledger ({service: {app: {metric: n}}}) keyed like our accounting."""
    index = {(a.service_id, a.sim_app_id): a.report_key for a in apps}
    out: Counter = collections.Counter()
    for service_id, by_app in ledger.items():
        for app_id, metrics in by_app.items():
            key = index.get((service_id, app_id), f"?{service_id}/{app_id}")
            for metric, n in metrics.items():
                out[(key, metric)] += n
    return out


def chaos_config():
    """The demo backend plus LOAD_APPS applications on a plan without limits."""
    config = copy.deepcopy(DEMO_CONFIG)
    config["services"][0]["applications"] += [{"app_id": f"load-{i:02d}", "plan": "free"} for i in range(LOAD_APPS)]
    return config


def chaos_apps():
    c = Credentials
    apps = [
        App("555", c({"app_id": "a1b2c3", "app_key": "s3cr3t"}), "a1b2c3", ["hits", "search", "update"]),
        App("555", c({"app_id": "a:i,1", "app_key": "k:e,y"}), "a:i,1", ["hits", "other"]),
        App("555", c({"app_id": "small"}), "small", ["hits"]),  # over its limits: denied, reports still count
        App("777", c({"user_key": "uk:1"}), "uk-app", ["hits"]),
        # The gateway still holds a "1" for an app the backend no longer knows: reported
        # alone (decision 5), dropped by the backend, never taking others down with it.
        App("555", c({"app_id": "ghost-1"}), "ghost-1", ["hits"], known=False),
    ]
    apps += [App("555", c({"app_id": f"free{i}"}), f"free{i}", ["hits"]) for i in (1, 2, 3)]
    apps += [App("555", c({"app_id": f"load-{i:02d}"}), f"load-{i:02d}", ["hits", "other"]) for i in range(LOAD_APPS)]
    return apps


class Gate:
    """Lets the test stop the load at a point where every write is complete."""

    def __init__(self):
        self._cv = threading.Condition()
        self._paused = False
        self._busy = 0

    @contextmanager
    def op(self):
        with self._cv:
            while self._paused:
                self._cv.wait()
            self._busy += 1
        try:
            yield
        finally:
            with self._cv:
                self._busy -= 1
                self._cv.notify_all()

    @contextmanager
    def paused(self):
        with self._cv:
            self._paused = True
            while self._busy:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify_all()


class GatedGateway(Gateway):
    """The simulated gateway, each cached report written inside the gate.

    A write whose reply never came (Redis went away under it) may or may not
    have happened: it is kept apart in ``uncertain`` and never added to
    ``written``, so it can only ever look like a duplicate, never hide a loss.
    """

    def __init__(self, client: redis.Redis, gate: Gate, priority_timeout: float = 1.0):
        super().__init__(client, priority_timeout=priority_timeout)
        self.gate = gate
        self.uncertain: Counter = collections.Counter()

    def cache_report(self, service_id, creds, metric, value=1):
        with self.gate.op():
            try:
                super().cache_report(service_id, creds, metric, value)
            except redis.RedisError:
                with self._lock:
                    self.uncertain[(report_key(service_id, creds), metric)] += value
                raise


class Load:
    """Gateway traffic: cached reports (HINCRBY + SADD) and priority requests.

    One writer thread caches reports as the gateway does for an authorized
    request; one thread asks for priority authorizations of applications whose
    auth hash is gone (the test deletes some now and then), and caches the
    report when the answer is ``1``, as apicast-xc does.
    """

    def __init__(self, port: int, apps: List[App], seed: int, referrers: Dict[str, List[str]] = None):
        self.gate = Gate()
        self.gateway = GatedGateway(no_retry_client(port), self.gate)
        self.prio_gateway = GatedGateway(no_retry_client(port), self.gate)
        self.prio_gateway.written = self.gateway.written  # one ledger of what was written
        self.prio_gateway._lock = self.gateway._lock
        self.prio_gateway.uncertain = self.gateway.uncertain
        self.apps = apps
        self.referrers = referrers or {}
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.errors: Counter = collections.Counter()
        self.priority: Counter = collections.Counter()
        self.threads = [threading.Thread(target=self._write, daemon=True, name="load-writer"),
                        threading.Thread(target=self._ask, daemon=True, name="load-priority")]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _creds(self, app: App, rng: random.Random) -> Credentials:
        referrers = self.referrers.get(app.report_key)
        if referrers:
            fields = dict(app.creds.items())
            fields["referrer"] = rng.choice(referrers)
            return Credentials(fields)
        return app.creds

    def _write(self) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            app = rng.choice(self.apps)
            try:
                self.gateway.cache_report(app.service_id, self._creds(app, rng), rng.choice(app.metrics),
                                          rng.randint(1, 3))
            except redis.RedisError as exc:
                self.errors[type(exc).__name__] += 1
                time.sleep(0.05)
            if rng.random() < 0.02:
                time.sleep(0.002)

    def _ask(self) -> None:
        rng = random.Random(self.rng.random())
        known = [a for a in self.apps if a.known]
        while not self.stop.is_set():
            app = rng.choice(known)
            creds = self._creds(app, rng)
            metric = rng.choice(app.metrics)
            try:
                with self.gate.op():
                    cached = self.prio_gateway.redis.hget(auth_key(app.service_id, creds), metric)
                if cached is None:
                    cached = self.prio_gateway.priority_authorization(app.service_id, creds, metric)
                    self.priority["answered" if cached is not None else "unanswered"] += 1
                if cached is not None and cached.startswith("1"):
                    self.prio_gateway.cache_report(app.service_id, creds, metric, 1)
            except redis.RedisError as exc:
                self.errors[type(exc).__name__] += 1
                time.sleep(0.05)

    def written(self) -> Counter:
        with self.gateway._lock:
            out: Counter = collections.Counter()
            for (_, key, metric), n in self.gateway.written.items():
                out[(key, metric)] += n
            return out


def daemon_connections(client: redis.Redis) -> List[Dict[str, str]]:
    return [c for c in client.client_list() if c.get("name") == "xcflushd"]


def kill_daemon_connections(client: redis.Redis) -> int:
    killed = 0
    for conn in daemon_connections(client):
        try:
            client.client_kill_filter(_id=conn["id"])
            killed += 1
        except redis.ResponseError:
            pass  # gone already
    return killed
