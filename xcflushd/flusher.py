"""One flush cycle: cached reports -> backend -> cached authorizations.

``Flusher.flush_once()`` is synchronous and testable; the scheduler decides
when it runs. Its backend calls are multiplexed from the calling thread
(``BackendClient.report_many``/``authorize_many``), ``concurrency`` at a time.
Phases: hand over (take reports out of the gateway's way), report (batched
per service only for applications confirmed by a live cached authorization,
decision 5; an application whose metrics that authorization does not vouch
for has them checked first, known_metrics.py), wait (the backend applies
reports asynchronously), authorize (each reported application), and store
the authorizations. The report phase streams through the reports in
chunks, so memory stays flat however many applications are pending.
"""

import collections
import logging
import sys
import threading
import time
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

from . import defaults, known_metrics, metrics
from .backend import LIMITS_EXCEEDED, BackendClient
from .errors import BackendError, BackendRejected, MalformedKey, StorageFull, StorageRefused, StorageUnavailable
from .keys import AUTHORIZED, Credentials, auth_key, denial_reason, denied, iter_chunks, parse_report_key, redact_key
from .outage import OutageTracker
from .probe import PROBE_APP_ID
from .storage import Cycle, HandOver, Report, Storage

log = logging.getLogger(__name__)

#: Authorization reasons that mean "this application does not exist for reporting".
UNKNOWN_APPLICATION = known_metrics.UNKNOWN_APPLICATION
#: Cached values that only an answer which checked the metric's name gives (known_metrics.py).
KNOWN_METRIC_VALUES = frozenset({AUTHORIZED, denied(LIMITS_EXCEEDED)})
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
        self.refused = 0          # reports with a metric the backend does not know: that usage set aside
        self.checked = 0          # applications whose metrics were checked before their report
        self.report_calls = 0
        self.authorized = 0       # applications whose auth hash was renewed
        self.auth_failures = 0
        self.not_cached = 0       # authorizations the backend gave that Redis did not take (full, or away)
        self.held = 0             # outcomes kept in memory while Redis was away, written when it came back
        self.kept_alive = 0       # cached authorizations held alive through a backend outage
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
                + (f"refused_metrics={self.refused} " if self.refused else "")
                + (f"checked={self.checked} " if self.checked else "")
                + (f"not_cached={self.not_cached} " if self.not_cached else "")
                + (f"held_while_redis_away={self.held} " if self.held else "")
                + (f"kept_alive_in_outage={self.kept_alive} " if self.kept_alive else "")
                + f"{phases} total={self.duration * 1000:.0f}ms(excl. wait)")
        return text + (f" error={self.error}" if self.error else "")


