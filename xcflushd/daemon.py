"""The daemon's lifecycle: build, wait for Redis, serve, stop gracefully.

Threads: the main thread handles signals and feeds the systemd watchdog; the
scheduler thread runs flush cycles; the listener thread takes priority auth
requests and the answerer publishes their answers; the backend engine thread
makes every backend call. The watchdog is fed only while all of them show
life, so a wedged thread gets the service restarted, while a Redis or backend
outage (threads alive, retrying) does not.

SIGHUP reloads: the main thread re-reads the configuration as a start does
and, when it validates, starts a new backend engine for new calls; the
priority subscription stays up, calls in flight finish on the old engine,
which is closed once idle, and a flush cycle in progress ends with the engine
and settings it began with.
"""

import dataclasses
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Mapping, Optional

from . import __version__, defaults, exporter, metrics
from .backend import ServiceCredentials, client_for
from .config import Settings
from .errors import ConfigError
from .flusher import Flusher, FlushResult, FlushSettings
from .heartbeat import Heartbeat, cycle_result
from .notify import Notifier
from .outage import OutageTracker, describe_effect
from .renewer import PriorityRenewer
from .scheduler import Scheduler
from .storage import Storage, connect

log = logging.getLogger(__name__)

TERM_MARGIN = 5.0  # seconds to write the outcomes of the last backend calls before a stop gives up
#: Settings a reload cannot change, as the options that set them: they need a restart.
RESTART_ONLY = (("redis_url", "--redis"), ("redis_password", "the Redis password"),
                ("metrics_listen", "--metrics-listen"), ("backend_outage", "--backend-outage"),
                ("max_stale", "--max-stale"))


