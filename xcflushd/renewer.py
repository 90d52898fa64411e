"""The priority authorization renewer: answers the gateway's pub/sub requests.

The gateway subscribes to ``xc_channel_auth_response:<message>`` and then
publishes ``<message>`` on ``xc_channel_auth_requests`` when it has no cached
authorization. We ask the backend once per (service, credentials, metric) in
flight however many identical requests arrive, renew the application's whole
auth hash, and publish the metric's value on each distinct response channel.

The listener thread owns its PubSub object; backend calls run on a pool.
"""

import logging
import threading
import time
from concurrent.futures import Executor
from typing import Dict, List, Optional, Tuple

import redis

from . import metrics
from .authorizer import authorizations
from .backend import BackendClient
from .defaults import AUTH_REQUESTS_CHANNEL, PUBLISH_RETRY_DELAYS
from .errors import BackendError, MalformedKey, StorageUnavailable
from .keys import AuthRequest, parse_auth_request
from .storage import Storage

log = logging.getLogger(__name__)


class RateLimitedLog:
    """At most ``burst`` lines per ``window`` seconds; then one line saying how many were held back."""

    def __init__(self, logger: logging.Logger, what: str, burst: int = 10, window: float = 10.0):
        self.logger, self.what, self.burst, self.window = logger, what, burst, window
        self.started, self.count, self.suppressed = 0.0, 0, 0
        self.lock = threading.Lock()

    def warning(self, msg: str, *args) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.started >= self.window:
                if self.suppressed:
                    self.logger.warning("%d more %s were not logged", self.suppressed, self.what)
                self.started, self.count, self.suppressed = now, 0, 0
            self.count += 1
            if self.count > self.burst:
                self.suppressed += 1
                return
        self.logger.warning(msg, *args)


class PriorityRenewer:
    def __init__(self, client: redis.Redis, storage: Storage, backend: BackendClient, executor: Executor,
                 auth_ttl: int, stop: threading.Event, wedge: bool = False):
        self.redis = client
        self.storage = storage
        self.backend = backend
        self.executor = executor
        self.auth_ttl = auth_ttl
        self.stop = stop
        self.wedge = wedge                    # test hook: the listener hangs after subscribing
        self.subscribed = threading.Event()   # set while the requests channel is subscribed
        self.last_beat = time.monotonic()     # the listener loop's heartbeat, for the watchdog
        self._in_flight: Dict[Tuple, List[AuthRequest]] = {}
        self._lock = threading.Lock()
        self._bad = RateLimitedLog(log, "malformed auth requests")
        self._failed = RateLimitedLog(log, "failed priority authorizations")  # e.g. a flood for an unknown service
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "PriorityRenewer":
        self._thread = threading.Thread(target=self._listen, name="auth-listener", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread:
            self._thread.join(timeout)

    # ---- listener thread ---------------------------------------------------

    def _listen(self) -> None:
        backoff = 0.1
        while not self.stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                pubsub.subscribe(AUTH_REQUESTS_CHANNEL)
                while not self.stop.is_set():
                    self.last_beat = time.monotonic()
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.subscribed.set()
                        backoff = 0.1
                        log.info("listening for priority auth requests on %s", AUTH_REQUESTS_CHANNEL)
                        if self.wedge:
                            threading.Event().wait()
                    elif message["type"] == "message":
                        self.handle(message["data"])
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("auth request listener lost Redis (%s: %s); resubscribing in %.1fs",
                            type(exc).__name__, str(exc)[:120], backoff)
                self._pause(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # the listener must outlive any one surprise
                self.subscribed.clear()
                log.error("auth request listener error (%s: %s); restarting it", type(exc).__name__, str(exc)[:120])
                self._pause(backoff)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass
        self.subscribed.clear()

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.last_beat = time.monotonic()  # an outage is not a hang
            self.stop.wait(min(0.25, deadline - time.monotonic()))

    def handle(self, raw) -> None:
        """Take one request message; never raises."""
        try:
            if not isinstance(raw, str):
                raise MalformedKey("message is not text")
            request = parse_auth_request(raw)
        except MalformedKey as exc:
            self._bad.warning("malformed auth request skipped: %s", exc)
            metrics.priority_request("dropped")
            return
        received = time.monotonic()
        with self._lock:
            waiting = self._in_flight.get(request.dedup_key)
            if waiting is not None:
                if all(w.raw != request.raw for w in waiting):
                    waiting.append(request)
                metrics.priority_request("deduplicated")
                return
            self._in_flight[request.dedup_key] = [request]
        try:
            self.executor.submit(self._renew, request.dedup_key, received)
        except RuntimeError:  # executor shut down: we are stopping
            with self._lock:
                self._in_flight.pop(request.dedup_key, None)
            metrics.priority_request("dropped")

    # ---- pool threads ------------------------------------------------------

    def _renew(self, key: Tuple, received: float) -> None:
        service_id, creds, metric = key
        values = None
        try:
            status = self.backend.authorize(service_id, creds)
            values = authorizations(status, [metric])
        except BackendError as exc:
            self._failed.warning("priority authorize for service %s %s failed, gateway not answered: %s",
                                 service_id, creds.redacted(), exc)
        except Exception as exc:
            log.error("priority authorize error (%s: %s)", type(exc).__name__, str(exc)[:120])
        # Answer everyone who asked while the call was in flight; later askers start a new call.
        with self._lock:
            waiting = self._in_flight.pop(key, [])
        if values is None:
            metrics.priority_request("failed")
            return
        auths = {w.auth_key: values for w in waiting}
        answers = [(w.response_channel, values[metric]) for w in waiting]
        for delay in PUBLISH_RETRY_DELAYS + (None,):
            try:
                # One round trip: cache, then answer (the gateway reads the cache next).
                self.storage.cache_and_answer(auths, answers, self.auth_ttl)
                metrics.priority_request("authorized" if values[metric] == "1" else "denied",
                                         time.monotonic() - received)
                return
            except StorageUnavailable as exc:
                if delay is None:
                    log.warning("could not cache and publish a priority authorization: %s", exc)
                    metrics.priority_request("failed")
                    return
                time.sleep(delay)
