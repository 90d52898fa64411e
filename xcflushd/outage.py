"""Backend outages: is the backend answering, and may stale authorizations be served?

``--backend-outage`` says what the gateway gets while the backend is away:
``strict`` (cached authorizations expire after ``--auth-ttl`` as always, the
Ruby daemon's behaviour), ``resilient`` (they are kept alive, values
untouched), ``allow`` (resilient, and a priority request that cannot be
answered is answered ``1``, unless the application is cached as denied).

An outage is a call that got no well-framed answer (refused, unresolvable,
timeout, TLS or proxy failure, a body that is not the API's) or a 5xx or 429.
Any other 4xx is an answer: a revoked key or a deleted application must take
effect whatever the mode. An outage starts at the first such failure and ends
at the end of a flush cycle in which the backend answered and no call failed
that way, so a partial outage (some calls failing) stays one outage. A cycle
without any call (no traffic) leaves the state as it is.

Staleness counts from the last answer before the outage started: nothing is
kept alive or allowed later than ``max_stale`` seconds after it, however the
backend comes and goes within the outage. A daemon that starts during an
outage counts from its own start.

Pure: no I/O, thread-safe (the backend engine and the flush cycle feed it),
the clock injected.
"""

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional

from . import defaults, metrics
from .errors import BackendError, BackendRejected, BackendUnavailable

log = logging.getLogger(__name__)

MODES = defaults.OUTAGE_MODES
STRICT, RESILIENT, ALLOW = MODES


def is_outage(outcome: Any) -> bool:
    """The backend did not answer: no well-framed answer, 5xx, or 429 (it asks us to go away)."""
    if isinstance(outcome, BackendRejected):
        return outcome.status == 429
    return isinstance(outcome, BackendUnavailable)


def is_answer(outcome: Any) -> bool:
    """The backend decided: a 2xx, or a 4xx other than 429 (status 0 is ours: no credentials)."""
    if isinstance(outcome, BackendRejected):
        return 400 <= outcome.status < 500 and outcome.status != 429
    return not isinstance(outcome, BackendError)


