"""One flush cycle: cached reports -> backend -> cached authorizations.

``Flusher.flush_once()`` is synchronous and testable; the scheduler decides
when it runs. Its backend calls are multiplexed from the calling thread
(``BackendClient.report_many``/``authorize_many``), ``concurrency`` at a time.
Phases: hand over (take reports out of the gateway's way), report (batched
per service only for applications confirmed by a live cached authorization,
decision 5), wait (the backend applies reports asynchronously), authorize
(each reported application), and store the authorizations. The report phase
streams through the reports in chunks, so memory stays flat however many
applications are pending.
"""

import collections
import logging
import sys
import threading
import time
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

from . import defaults
from .authorizer import authorizations
from .backend import BackendClient
from .errors import BackendError, BackendRejected, MalformedKey
from .keys import auth_key, denial_reason, iter_chunks, parse_report_key, redact_key
from .storage import Cycle, HandOver, Report, Storage

log = logging.getLogger(__name__)

#: Authorization reasons that mean "this application does not exist for reporting".
UNKNOWN_APPLICATION = frozenset({
    "application_not_found", "user_key_invalid", "authentication_error", "access_token_invalid",
})
#: Report rejections about our own credentials: an operator can fix them, so keep retrying.
CREDENTIAL_ERRORS = frozenset({
    "provider_key_invalid", "provider_key_invalid_or_service_missing", "service_id_invalid",
    "service_token_invalid", "service_id_missing", "provider_key_or_service_token_required",
    "no_credentials",
})
#: Refusals of one application's report that retrying cannot fix: the data
#: itself is refused. After a few cycles such a report goes to the dead letter.
HOPELESS_ERRORS = frozenset({
    "not_valid_data", "end_users_no_longer_supported", "bad_request", "usage_value_invalid", "metric_invalid",
    "transactions_format_invalid", "transactions_is_blank", "transactions_has_nil_transaction",
})
_PARAMS_PER_CALL = 3  # provider_key/service_token + service_id, with a margin


class FlushSettings(NamedTuple):
    auth_ttl: int = defaults.AUTH_TTL
    report_auth_wait: float = defaults.REPORT_AUTH_WAIT
    batch_size: int = defaults.REPORT_BATCH_SIZE
    batch_max_params: int = defaults.REPORT_BATCH_MAX_PARAMS
    lease_ttl: int = defaults.LEASE_TTL
    dead_letter_after: int = defaults.DEAD_LETTER_AFTER
    concurrency: int = defaults.THREADS     # backend calls in flight at once
    # Reports held by report calls in flight: bounds memory when batches are
    # large (32 batches of 1000 would hold 32 000 reports at once).
    transactions_in_flight: int = 2 * defaults.REPORT_BATCH_SIZE


class FlushResult:
    """What one cycle did; ``ok`` when every report was delivered."""

    def __init__(self):
        self.reports = 0
        self.delivered = 0
        self.hits = 0             # usage units the backend acknowledged
        self.failed = 0           # put back into Redis for the next cycle
        self.dead_lettered = 0
        self.report_calls = 0
        self.authorized = 0       # applications whose auth hash was renewed
        self.auth_failures = 0
        self.phases: Dict[str, float] = {}
        self.error: Optional[str] = None
        self.backend_error: Optional[str] = None  # the first backend or authorization failure, one line
        self.started_at = time.time()
        self.finished_at = 0.0

    def add(self, **counts):
        for name, n in counts.items():
            setattr(self, name, getattr(self, name) + n)

    def backend_failed(self, what: str, error: Exception) -> None:
        """Remember the first backend failure: the rollout gate and ``status`` name it."""
        if self.backend_error is None:
            self.backend_error = f"{what}: {error}"[:200]

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and self.dead_lettered == 0

    @property
    def duration(self) -> float:
        return sum(v for k, v in self.phases.items() if k != "wait")

    def summary(self) -> str:
        phases = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.phases.items())
        text = (f"reports={self.reports} delivered={self.delivered} failed={self.failed} "
                f"dead_letter={self.dead_lettered} report_calls={self.report_calls} "
                f"authorized={self.authorized} auth_failures={self.auth_failures} "
                f"{phases} total={self.duration * 1000:.0f}ms(excl. wait)")
        return text + (f" error={self.error}" if self.error else "")


