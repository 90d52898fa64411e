"""Prometheus metrics: the families the daemon exports, and cheap calls to record them.

The families live in prometheus_client's default registry, beside its process
and Python collectors, so ``/metrics`` shows them all. Recording never raises
and costs microseconds: the backend engine and the listener call these on
every request. Names and labels are a contract with the shipped alert rules
and dashboard (docs/operations.md, "Monitoring").
"""

import logging
from typing import Optional

from prometheus_client import Counter, Gauge, Histogram

from . import __version__

log = logging.getLogger(__name__)

ENDPOINTS = ("authorize", "oauth_authorize", "report")
CYCLE_RESULTS = ("ok", "partial", "failed")
# elsewhere: claimed and answered by another daemon on the same Redis
PRIORITY_RESULTS = ("authorized", "denied", "deduplicated", "failed", "dropped", "elsewhere")

#: Call latencies: a loopback backend answers in ms, a remote one in tens of ms, a sick one in seconds.
_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Up to the gateway's own timeout (apicast-xc's REDIS_TIMEOUT, 3 s): past it the answer is useless.
_PRIORITY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

backend_requests = Counter("xcflushd_backend_requests", "Backend calls, both paths, by endpoint and HTTP "
                           "status (or error: no well-framed answer)", ["endpoint", "code"])
backend_request_duration = Histogram("xcflushd_backend_request_duration_seconds", "Backend call duration",
                                     ["endpoint"], buckets=_CALL_BUCKETS)
flush_cycles = Counter("xcflushd_flush_cycles", "Flush cycles run, by result: ok (everything delivered), "
                       "partial (some reports kept for the next cycle), failed (the cycle stopped)", ["result"])
flush_phase = Histogram("xcflushd_flush_phase_seconds", "Duration of each flush cycle phase", ["phase"],
                        buckets=_PHASE_BUCKETS)
last_flush_success = Gauge("xcflushd_last_flush_success_timestamp_seconds",
                           "End of the last flush cycle that delivered every report (unix time)")
hits_reported = Counter("xcflushd_hits_reported", "Usage units acknowledged by the backend")
reports_pending = Gauge("xcflushd_reports_pending",
                        "Applications with usage waiting in Redis (gateway and hand-over keys)")
dead_letter_reports = Gauge("xcflushd_dead_letter_reports", "Entries in the dead-letter hash")
priority_requests = Counter("xcflushd_priority_requests", "Priority authorization requests on the channel, "
                            "by result", ["result"])
priority_response = Histogram("xcflushd_priority_response_seconds",
                              "Priority request received -> answer published", buckets=_PRIORITY_BUCKETS)
redis_degraded_writes = Counter("xcflushd_redis_degraded_writes", "Writes Redis refused for want of memory "
                                "(maxmemory, noeviction) that the daemon went on without, by what they were: "
                                "authorization (a cached authorization), lease, heartbeat, failure_count",
                                ["what"])
DEGRADED_WRITES = ("authorization", "lease", "heartbeat", "failure_count")
redis_up_gauge = Gauge("xcflushd_redis_up", "1 if the last Redis command got an answer, else 0")
backend_up_gauge = Gauge("xcflushd_backend_up", "1 if the last backend call got a well-framed answer below 500")
flush_frequency_gauge = Gauge("xcflushd_flush_frequency_seconds",
                              "Configured seconds between flush cycles (--frequency): alerts measure staleness in it")
backend_outage_gauge = Gauge("xcflushd_backend_outage", "1 while the backend is in an outage (no well-framed "
                             "answer, 5xx or 429 since the last cycle it answered every call), else 0")
backend_last_answer = Gauge("xcflushd_backend_last_answer_timestamp_seconds",
                            "When the backend last gave a well-framed answer (a 2xx, or a 4xx other than 429)")
authorizations_kept_gauge = Gauge("xcflushd_authorizations_kept_alive",
                                  "Cached authorizations whose TTL the last flush cycle renewed without the "
                                  "backend (--backend-outage resilient or allow, during an outage)")
outage_allowed_requests = Counter("xcflushd_outage_allowed_requests", "Priority requests answered 1 without "
                                  "the backend during an outage (--backend-outage allow)")
config_reload_ok = Gauge("xcflushd_config_last_reload_successful",
                         "1 if the last reload (SIGHUP) applied its configuration, 0 if it was refused")