class Flusher:
    """Runs flush cycles for one owner (the daemon's heartbeat id; a one-shot flush's own id).

    Outcomes of backend calls (acknowledge, put back, dead letter) go
    through ``_apply``. When Redis is away for longer than the retry policy
    waits, they are held in memory, no new backend call starts, and the
    cycle keeps its lease and writes them when Redis is back: a Redis
    restart never makes a delivered report look undelivered.
    """

    def __init__(self, storage: Storage, backend: BackendClient,
                 settings: Optional[FlushSettings] = None, stop: Optional[threading.Event] = None,
                 owner: str = "", outage: Optional[OutageTracker] = None):
        self.storage = storage
        self.backend = backend
        self.settings = settings or FlushSettings()
        self.stop = stop or threading.Event()
        self.owner = owner
        self.outage = outage  # None: strict, no outage bookkeeping (a one-shot flush)
        self.last_progress = time.monotonic()  # moves while a cycle works; for the watchdog
        self.held: List[Tuple[str, tuple]] = []  # outcomes not yet written: (what, arguments)
        self._redis_lost: Optional[str] = None
        self._refused: Optional[StorageRefused] = None  # Redis said no to a write this cycle needed
        self._cycle: Optional[Cycle] = None
        self._renewed = 0.0

    # ---- the cycle -----------------------------------------------------------

    def flush_once(self, recover: bool = False) -> FlushResult:
        """Run one cycle. Never raises for Redis or backend trouble: see ``result.error``."""
        result = FlushResult()
        cycle = self._cycle = Cycle.new(self.owner)
        self._redis_lost = self._refused = None
        clock = _PhaseClock(result)
        if self.outage is not None:
            self.outage.begin_cycle()
        try:
            self._take_lease(cycle)
            with clock("handover"):
                owned = self.storage.hand_over(cycle, recover)
            with clock("report"):
                to_authorize = self._report_all(owned, cycle, result)
            if self.held:
                self._write_held(result)
            if self._refused is not None:
                raise self._refused  # a failed cycle: counted, logged, and the next one runs on time
            if not self.held:
                self.storage.release_lease(cycle)
            if to_authorize and not self.stop.is_set():
                with clock("wait"):
                    self._wait(self.settings.report_auth_wait)
            if to_authorize and not self.stop.is_set():
                with clock("authorize"):
                    self._authorize_all(to_authorize, result)
        except Exception as exc:  # one bad cycle must not kill the scheduler
            result.error = f"{type(exc).__name__}: {exc}"
        if self.outage is not None:
            self._through_outage(result)
        if self.held:
            log.error("stopping with %d outcome(s) of backend calls not written to Redis: the usage of %d "
                      "delivered report(s) stays there and will be reported again",
                      len(self.held), sum(len(a[0]) for w, a in self.held if w == "ack"))
            self.held = []
        result.finished_at = time.time()
        return result

    def _take_lease(self, cycle: Cycle) -> None:
        try:
            self.storage.take_lease(cycle, self.settings.lease_ttl)
        except StorageFull as exc:  # only before Redis 7
            metrics.degraded_write("lease")
            # Without a lease or a heartbeat, other daemons would take our keys for a dead cycle's.
            if not self.storage.vouched(cycle.owner):
                raise StorageFull(f"no lease and no heartbeat to vouch for the cycle, not run: {exc}") from None
            log.warning("flush cycle without a lease, Redis is full; the heartbeat vouches for it: %s", exc)
        self._renewed = time.monotonic()

    def _renew_lease(self, force: bool = False) -> None:
        """A live cycle renews its lease often, so a lease can only outlive a dead cycle briefly."""
        if self._cycle is None or (not force and time.monotonic() - self._renewed < defaults.LEASE_RENEW_INTERVAL):
            return
        self._renewed = time.monotonic()
        try:
            self.storage.renew_lease(self._cycle, self.settings.lease_ttl)
        except StorageUnavailable as exc:
            if isinstance(exc, StorageFull):
                metrics.degraded_write("lease")
            log.warning("lease not renewed: %s", exc)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.last_progress = time.monotonic()
            self.stop.wait(min(1.0, deadline - time.monotonic()))

    # ---- outcomes --------------------------------------------------------------

    def _apply(self, what: str, *args) -> None:
        """Write one outcome to Redis, or hold it while Redis is away."""
        if self._redis_lost is None:
            try:
                self._write(what, args)
                return
            except StorageFull as exc:
                if what == "ack":
                    raise  # DEL needs no memory: not a full Redis
                # Only before Redis 7 (no allow-oom): the usage stays in its
                # hand-over key, which the next cycle adopts.
                log.warning("could not %s, Redis is full: the usage stays in its hand-over key (%s)",
                            "put back reports" if what == "restore" else "dead-letter a report", exc)
                return
            except StorageRefused as exc:
                self._refuse(exc)
            except StorageUnavailable as exc:
                self._redis_lost = str(exc)
                log.warning("Redis away (%s): no new backend calls; outcomes of the calls in flight are held "
                            "until it is back", exc)
        self.held.append((what, args))

    def _refuse(self, exc: StorageRefused) -> None:
        """Redis refuses a write no wait will fix: no new backend call; held outcomes get one more try."""
        if self._refused is None:
            self._refused = exc
            self._redis_lost = str(exc)
            log.error("Redis refused a write of this flush cycle (%s): no new backend calls, the cycle fails; "
                      "what it could not write stays in its hand-over keys for a later cycle", exc)

    def _write(self, what: str, args: tuple) -> None:
        if what == "ack":
            self.storage.acknowledge(args[0])
        elif what == "restore":
            self.storage.restore(args[0])
        else:
            self.storage.dead_letter(*args)

    def _write_held(self, result: FlushResult) -> None:
        """Retry the held outcomes until Redis takes them (each try under the retry policy)."""
        result.held = len(self.held)
        last_try = False
        while self.held:
            self.last_progress = time.monotonic()
            try:
                while self.held:
                    self._write(*self.held[0])
                    self.held.pop(0)
                self._redis_lost = None
                self._renew_lease(force=True)
                log.info("Redis is back: wrote %d held outcome(s)", result.held)
                return
            except StorageRefused as exc:
                self._refuse(exc)
                return  # an operator must act first: retrying each second would only look like an outage
            except StorageUnavailable as exc:
                if last_try:
                    return
                log.warning("Redis still away (%s); %d outcome(s) held", exc, len(self.held))
            if self.stop.wait(1.0):
                last_try = True  # stopping: one more try, then give up (flush_once says so)

    # ---- backend outage ------------------------------------------------------

    def _through_outage(self, result: FlushResult) -> None:
        """After each cycle: settle the outage state; while it lasts (resilient, allow), hold every
        cached authorization alive. Runs every --frequency <= --auth-ttl, so none expires between two."""
        if self.outage.quiet() and not self.stop.is_set():
            self._ask_backend()
        self.outage.settle()
        ttl = self.outage.keep_alive_ttl(self.settings.auth_ttl)
        if ttl:
            try:
                result.kept_alive = self.storage.keep_alive(ttl, self.outage.not_kept_alive())
            except StorageUnavailable as exc:
                log.warning("backend outage: cached authorizations not kept alive this cycle: %s", exc)
                return
        self.outage.kept_alive(result.kept_alive)

    def _ask_backend(self) -> None:
        """A cycle that made no backend call cannot tell that an outage is over, and a node without
        traffic would keep authorizations alive and the alert firing until --max-stale: one
        read-only authorize for an application that cannot exist (as check-backend) asks, and is
        judged like any call (a 404 application_not_found is an answer)."""
        service_id = self.backend.service_credentials.any_service()
        if service_id is not None:
            probe = [(None, service_id, Credentials({"app_id": PROBE_APP_ID}))]
            for _ in self.backend.authorize_many(probe, 1):
                self.last_progress = time.monotonic()

    # ---- report phase --------------------------------------------------------

    def _report_all(self, owned: HandOver, cycle: Cycle, result: FlushResult) -> "_ToAuthorize":
        """Deliver every owned report; returns the applications to authorize, with their reported metrics."""
        to_authorize = _ToAuthorize()
        acks = _Acks(self, result)
        calls: Iterable[List[Report]] = self._calls(owned, cycle, result, to_authorize, acks)
        while calls:
            retry: List[List[Report]] = []
            try:
                self._deliver(calls, cycle, result, acks, retry)
            finally:
                acks.flush()  # what the backend took must leave Redis, whatever happens next
            calls = retry if not self._stopping() else []
        return to_authorize

    def _stopping(self) -> bool:
        return self.stop.is_set() or self._redis_lost is not None

    def _deliver(self, calls, cycle: Cycle, result: FlushResult, acks: "_Acks", retry: List) -> None:
        """Send report calls; acknowledge, restore, set aside, or queue halves in ``retry``."""
        for call, error in self.backend.report_many(
                ((call, call[0].service_id, [(r.credentials, r.usage) for r in call])
                 for call in self._while_running(calls)),
                self.settings.concurrency, self.settings.transactions_in_flight, on_idle=acks.idle):
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
                self._apply("restore", call)
                result.add(failed=len(call))
            self._renew_lease()

    def _while_running(self, calls: Iterable[List[Report]]) -> Iterator[List[Report]]:
        """No new backend call once stopping or Redis is away: what is not sent stays in its hand-over key."""
        for call in calls:
            if self._stopping():
                return
            yield call

    def _calls(self, owned, cycle, result, to_authorize, acks: "_Acks") -> Iterator[List[Report]]:
        """Read owned reports chunk by chunk and group them into report calls."""
        # Through an outage the cached authorizations confirm nothing: kept alive, an application
        # deleted meanwhile still says 1, and its transaction would make the backend drop a batch.
        batching = self.settings.batch_size > 1 and not (self.outage is not None and self.outage.in_outage)
        batches: Dict[str, List[Report]] = {}
        params: Dict[str, int] = {}
        metric_sets: Dict[Tuple[str, ...], Tuple[str, ...]] = {}
        for chunk in iter_chunks(owned.items(), defaults.REDIS_CHUNK):
            acks.flush()  # not held while the next chunk is read
            if self._stopping():
                return
            try:
                reports = self.storage.read_reports(chunk, cycle)
                # Only a flag per report is kept: the cached hashes (a dict of
                # strings each) would stay alive while the chunk is batched.
                confirmed = [_confirmed(c, r) for c, r in zip(self.storage.cached_authorizations(
                    [auth_key(r.service_id, r.credentials) for r in reports]), reports)]
            except StorageRefused as exc:
                self._refuse(exc)
                return
            except StorageUnavailable as exc:
                # The calls in flight finish and their outcomes are held; the
                # unread reports stay in their hand-over keys.
                self._redis_lost = str(exc)
                log.warning("Redis away while reading reports (%s): no new backend calls", exc)
                return
            result.add(reports=len(reports))
            unconfirmed = []
            for i, report in enumerate(reports):
                metrics = tuple(map(sys.intern, report.usage))
                to_authorize.add(report.report_key, metric_sets.setdefault(metrics, metrics))  # shared copies
                if not confirmed[i]:
                    unconfirmed.append(report)
                    continue
                full = self._batch(report, batches, params) if batching else [report]
                if full:
                    yield full
            # A check that found the application and every name it reports confirms it as a cached
            # authorization does (decision 5), only fresher: a cold cycle batches too.
            for report, found in self._checked(unconfirmed, cycle, result, acks):
                full = self._batch(report, batches, params) if batching and found else [report]
                if full:
                    yield full
        if not self._stopping():
            yield from (b for b in batches.values() if b)

    def _batch(self, report: Report, batches: Dict[str, List[Report]], params: Dict[str, int]
               ) -> Optional[List[Report]]:
        """Put a report in its service's batch; returns the batch it closed, to be sent."""
        size = len(report.usage) + 1
        batch = batches.setdefault(report.service_id, [])
        closed = None
        if batch and (len(batch) >= self.settings.batch_size or
                      params[report.service_id] + size > self.settings.batch_max_params - _PARAMS_PER_CALL):
            closed = batch
            batch = batches[report.service_id] = []
            params[report.service_id] = 0
        batch.append(report)
        params[report.service_id] = params.get(report.service_id, 0) + size
        return closed

    def _checked(self, reports: List[Report], cycle: Cycle, result: FlushResult, acks: "_Acks"
                 ) -> Iterator[Tuple[Report, bool]]:
        """Ask the backend about the metrics of reports no cached authorization vouches for; yield
        each as its answer comes (what the backend knows of it), so its report call starts while
        other checks are in flight, and whether the answer found its application by the credentials
        its transaction carries (so it may be batched).

        A report not yielded went to the dead letter whole, or stays in Redis:
        put back for the next cycle, or in its hand-over key when stopping.
        """
        # One check for an application met several times (its leftovers of dead cycles, adopted together).
        alike: Dict[Tuple, List[int]] = {}
        for i, r in enumerate(reports):
            alike.setdefault((r.service_id, r.credentials, frozenset(r.usage)), []).append(i)
        items = ((same, reports[same[0]].service_id, reports[same[0]].credentials, tuple(reports[same[0]].usage))
                 for same in self._while_running(alike.values()))
        for same, outcome in known_metrics.check(self.backend, items, self.settings.concurrency, on_idle=acks.idle):
            self.last_progress = time.monotonic()
            if not isinstance(outcome, BackendError):
                result.add(checked=1)
            for i in same:
                report = reports[i]
                if isinstance(outcome, BackendRejected):
                    self._rejected([report], outcome, cycle, result)  # e.g. 422 not_valid_data: so would its report
                elif isinstance(outcome, BackendError):
                    log.warning("could not check the metrics of %s, kept for the next cycle: %s",
                                redact_key(report.report_key), outcome)
                    result.backend_failed("metric check failed", outcome)
                    self._apply("restore", [report])
                    result.add(failed=1)
                else:
                    report = self._set_aside(report, outcome.refused, result) if outcome.refused else report
                    if report is not None:
                        yield report, outcome.status is None and _identified(report)

    def _set_aside(self, report: Report, refused: Dict[str, Tuple[str, str]], result: FlushResult
                   ) -> Optional[Report]:
        """Usage of metrics the backend does not know goes to the dead letter; the rest is what to send."""
        reason = "; ".join(sorted({why for _, why in refused.values()}))
        if self._redis_lost is not None:
            return None  # the whole report stays in its hand-over key
        try:
            self.storage.dead_letter_metrics(report, list(refused), reason)
        except StorageFull as exc:
            log.warning("could not dead-letter a report, Redis is full: the usage stays in its hand-over key (%s)",
                        exc)
            return None
        except StorageRefused as exc:
            self._refuse(exc)
            return None
        except StorageUnavailable as exc:
            self._redis_lost = str(exc)
            log.warning("Redis away (%s): no new backend calls", exc)
            return None
        log.error("usage of %s for metric(s) the backend does not know moved to %s: %s",
                  redact_key(report.report_key), defaults.DEAD_LETTER_HASH, reason)
        result.add(refused=1)
        rest = {m: v for m, v in report.usage.items() if m not in refused}
        return report._replace(usage=rest) if rest else None

    def _rejected(self, call: List[Report], exc: BackendRejected, cycle: Cycle, result: FlushResult) -> None:
        result.backend_failed("report refused", exc)
        if exc.code in CREDENTIAL_ERRORS or exc.status == 0:
            log.error("report for service %s refused, our credentials: %s (kept for the next cycle)",
                      call[0].service_id, exc)
            self._apply("restore", call)
            result.add(failed=len(call))
            return
        if exc.code not in HOPELESS_ERRORS:
            # No error code (an empty 4xx from a proxy, say) or one we do not
            # know: nothing says retrying cannot work, so it is retried.
            log.warning("report for service %s refused (%s), kept for the next cycle", call[0].service_id, exc)
            self._apply("restore", call)
            result.add(failed=len(call))
            return
        report = call[0]
        failures = 1
        if self._redis_lost is None:
            try:
                failures = self.storage.count_failure(report)
            except StorageFull:
                metrics.degraded_write("failure_count")  # counted from 1 again: retried a little longer
            except StorageUnavailable:
                pass  # _apply below holds the put-back
        if failures >= self.settings.dead_letter_after:
            log.error("report of %s refused %d times (%s): moved to %s", redact_key(report.report_key),
                      failures, exc, defaults.DEAD_LETTER_HASH)
            self._apply("dead_letter", report, str(exc), cycle)
            result.add(dead_lettered=1)
        else:
            log.warning("report of %s refused (%s), attempt %d of %d", redact_key(report.report_key), exc,
                        failures, self.settings.dead_letter_after)
            self._apply("restore", call)
            result.add(failed=1)

    # ---- authorize phase -----------------------------------------------------

    def _authorize_all(self, to_authorize: "_ToAuthorize", result: FlushResult) -> None:
        failures: Dict[str, int] = collections.Counter()
        renewed = []
        not_cached: Dict[str, int] = collections.Counter()
        items = self._authorize_items(to_authorize, failures)
        for key, outcome in known_metrics.authorize(self.backend, items, self.settings.concurrency):
            self.last_progress = time.monotonic()
            if isinstance(outcome, BackendError):
                failures[str(outcome)] += 1
                result.backend_failed("authorize failed", outcome)
                continue
            renewed.append((key, outcome))
            if len(renewed) >= defaults.REDIS_CHUNK:
                self._cache(renewed, result, not_cached)
                renewed = []
        self._cache(renewed, result, not_cached)
        result.add(auth_failures=sum(failures.values()))
        for message, count in failures.items():
            log.warning("authorize failed for %d application(s), their cached authorizations not renewed: %s",
                        count, message)
        if not_cached:
            log.warning("flush cycle delivered %d report(s), could not cache %d authorization(s): %s",
                        result.delivered, result.not_cached, "; ".join(not_cached))

    def _cache(self, renewed: List, result: FlushResult, not_cached: Dict[str, int]) -> None:
        """Write renewed authorizations; what Redis cannot take is counted, not fatal."""
        if not renewed:
            return
        try:
            refused = self.storage.write_authorizations(renewed, self.settings.auth_ttl)
            reason = "Redis is full (maxmemory)"
        except StorageUnavailable as exc:
            refused, reason = len(renewed), str(exc)
        if refused:
            metrics.degraded_write("authorization", refused)
            not_cached[reason] += refused
        result.add(authorized=len(renewed) - refused, not_cached=refused)

    def _authorize_items(self, to_authorize: "_ToAuthorize", failures: Dict[str, int]):
        for report_key_, metrics_ in to_authorize.items():
            if self.stop.is_set():
                return  # SIGTERM: the calls in flight finish, no new one starts
            try:
                service_id, creds = parse_report_key(report_key_)
            except MalformedKey as exc:
                failures[str(exc)] += 1
                continue
            yield auth_key(service_id, creds), service_id, creds, metrics_