class Flusher:
    def __init__(self, storage: Storage, backend: BackendClient,
                 settings: Optional[FlushSettings] = None, stop: Optional[threading.Event] = None):
        self.storage = storage
        self.backend = backend
        self.settings = settings or FlushSettings()
        self.stop = stop or threading.Event()
        self.last_progress = time.monotonic()  # moves while a cycle works; for the watchdog

    # ---- the cycle -----------------------------------------------------------

    def flush_once(self, recover: bool = False) -> FlushResult:
        """Run one cycle. Never raises for Redis or backend trouble: see ``result.error``."""
        result = FlushResult()
        cycle = Cycle.new()
        clock = _PhaseClock(result)
        try:
            self.storage.take_lease(cycle, self.settings.lease_ttl)
            with clock("handover"):
                owned = self.storage.hand_over(cycle, recover)
            with clock("report"):
                to_authorize = self._report_all(owned, cycle, result)
            self.storage.release_lease(cycle)
            if to_authorize and not self.stop.is_set():
                with clock("wait"):
                    self._wait(self.settings.report_auth_wait)
            if to_authorize and not self.stop.is_set():
                with clock("authorize"):
                    self._authorize_all(to_authorize, result)
        except Exception as exc:  # one bad cycle must not kill the scheduler
            result.error = f"{type(exc).__name__}: {exc}"
        result.finished_at = time.time()
        return result

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.last_progress = time.monotonic()
            self.stop.wait(min(1.0, deadline - time.monotonic()))

    # ---- report phase --------------------------------------------------------

    def _report_all(self, owned: HandOver, cycle: Cycle,
                    result: FlushResult) -> Dict[str, Tuple[str, ...]]:
        """Deliver every owned report; returns report key -> reported metrics."""
        to_authorize: Dict[str, Tuple[str, ...]] = {}
        acks = _Acks(self.storage, result)
        calls: Iterable[List[Report]] = self._calls(owned, cycle, result, to_authorize, acks)
        while calls:
            retry: List[List[Report]] = []
            try:
                self._deliver(calls, cycle, result, acks, retry)
            finally:
                acks.flush()  # what the backend took must leave Redis, whatever happens next
            calls = retry
        return to_authorize

    def _deliver(self, calls, cycle: Cycle, result: FlushResult, acks: "_Acks", retry: List) -> None:
        """Send report calls; acknowledge, restore, set aside, or queue halves in ``retry``."""
        last_renewal = time.monotonic()
        for call, error in self.backend.report_many(
                ((call, call[0].service_id, [(r.credentials, r.usage) for r in call])
                 for call in self._unless_stopping(calls, result)),
                self.settings.concurrency, self.settings.transactions_in_flight, on_idle=acks.flush):
            self.last_progress = time.monotonic()
            result.add(report_calls=1)
            if error is None:
                acks.add(call)
            elif isinstance(error, BackendRejected) and len(call) > 1 and error.code not in CREDENTIAL_ERRORS:
                # Too big (bad_request) or one bad transaction: never let it
                # hold the others back; halves, down to single calls.
                log.warning("report of %d transactions for service %s rejected (%s): splitting",
                            len(call), call[0].service_id, error)
                half = len(call) // 2
                retry += [call[:half], call[half:]]
            elif isinstance(error, BackendRejected):
                self._rejected(call, error, cycle, result)
            else:
                log.warning("report for service %s failed, %d report(s) kept for the next cycle: %s",
                            call[0].service_id, len(call), error)
                result.backend_failed("report failed", error)
                self.storage.restore(call)
                result.add(failed=len(call))
            if time.monotonic() - last_renewal > self.settings.lease_ttl / 3:
                self.storage.renew_lease(cycle, self.settings.lease_ttl)
                last_renewal = time.monotonic()

    def _unless_stopping(self, calls: Iterable[List[Report]], result: FlushResult) -> Iterator[List[Report]]:
        for call in calls:
            if self.stop.is_set():
                self.storage.restore(call)  # stopping: hand usage back to the gateway's set now
                result.add(failed=len(call))
            else:
                yield call

    def _calls(self, owned, cycle, result, to_authorize, acks: "_Acks") -> Iterator[List[Report]]:
        """Read owned reports chunk by chunk and group them into report calls."""
        batching = self.settings.batch_size > 1
        batches: Dict[str, List[Report]] = {}
        params: Dict[str, int] = {}
        metric_sets: Dict[Tuple[str, ...], Tuple[str, ...]] = {}
        for chunk in iter_chunks(owned.items(), defaults.REDIS_CHUNK):
            acks.flush()  # not held while the next chunk is read
            reports = self.storage.read_reports(chunk, cycle)
            result.add(reports=len(reports))
            cached = self.storage.cached_authorizations(
                [auth_key(r.service_id, r.credentials) for r in reports]) if batching else []
            for i, report in enumerate(reports):
                metrics = tuple(map(sys.intern, report.usage))
                to_authorize[report.report_key] = metric_sets.setdefault(metrics, metrics)  # shared copies
                if not batching or not _confirmed(cached[i], report.usage):
                    yield [report]
                    continue
                size = len(report.usage) + 1
                batch = batches.setdefault(report.service_id, [])
                if batch and (len(batch) >= self.settings.batch_size or
                              params[report.service_id] + size > self.settings.batch_max_params - _PARAMS_PER_CALL):
                    yield batch
                    batch = batches[report.service_id] = []
                    params[report.service_id] = 0
                batch.append(report)
                params[report.service_id] = params.get(report.service_id, 0) + size
        yield from (b for b in batches.values() if b)

    def _rejected(self, call: List[Report], exc: BackendRejected, cycle: Cycle, result: FlushResult) -> None:
        result.backend_failed("report refused", exc)
        if exc.code in CREDENTIAL_ERRORS or exc.status == 0:
            log.error("report for service %s refused, our credentials: %s (kept for the next cycle)",
                      call[0].service_id, exc)
            self.storage.restore(call)
            result.add(failed=len(call))
            return
        if exc.code not in HOPELESS_ERRORS:
            # No error code (an empty 4xx from a proxy, say) or one we do not
            # know: nothing says retrying cannot work, so it is retried.
            log.warning("report for service %s refused (%s), kept for the next cycle", call[0].service_id, exc)
            self.storage.restore(call)
            result.add(failed=len(call))
            return
        report = call[0]
        failures = self.storage.count_failure(report)
        if failures >= self.settings.dead_letter_after:
            log.error("report of %s refused %d times (%s): moved to %s", redact_key(report.report_key),
                      failures, exc, defaults.DEAD_LETTER_HASH)
            self.storage.dead_letter(report, str(exc), cycle)
            result.add(dead_lettered=1)
        else:
            log.warning("report of %s refused (%s), attempt %d of %d", redact_key(report.report_key), exc,
                        failures, self.settings.dead_letter_after)
            self.storage.restore(call)
            result.add(failed=1)

    # ---- authorize phase -----------------------------------------------------

    def _authorize_all(self, to_authorize: Dict[str, Tuple[str, ...]], result: FlushResult) -> None:
        failures: Dict[str, int] = collections.Counter()
        renewed = []
        items = self._authorize_items(to_authorize, failures)
        for (key, metrics), outcome in self.backend.authorize_many(items, self.settings.concurrency):
            self.last_progress = time.monotonic()
            if isinstance(outcome, BackendError):
                failures[str(outcome)] += 1
                result.backend_failed("authorize failed", outcome)
                continue
            renewed.append((key, authorizations(outcome, metrics)))
            if len(renewed) >= defaults.REDIS_CHUNK:
                self.storage.write_authorizations(renewed, self.settings.auth_ttl)
                result.add(authorized=len(renewed))
                renewed = []
        self.storage.write_authorizations(renewed, self.settings.auth_ttl)
        result.add(authorized=len(renewed), auth_failures=sum(failures.values()))
        for message, count in failures.items():
            log.warning("authorize failed for %d application(s), cached authorizations left to expire: %s",
                        count, message)

    @staticmethod
    def _authorize_items(to_authorize: Dict[str, Tuple[str, ...]], failures: Dict[str, int]):
        for report_key_, metrics in to_authorize.items():
            try:
                service_id, creds = parse_report_key(report_key_)
            except MalformedKey as exc:
                failures[str(exc)] += 1
                continue
            yield (auth_key(service_id, creds), metrics), service_id, creds