config_reload_at = Gauge("xcflushd_config_last_reload_success_timestamp_seconds",
                         "When the running configuration was read: the start or the last good reload (unix time)")
build_info = Gauge("xcflushd_build_info", "Always 1; the version in a label", ["version"])
build_info.labels(__version__).set(1)

# Children created up front: every series exists from the first scrape, so
# rate() and absent() behave, and recording skips the label lookup.
_calls = {(e, c): backend_requests.labels(e, c) for e in ENDPOINTS for c in ("error",)}
_durations = {e: backend_request_duration.labels(e) for e in ENDPOINTS}
_priority = {r: priority_requests.labels(r) for r in PRIORITY_RESULTS}
for _result in CYCLE_RESULTS:
    flush_cycles.labels(_result)
for _what in DEGRADED_WRITES:
    redis_degraded_writes.labels(_what)


_backend_up: Optional[int] = None


def backend_call(endpoint: str, code: Optional[int], seconds: float) -> None:
    """One backend call ended: ``code`` is its HTTP status, None when no well-framed answer came."""
    try:
        label = "error" if code is None else str(code)
        child = _calls.get((endpoint, label))
        if child is None:
            child = _calls[(endpoint, label)] = backend_requests.labels(endpoint, label)
        child.inc()
        duration = _durations.get(endpoint)
        if duration is None:
            duration = _durations[endpoint] = backend_request_duration.labels(endpoint)
        duration.observe(seconds)
        global _backend_up
        up = 0 if code is None or code >= 500 else 1
        if up != _backend_up:  # set only on a change: a gauge set takes a lock, on every call
            backend_up_gauge.set(up)
            _backend_up = up
    except Exception as exc:  # metrics must never cost a call its outcome
        log.debug("metrics: %s", exc)


def priority_request(result: str, seconds: Optional[float] = None) -> None:
    """One priority request was handled; ``seconds`` from receipt to the published answer."""
    try:
        child = _priority.get(result) or priority_requests.labels(result)
        child.inc()
        if seconds is not None:
            priority_response.observe(seconds)
    except Exception as exc:
        log.debug("metrics: %s", exc)


def degraded_write(what: str, n: int = 1) -> None:
    """``n`` writes of ``what`` refused by a full Redis, done without."""
    try:
        if n:
            redis_degraded_writes.labels(what).inc(n)
    except Exception as exc:
        log.debug("metrics: %s", exc)


def redis_up(up: bool) -> None:
    redis_up_gauge.set(1 if up else 0)


def flush_cycle(result: str, phases=None, hits: int = 0, finished_at: Optional[float] = None,
                delivered_all: Optional[bool] = None) -> None:
    """A flush cycle ended with ``result`` (ok, partial or failed).

    ``delivered_all`` (default: result is ok) moves the last-success time: a
    cycle that delivered every report but failed to renew some authorization
    is partial, yet flushing is not stalled.
    """
    try:
        flush_cycles.labels(result).inc()
        for phase, seconds in (phases or {}).items():
            flush_phase.labels(phase).observe(seconds)
        if hits:
            hits_reported.inc(hits)
        if (result == "ok" if delivered_all is None else delivered_all) and finished_at:
            last_flush_success.set(finished_at)
    except Exception as exc:
        log.debug("metrics: %s", exc)


def backend_outage(outage: bool, last_answer: Optional[float] = None) -> None:
    backend_outage_gauge.set(1 if outage else 0)
    if last_answer is not None:
        backend_last_answer.set(last_answer)


def backend_answered(at: float) -> None:
    try:
        backend_last_answer.set(at)
    except Exception as exc:
        log.debug("metrics: %s", exc)


def authorizations_kept(count: int) -> None:
    authorizations_kept_gauge.set(count)


def outage_allowed() -> None:
    try:
        outage_allowed_requests.inc()
    except Exception as exc:
        log.debug("metrics: %s", exc)


def flush_frequency(seconds: float) -> None:
    flush_frequency_gauge.set(seconds)


def config_loaded(ok: bool, at: float) -> None:
    """The configuration was read at start or on reload; a refused reload leaves the last good one running."""
    config_reload_ok.set(1 if ok else 0)
    if ok:
        config_reload_at.set(at)


def backlog(pending: Optional[int] = None, dead_letters: Optional[int] = None) -> None:
    """What waits in Redis, as last counted."""
    if pending is not None:
        reports_pending.set(pending)
    if dead_letters is not None:
        dead_letter_reports.set(dead_letters)