class _ToAuthorize:
    """Report keys and their reported metrics, in two lists.

    A dict of 50 000 of them cost 1.9 MB of table at the report phase's peak;
    two lists cost 0.8 MB. A report key met twice (a leftover of a dead cycle
    beside the same application's new report) is authorized for each.
    """

    __slots__ = ("keys", "metrics")

    def __init__(self):
        self.keys: List[str] = []
        self.metrics: List[Tuple[str, ...]] = []

    def add(self, report_key: str, metrics_: Tuple[str, ...]) -> None:
        self.keys.append(report_key)
        self.metrics.append(metrics_)

    def __len__(self) -> int:
        return len(self.keys)

    def items(self) -> Iterator[Tuple[str, Tuple[str, ...]]]:
        return zip(self.keys, self.metrics)


class _Acks:
    """Acknowledged reports, deleted from Redis together.

    They are deleted as soon as no other answer is ready to be read (the
    multiplexer is about to wait: ``idle`` is its ``on_idle``), or when 64
    pile up. So answers that arrive together cost one Redis round trip, not
    one each, and usage the backend took leaves Redis before anything else
    is awaited: the at-least-once window stays the time to handle the answers
    at hand.
    """

    MAX = 64

    def __init__(self, flusher: "Flusher", result: FlushResult):
        self.flusher = flusher
        self.result = result
        self.pending: List[Report] = []

    def add(self, call: List[Report]) -> None:
        self.pending.extend(call)
        if len(self.pending) >= self.MAX:
            self.flush()

    def idle(self) -> None:
        self.flush()
        self.flusher._renew_lease()

    def flush(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, []
            self.flusher._apply("ack", pending)
            self.result.add(delivered=len(pending), hits=sum(sum(r.usage.values()) for r in pending))


def _identified(report: Report) -> bool:
    """Its transaction names the application: an access token alone it does not (observed: the
    backend answers 202, then drops the whole call, "application with id="" was not found")."""
    return report.credentials.get("app_id") is not None or report.credentials.get("user_key") is not None


def _confirmed(cached: Dict[str, str], report: Report) -> bool:
    """A live auth hash shows the application exists and knows these metrics.

    A metric's field alone does not: a denial of the application (a wrong
    app_key, say) covers names the backend never checked.
    """
    if not cached or not _identified(report):
        return False
    if any(denial_reason(v) in UNKNOWN_APPLICATION for v in cached.values()):
        return False
    return all(cached.get(metric) in KNOWN_METRIC_VALUES for metric in report.usage)


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
