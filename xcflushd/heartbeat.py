"""The daemon's heartbeat in Redis: who is flushing, and how its last cycle went.

Each running daemon keeps one JSON record under ``xcflushd:daemon:<id>``
(``<host>:<pid>:<random>``), rewritten every ``INTERVAL`` seconds with a TTL
of ``TTL``: the key exists exactly while its daemon lives (a killed daemon's
record is gone within ``TTL``). ``xcflushd status``, the rollout's health
gate and the adoption of a dead daemon's cycles all read it. Staleness of
flushing is judged from ``last_cycle.finished_at`` against ``frequency``,
not from the TTL, so a long ``--frequency`` does not keep dead daemons alive.

The record (the fields are a contract with ``status`` and the Ansible gate):
``id, host, pid, version, started_at, beat_at, frequency, cycles,
last_cycle`` where ``last_cycle`` is null until the first cycle ends, then
``{started_at, finished_at, result, reports, delivered, failed,
dead_lettered, authorized, auth_failures, error, backend_error}``; times are
unix seconds, ``result`` is ok, partial or failed (``cycle_result``).
``pid_namespace`` (boot or machine id, and PID namespace: where ``pid`` is this
process) lets a daemon in the same namespace see at once that it died.
The daemon adds ``metrics`` (its /metrics URL), ``outage`` (its
OutageTracker's snapshot: ``mode, max_stale, in_outage, started_at,
last_answer, stale_until, kept, allowed``) and, after a SIGHUP, ``reload``
(``{at, ok, error}``).

The key prefix is in defaults.py and reading every record is storage.read_heartbeats,
so this module imports storage, never the other way round. Redis I/O goes through the
client passed in; writing never raises (a beat that cannot be written is retried at the
next interval).
"""

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Dict, Optional

from . import __version__, metrics
from .defaults import HEARTBEAT_PREFIX as PREFIX
from .errors import StorageFull
from .storage import PID_NAMESPACE, Storage

log = logging.getLogger(__name__)

INTERVAL = 5.0   # seconds between beats
TTL = 15         # a record outlives its daemon by at most this


def cycle_result(result) -> str:
    """ok: everything delivered and renewed; partial: some of it kept for the next cycle; failed: the cycle stopped."""
    if result.error:
        return "failed"
    if result.failed or result.dead_lettered or result.auth_failures or getattr(result, "not_cached", 0):
        return "partial"
    return "ok"


def cycle_record(result) -> Dict[str, Any]:
    """A FlushResult as the heartbeat's ``last_cycle``."""
    return {
        "started_at": round(result.started_at, 3), "finished_at": round(result.finished_at, 3),
        "result": cycle_result(result), "reports": result.reports, "delivered": result.delivered,
        "failed": result.failed, "dead_lettered": result.dead_lettered, "authorized": result.authorized,
        "auth_failures": result.auth_failures, "error": result.error, "backend_error": result.backend_error,
    }


class Heartbeat:
    """One daemon's record, kept fresh by a thread of its own until ``stop`` is set (``clear`` sets it)."""

    def __init__(self, client, frequency: float, stop: threading.Event, interval: float = INTERVAL,
                 ttl: int = TTL, clock=time.time):
        self.redis = client
        self.stop = stop
        self.interval = interval
        self.ttl = ttl
        self.clock = clock
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.id = f"{self.host}:{self.pid}:{secrets.token_hex(3)}"
        self.key = PREFIX + self.id
        self.record: Dict[str, Any] = {
            "id": self.id, "host": self.host, "pid": self.pid, "version": __version__,
            "started_at": round(clock(), 3), "beat_at": None, "frequency": frequency,
            "cycles": 0, "last_cycle": None, "pid_namespace": PID_NAMESPACE,
        }
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._storage = None  # a Storage on self.redis, made at the first beat

    def start(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def cycle_ended(self, result) -> None:
        """Record a finished flush cycle and publish it at once."""
        with self._lock:
            self.record["cycles"] += 1
            self.record["last_cycle"] = cycle_record(result)
        self.beat()

    def beat(self) -> bool:
        with self._lock:
            self.record["beat_at"] = round(self.clock(), 3)
            text = json.dumps(self.record, separators=(",", ":"))
        try:
            if self._storage is None:
                self._storage = Storage(self.redis)
            # Written even when Redis is at maxmemory (Redis 7): other daemons
            # adopt the hand-over keys of a daemon whose record is gone.
            self._storage.set_record(self.key, text, self.ttl)
            return True
        except Exception as exc:  # Redis down or (before Redis 7) full: the next beat tries again
            log.debug("heartbeat not written: %s: %s", type(exc).__name__, exc)
            if isinstance(exc, StorageFull):
                metrics.degraded_write("heartbeat")
            return False

    def clear(self) -> None:
        """A clean stop: the record goes at once, so nobody waits out its TTL.

        Only once the daemon's cycle has ended: until then the record vouches
        for the cycle's hand-over keys (storage._dead).
        """
        self.stop.set()
        if self._thread is not None:
            self._thread.join(2.0)  # no beat may land after the delete
        try:
            self.redis.delete(self.key)
        except Exception as exc:
            log.debug("heartbeat not removed: %s", exc)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.beat()
            self.stop.wait(self.interval)


def alive_ids(client) -> set:
    """Ids of the daemons whose heartbeat is live."""
    return {key[len(PREFIX):] for key in client.scan_iter(match=PREFIX + "*", count=1000)}