def _clock(ts: Optional[float]) -> str:
    return time.strftime("%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


class Daemon:
    def __init__(self, settings: Settings, environ: Mapping[str, str] = os.environ,
                 reread: Optional[Callable[[], Settings]] = None):
        self.settings = settings
        self.reread = reread          # reads the configuration again, as the start did; ConfigError if bad
        self.stop = threading.Event()
        self.reload_wanted = threading.Event()  # set by SIGHUP; the main thread reloads
        self.notifier = Notifier(environ)
        self.last_result: Optional[FlushResult] = None
        s = settings
        # Redis clients: the listener, the answerer, the scheduler, the heartbeat, and spares.
        self.redis = connect(s.redis_url, s.redis_password, pool_size=16)
        self.storage = Storage(self.redis)
        self.backend = _backend_client(s)
        # Its own stop: it beats on after SIGTERM, until the cycle in progress has ended.
        self.heartbeat = Heartbeat(self.redis, s.frequency, threading.Event())
        self.outage = OutageTracker(s.backend_outage, s.max_stale)
        self.backend.observer = self.outage.observe
        self.heartbeat.record["outage"] = self.outage.snapshot()
        self.flusher = Flusher(self.storage, self.backend, _flush_settings(s), self.stop, owner=self.heartbeat.id,
                               outage=self.outage)
        # What the next flush cycle starts with, and engines replaced by a reload, not yet closed.
        self._next_cycle = (self.backend, self.flusher.settings)
        self._retired: List = []
        self._swap = threading.Lock()
        self.backlog = exporter.BacklogWatch(self.redis, self.stop, defaults.BACKLOG_INTERVAL)
        self.metrics_server = None

    # ---- one cycle -------------------------------------------------------------

    def flush(self) -> int:
        """``xcflushd flush``: one cycle, recovering leftovers; 0 iff everything was delivered."""
        self._install_signals()
        log.info("xcflushd %s: one flush cycle against %s", __version__, self.settings.backend_url)
        try:
            self.flusher.owner = ""  # a one-shot cycle keeps no heartbeat: its lease alone vouches for it
            result = self.flusher.flush_once(recover=True)
            self._log_result(result)
        finally:
            self._close()
        return 0 if result.ok else 1

    # ---- the daemon ------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        self._install_signals()
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reload_wanted.set())
        # A thread that wants the GIL waits up to this long for a busy one: 1 ms
        # instead of 5 keeps priority answers quick while a flush cycle runs.
        sys.setswitchinterval(0.001)
        # A wedged thread is killed by systemd's watchdog with SIGABRT: leave
        # every thread's stack in the journal to say where it hung.
        faulthandler.enable()
        self._serve_metrics()
        log.info("xcflushd %s starting: redis=%s backend=%s frequency=%ss auth_ttl=%ss threads=%d prio_threads=%d "
                 "backend_outage=%s%s", __version__, s.redis_display, s.backend_url, s.frequency, s.auth_ttl,
                 s.threads, s.prio_threads, s.backend_outage,
                 f" max_stale={s.max_stale}s" if s.backend_outage != "strict" else "")
        self.backend.transport.start()
        self.renewer = PriorityRenewer(self.redis, self.storage, self.backend, s.auth_ttl, self.stop,
                                       outage=self.outage, owner=self.heartbeat.id).start()
        metrics.config_loaded(True, time.time())
        # Leftovers of dead cycles are looked for at least every cycle when cycles are frequent,
        # so they are adopted within about two cycles.
        self.scheduler = Scheduler(self._flush_cycle, s.frequency, self.stop,
                                   min(defaults.RECOVERY_INTERVAL, s.frequency), on_result=self._on_result)
        if self._wait_for_redis():
            self.notifier.ready(f"ready; first flush now, then every {s.frequency}s")
            log.info("ready: priority auth channel subscribed, flushing every %ss; heartbeat %s",
                     s.frequency, self.heartbeat.key)
            self.heartbeat.start()
            self.backlog.start()
            self.scheduler.start()
            self._supervise()
        return self._shutdown()

    def _serve_metrics(self) -> None:
        """Bind ``/metrics`` first: a busy address stops the start (exit 2) before anything runs."""
        metrics.flush_frequency(self.settings.frequency)
        if self.settings.metrics_listen is None:
            log.info("metrics: disabled (--metrics-listen is empty)")
            return
        try:
            self.metrics_server = exporter.serve(self.settings.metrics_listen)
        except ConfigError:
            self._close()
            raise
        # In the heartbeat too (field "metrics"), so `xcflushd status` says where to scrape each daemon.
        self.heartbeat.record["metrics"] = f"http://{exporter.display(self.metrics_server.server_address[:2])}/metrics"

    def _wait_for_redis(self) -> bool:
        announced = False
        while not self.stop.is_set():
            if self.renewer.subscribed.wait(0.5):
                metrics.redis_up(True)
                return True
            if not announced:
                status = f"waiting for Redis at {self.settings.redis_display}"
                log.info("%s", status)
                self.notifier.status(status)
                announced = True
        return False

    def _supervise(self) -> None:
        interval = self.notifier.watchdog_interval
        redis_was_up = True
        while not self.stop.wait(min(interval or 1.0, 1.0)):
            if self.reload_wanted.is_set():
                self.reload_wanted.clear()
                self.reload()
            self._close_retired()
            if interval and self._healthy(2 * interval):
                self.notifier.watchdog()
            redis_up = self.renewer.subscribed.is_set()
            metrics.redis_up(redis_up)
            if redis_up != redis_was_up:
                redis_was_up = redis_up
                self.notifier.status(self._status() if redis_up else
                                     f"Redis at {self.settings.redis_display} unreachable; retrying")

    def _healthy(self, window: float) -> bool:
        now = time.monotonic()
        scheduler_beat = max(self.scheduler.last_tick, self.flusher.last_progress)
        engine = self.backend.transport
        return (self.scheduler.alive() and now - scheduler_beat < window
                and self.renewer.alive() and now - self.renewer.beat() < window
                and engine.alive() and now - engine.last_beat < window)

    def _flush_cycle(self, recover: bool) -> FlushResult:
        """The scheduler's job: a cycle takes the engine and settings of the last reload
        and keeps them to its end."""
        with self._swap:
            self.flusher.backend, self.flusher.settings = self._next_cycle
        return self.flusher.flush_once(recover)

    # ---- reloading ---------------------------------------------------------------

    def reload(self) -> bool:
        """Apply the configuration read again (SIGHUP); keep the running one if it does not validate."""
        old = self.settings
        self.notifier.reloading("reloading the configuration")
        try:
            if self.reread is None:
                raise ConfigError("this daemon was not started from a command line it can read again")
            new = self.reread()
            backend = _backend_client(new)
        except Exception as exc:  # ConfigError says it in one line; anything else must not end the daemon
            reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("reload refused, running on with the last good configuration: %s", reason)
            self._reloaded(False, reason)
            return False
        fixed = [option for field, option in RESTART_ONLY if getattr(new, field) != getattr(old, field)]
        new = dataclasses.replace(new, **{field: getattr(old, field) for field, _ in RESTART_ONLY})
        backend.observer = self.outage.observe
        backend.transport.start()
        retired, self.backend = self.backend, backend
        self.renewer.backend, self.renewer.auth_ttl = backend, new.auth_ttl  # new priority calls
        with self._swap:
            self._next_cycle = (backend, _flush_settings(new))
            self._retired.append((retired, time.monotonic()))
        self.scheduler.frequency = new.frequency  # from the next cycle's deadline on
        self.heartbeat.record["frequency"] = new.frequency
        metrics.flush_frequency(new.frequency)
        logging.getLogger().setLevel(new.log_level)
        self.settings = new
        log.info("reloaded: backend=%s frequency=%ss auth_ttl=%ss threads=%d prio_threads=%d%s",
                 new.backend_url, new.frequency, new.auth_ttl, new.threads, new.prio_threads,
                 f"; not applied until a restart: {', '.join(fixed)}" if fixed else "")
        self._reloaded(True, None)
        return True

    def _reloaded(self, ok: bool, error: Optional[str]) -> None:
        now = time.time()
        metrics.config_loaded(ok, now)
        self.heartbeat.record["reload"] = {"at": round(now, 3), "ok": ok, "error": error}
        self.heartbeat.beat()
        self.notifier.ready(self._status() if ok else f"reload refused, last good configuration kept: {error}")

    def _close_retired(self) -> None:
        """Close the engines a reload replaced once no cycle uses them and their calls are done
        (after a second: the listener may have read the old engine just before the swap)."""
        now = time.monotonic()
        with self._swap:
            done = [entry for entry in self._retired if now - entry[1] > 1.0
                    and entry[0] is not self.flusher.backend and entry[0].transport.idle()]
            self._retired = [entry for entry in self._retired if entry not in done]
        for backend, _ in done:
            backend.close()

    def _on_result(self, result: FlushResult) -> None:
        self.last_result = result
        self._log_result(result)
        self.heartbeat.record["outage"] = self.outage.snapshot()
        self.heartbeat.cycle_ended(result)
        metrics.flush_cycle(cycle_result(result), result.phases, result.hits, result.finished_at,
                            delivered_all=result.ok)
        self.backlog.poke()
        self.notifier.status(self._status())

    def _status(self) -> str:
        r = self.last_result
        if r is None:
            return "ready; first flush cycle running"
        text = (f"last flush {_clock(r.finished_at)}: {r.reports} apps reported, "
                f"{r.failed + r.dead_lettered} failed, {r.duration:.1f}s")
        if r.error:
            text += f" (cycle error: {r.error[:80]})"
        if self.outage.in_outage:
            text += f"; BACKEND OUTAGE since {_clock(self.outage.started_at)}: " + describe_effect(
                self.outage.snapshot(), time.time())
        return text + f"; next flush {_clock(self.scheduler.next_run)}"

    def _log_result(self, result: FlushResult) -> None:
        if result.error:
            log.error("flush cycle failed: %s", result.summary())
        elif result.failed or result.dead_lettered or result.auth_failures or result.not_cached:
            log.warning("flush cycle: %s", result.summary())
        else:
            log.info("flush cycle: %s", result.summary())

    # ---- stopping ----------------------------------------------------------------

    def _install_signals(self) -> None:
        def on_signal(signum, frame):
            if self.stop.is_set():
                log.warning("second %s: stopping now; in-flight usage stays in Redis", signal.Signals(signum).name)
                logging.shutdown()
                os._exit(1)
            log.info("%s received: stopping", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _shutdown(self) -> int:
        s = self.settings
        self.notifier.stopping("stopping: finishing the flush cycle in progress")
        # No backend call starts after SIGTERM, and one in flight ends within
        # connect + read timeout: an exit before then could leave usage in Redis
        # that the backend applies, and count it twice.
        wait = max(s.max_term_wait, s.connect_timeout + s.read_timeout + TERM_MARGIN)
        if wait > s.max_term_wait:
            log.info("stop: waiting up to %ss, the backend calls in flight may take that long", wait)
        deadline = time.monotonic() + wait
        while not self.scheduler.join(timeout=1.0):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("stop: cycle still running after %ss; its unacknowledged usage stays in Redis "
                            "and a later cycle recovers it", wait)
                logging.shutdown()
                os._exit(0)  # pool threads may sit in a backend call; the data is safe in Redis
            self.notifier.extend_timeout(min(left, 5.0) + 1.0)
        self.renewer.join(timeout=2.0)
        self.heartbeat.clear()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self._close()
        log.info("stopped")
        return 0

    def _close(self) -> None:
        for backend in [*(b for b, _ in self._retired), self.backend]:
            backend.close()
        self.redis.close()


def _backend_client(s: Settings):
    return client_for(s, ServiceCredentials(s.provider_key, s.service_tokens),
                      priority_concurrency=s.prio_threads, priority_queue=defaults.PRIO_QUEUE,
                      max_connections=s.threads + s.prio_threads + 8)


def _flush_settings(s: Settings) -> FlushSettings:
    return FlushSettings(auth_ttl=s.auth_ttl, report_auth_wait=s.report_auth_wait, batch_size=s.report_batch_size,
                         concurrency=s.threads)