class _Acks:
    """Acknowledged reports, deleted from Redis together.

    They are deleted as soon as no other answer is ready to be read (the
    multiplexer is about to wait: ``flush`` is its ``on_idle``), or when 64
    pile up. So answers that arrive together cost one Redis round trip, not
    one each, and usage the backend took leaves Redis before anything else
    is awaited: the at-least-once window stays the time to handle the answers
    at hand.
    """

    MAX = 64

    def __init__(self, storage: Storage, result: FlushResult):
        self.storage = storage
        self.result = result
        self.pending: List[Report] = []

    def add(self, call: List[Report]) -> None:
        self.pending.extend(call)
        if len(self.pending) >= self.MAX:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.storage.acknowledge(self.pending)
            self.result.add(delivered=len(self.pending), hits=sum(sum(r.usage.values()) for r in self.pending))
            self.pending = []


def _confirmed(cached: Dict[str, str], usage: Dict[str, int]) -> bool:
    """A live auth hash shows the application exists and knows these metrics."""
    if not cached:
        return False
    if any(denial_reason(v) in UNKNOWN_APPLICATION for v in cached.values()):
        return False
    return all(metric in cached for metric in usage)


class _PhaseClock:
    def __init__(self, result: FlushResult):
        self.result = result

    def __call__(self, phase: str):
        self.phase = phase
        return self

    def __enter__(self):
        self.start = time.monotonic()

    def __exit__(self, *exc):
        self.result.phases[self.phase] = time.monotonic() - self.start