class OutageTracker:
    """Fed every backend call's outcome (``observe``) and the end of every flush cycle (``settle``)."""

    def __init__(self, mode: str = STRICT, max_stale: float = defaults.MAX_STALE,
                 clock: Callable[[], float] = time.time):
        self.mode = mode
        self.max_stale = max_stale
        self.clock = clock
        self._lock = threading.Lock()
        self.last_answer = clock()          # the daemon's start stands for an answer: see the docstring
        self.started_at: Optional[float] = None   # None: no outage
        self.since = self.last_answer       # the last answer before the current outage
        self.kept = 0                        # authorizations kept alive by the last keep-alive
        self.allowed = 0                     # priority requests allowed in the current outage
        self.allowed_keys: set = set()       # their auth keys: kept alive by nobody, re-asked when they expire
        self._answered = self._failed = 0    # in the current flush cycle
        self._published = self.last_answer   # last_answer as the gauge last showed it
        metrics.backend_outage(False, self.last_answer)

    # ---- feeding ---------------------------------------------------------------

    def observe(self, outcome: Any) -> None:
        """One backend call ended with ``outcome`` (an answer, None for a delivered report, or an error)."""
        now = self.clock()
        if is_outage(outcome):
            with self._lock:
                self._failed += 1
                started = self.started_at is None
                if started:
                    self.started_at, self.since = now, self.last_answer
            if started:
                metrics.backend_outage(True)
                log.warning("backend outage started (%s); mode %s: %s", str(outcome)[:120], self.mode,
                            "cached authorizations expire as usual" if self.mode == STRICT else
                            f"cached authorizations kept for up to {self.max_stale:.0f}s after the last answer")
        elif is_answer(outcome):
            with self._lock:
                self._answered += 1
                self.last_answer = max(self.last_answer, now)
                publish = now - self._published >= 1.0  # a gauge set takes a lock: not on every call of a storm
                if publish:
                    self._published = now
            if publish:
                metrics.backend_answered(now)

    def begin_cycle(self) -> None:
        """A flush cycle starts: its calls (and the priority calls meanwhile) judge whether the outage is over."""
        with self._lock:
            self._answered = self._failed = 0

    def settle(self) -> bool:
        """A flush cycle ended: the outage ends if the backend answered since the cycle began and
        nothing failed. True when it just ended."""
        with self._lock:
            answered, failed = self._answered, self._failed
            self._answered = self._failed = 0
            if self.started_at is None or failed or not answered:
                return False
            duration, kept, allowed = self.clock() - self.started_at, self.kept, self.allowed
            self.started_at, self.kept, self.allowed = None, 0, 0
            self.allowed_keys = set()
        metrics.backend_outage(False)
        metrics.authorizations_kept(0)
        log.warning("backend outage ended after %.0fs: %d cached authorization(s) were kept alive, "
                    "%d priority request(s) allowed; renewing them from the backend's answers",
                    duration, kept, allowed)
        return True

    def quiet(self) -> bool:
        """In an outage, and no call answered or failed since the cycle began: nothing could end it."""
        with self._lock:
            return self.started_at is not None and not self._answered and not self._failed

    # ---- decisions -------------------------------------------------------------

    @property
    def in_outage(self) -> bool:
        return self.started_at is not None

    @property
    def stale_until(self) -> float:
        """When what was cached before the outage may no longer be served."""
        return self.since + self.max_stale

    def keep_alive_ttl(self, auth_ttl: int) -> int:
        """The TTL to hold every cached authorization at now; 0: keep none alive."""
        if self.mode == STRICT or self.started_at is None:
            return 0
        return max(0, min(int(auth_ttl), int(self.stale_until - self.clock())))

    def kept_alive(self, count: int) -> None:
        """The last keep-alive held ``count`` authorizations (0: it held none, e.g. past max_stale)."""
        if count == 0 and self.kept and self.started_at is not None:
            log.warning("backend outage: --max-stale (%.0fs) passed since the backend last answered; cached "
                        "authorizations are no longer kept alive and expire as in strict mode", self.max_stale)
        self.kept = count
        metrics.authorizations_kept(count)

    def not_kept_alive(self) -> frozenset:
        """Auth keys the keep-alive leaves alone: the ``1`` answers given without the backend."""
        with self._lock:
            return frozenset(self.allowed_keys)

    def allow_ttl(self, outcome: Any, auth_ttl: int) -> int:
        """For a priority call that ended in ``outcome``: the TTL of a ``1`` answered without
        the backend, or 0 when the request gets no answer (strict, resilient, not an outage,
        or past ``max_stale``)."""
        if self.mode != ALLOW or not is_outage(outcome):
            return 0
        with self._lock:
            if self.started_at is None:
                return 0
            left = self.stale_until - self.clock()
        return max(0, int(min(defaults.ALLOW_TTL, auth_ttl, left)))

    def allowed_one(self, auth_key: str) -> None:
        with self._lock:
            self.allowed += 1
            self.allowed_keys.add(auth_key)
        metrics.outage_allowed()

    def snapshot(self) -> Dict[str, Any]:
        """For the heartbeat record and ``xcflushd status``."""
        with self._lock:
            outage = self.started_at is not None
            return {"mode": self.mode, "max_stale": self.max_stale, "in_outage": outage,
                    "started_at": round(self.started_at, 3) if outage else None,
                    "last_answer": round(self.last_answer, 3),
                    "stale_until": round(self.stale_until, 3) if outage and self.mode != STRICT else None,
                    "kept": self.kept, "allowed": self.allowed}


def describe_effect(snapshot: Dict[str, Any], now: float) -> str:
    """What an outage means for the gateway, in words, from a ``snapshot``: the status line's and ``status``'s."""
    mode = snapshot.get("mode")
    if snapshot.get("kept"):
        text = (f"serving {snapshot['kept']} stale authorization(s) until "
                f"{time.strftime('%H:%M:%SZ', time.gmtime(snapshot.get('stale_until') or 0))}")
    elif mode == STRICT:
        text = "cached authorizations expire as usual"
    elif (snapshot.get("stale_until") or 0) <= now:
        text = "past --max-stale, cached authorizations expire"
    else:
        text = "no cached authorization to keep"
    if snapshot.get("allowed"):
        text += f", {snapshot['allowed']} request(s) allowed without the backend"
    return f"{text} (--backend-outage {mode})"
