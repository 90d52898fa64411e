"""The priority authorization renewer: answers the gateway's pub/sub requests.

The gateway subscribes to ``xc_channel_auth_response:<message>`` and then
publishes ``<message>`` on ``xc_channel_auth_requests`` when it has no cached
authorization. We ask the backend once per (service, credentials, metric) in
flight however many identical requests arrive, renew the application's whole
auth hash, and publish the metric's value on each distinct response channel.

Three threads, none waiting on another's I/O: the listener owns its PubSub
object and queues authorize calls on the backend engine (priority calls,
multiplexed ahead of any flush call; the engine's queue is bounded, and a
request it cannot take is dropped, counted and logged); the engine hands
each answer to the answerer thread, which caches and publishes the answers
at hand in one Redis round trip.

Several daemons on one Redis all receive every request; each request is
answered by the one that claims it in Redis (storage.claim: one round trip
per burst of requests the listener reads at once). A claim is not released
on answer but lapses after CLAIM_TTL_MS: its holder takes an identical
request again as its own, so a daemon that finds a request claimed can rely
on the holder to answer it, and one that reads a request late cannot answer
it a second time. A dead holder's claims lapse with their TTL.
"""

import logging
import queue
import secrets
import threading
import time
from typing import Dict, List, Optional, Tuple

import redis

from . import metrics
from .authorizer import authorizations
from .backend import BackendClient
from .defaults import AUTH_REQUESTS_CHANNEL, CLAIM_TTL_MS
from .errors import BackendError, MalformedKey, StorageUnavailable
from .keys import AUTHORIZED, AuthRequest, auth_key, denial_reason, parse_auth_request
from .outage import OutageTracker
from .ratelog import RateLimitedLog
from .storage import Storage

log = logging.getLogger(__name__)


#: Answers cached and published together in one round trip, at most.
ANSWER_BATCH = 256
#: Requests read off the channel and claimed together in one round trip, at most. Small:
#: the first calls of a storm start after one batch, and 256 at a time cost a cold storm's
#: p99 about a second (make bench, --only storm); 32 keeps the claims at ~2 us of CPU each.
CLAIM_BATCH = 32


class PriorityRenewer:
    def __init__(self, client: redis.Redis, storage: Storage, backend: BackendClient,
                 auth_ttl: int, stop: threading.Event, outage: Optional[OutageTracker] = None,
                 owner: Optional[str] = None, claim_ttl_ms: int = CLAIM_TTL_MS):
        self.redis = client
        self.storage = storage
        self.backend = backend   # replaced on reload: each new call reads it once
        self.auth_ttl = auth_ttl
        self.stop = stop
        self.outage = outage  # --backend-outage allow: requests the backend cannot answer get 1
        self.owner = owner or "renewer:" + secrets.token_hex(4)   # the value of this daemon's claims
        self.claim_ttl_ms = claim_ttl_ms
        self.subscribed = threading.Event()   # set while the requests channel is subscribed
        self.last_beat = time.monotonic()     # the listener loop's heartbeat, for the watchdog
        self.answer_beat = time.monotonic()   # the answerer's
        # dedup key -> the requests waiting for that call, with the time each was received
        self._in_flight: Dict[Tuple, List[Tuple[AuthRequest, float]]] = {}
        self._lock = threading.Lock()
        self._answers: queue.SimpleQueue[Tuple[Tuple, object]] = queue.SimpleQueue()
        self._bad = RateLimitedLog(log, "malformed auth requests")
        self._failed = RateLimitedLog(log, "failed priority authorizations")  # e.g. a flood for an unknown service
        self._dropped = RateLimitedLog(log, "dropped priority requests")
        self._not_cached = RateLimitedLog(log, "priority answers not cached")
        self._unclaimed = RateLimitedLog(log, "priority requests answered without a claim")
        self._thread: Optional[threading.Thread] = None
        self._answerer: Optional[threading.Thread] = None

    def start(self) -> "PriorityRenewer":
        self._answerer = threading.Thread(target=self._answer_loop, name="auth-answerer", daemon=True)
        self._answerer.start()
        self._thread = threading.Thread(target=self._listen, name="auth-listener", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        return all(t is not None and t.is_alive() for t in (self._thread, self._answerer))

    def beat(self) -> float:
        """The older of the two threads' heartbeats."""
        return min(self.last_beat, self.answer_beat)

    def join(self, timeout: Optional[float] = None) -> None:
        for thread in (self._thread, self._answerer):
            if thread:
                thread.join(timeout)

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
                    batch: List = []
                    while message is not None:
                        if message["type"] == "subscribe":
                            self.subscribed.set()
                            backoff = 0.1
                            log.info("listening for priority auth requests on %s", AUTH_REQUESTS_CHANNEL)
                        elif message["type"] == "message":
                            batch.append(message["data"])
                        # What else has arrived goes in the same claim round trip.
                        message = pubsub.get_message(timeout=0) if len(batch) < CLAIM_BATCH else None
                    if batch:
                        self.handle_many(batch)
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
        self.handle_many([raw])

    def handle_many(self, raws: List) -> None:
        """Take request messages in the order received; never raises."""
        fresh: List[Tuple[Tuple, AuthRequest]] = []
        for raw in raws:
            received = time.monotonic()
            try:
                if not isinstance(raw, str):
                    raise MalformedKey("message is not text")
                request = parse_auth_request(raw)
            except MalformedKey as exc:
                self._bad.warning("malformed auth request skipped: %s", exc)
                continue
            key = request.dedup_key
            with self._lock:
                waiting = self._in_flight.get(key)
                if waiting is not None:
                    waiting.append((request, received))  # joins the call in flight
                    continue
                self._in_flight[key] = [(request, received)]
            fresh.append((key, request))
        if not fresh:
            return
        try:
            ours = self.storage.claim([request.raw for _, request in fresh], self.owner, self.claim_ttl_ms)
        except Exception as exc:  # Redis trouble: better a call another daemon also makes than no answer
            self._unclaimed.warning("priority requests answered without a claim: %s: %s",
                                    type(exc).__name__, str(exc)[:120])
            ours = [True] * len(fresh)
        for (key, _), mine in zip(fresh, ours):
            if mine:
                self._submit(key)
                continue
            with self._lock:  # another daemon answers these, after they were published
                waiting = self._in_flight.pop(key, [])
            for _ in waiting:
                metrics.priority_request("elsewhere")

    def _submit(self, key: Tuple) -> None:
        service_id, creds, metric = key
        try:
            # The metric as predicted usage 0: the backend then checks its name,
            # so an unknown one is answered 0:metric_invalid, never 1 (known_metrics.py).
            queued = self.backend.submit_authorize(service_id, creds, lambda outcome: self._answers.put((key, outcome)),
                                                   metrics=(metric,))
        except BackendError as exc:  # no credentials for that service: nothing to ask
            self._answers.put((key, exc))
            return
        except Exception as exc:
            log.error("priority authorize error (%s: %s)", type(exc).__name__, str(exc)[:120])
            self._answers.put((key, BackendError("not queued")))
            return
        if not queued:
            with self._lock:
                waiting = self._in_flight.pop(key, [])
            for _ in waiting:
                metrics.priority_request("dropped")
            self._dropped.warning("priority request for service %s %s dropped, gateway not answered: "
                                  "the backend queue is full", service_id, creds.redacted())

    # ---- answerer thread ----------------------------------------------------

    def _answer_loop(self) -> None:
        while not self.stop.is_set():
            self.answer_beat = time.monotonic()
            try:
                batch = [self._answers.get(timeout=0.5)]
            except queue.Empty:
                continue
            try:
                while len(batch) < ANSWER_BATCH:
                    batch.append(self._answers.get_nowait())
            except queue.Empty:
                pass
            try:
                self._answer(batch)
            except Exception as exc:  # the answerer must outlive any one surprise
                log.error("priority answer error (%s: %s)", type(exc).__name__, str(exc)[:120])

    def _answer(self, batch: List[Tuple[Tuple, object]]) -> None:
        auths: Dict[str, Dict[str, str]] = {}
        answers: List[Tuple[str, str]] = []
        answered: List[Tuple[str, float, bool]] = []   # (value, received, joined a call in flight)
        channels = set()
        allowed: List[Tuple[Tuple, List[Tuple[AuthRequest, float]], int]] = []
        # Every call of the batch leaves the in-flight table at once, before anything can fail: an
        # entry left behind would take every later identical request, and never answer it.
        with self._lock:
            waiting_for = {item[0]: self._in_flight.pop(item[0], []) for item in batch}
        for key, outcome in batch:
            # Answer everyone who asked while the call was in flight; later askers start a new call.
            waiting = waiting_for.pop(key, [])
            service_id, creds, metric = key
            values = None
            allow_ttl = self.outage.allow_ttl(outcome, self.auth_ttl) if self.outage is not None else 0
            if allow_ttl:
                allowed.append((key, waiting, allow_ttl))
                continue
            if isinstance(outcome, BackendError):
                self._failed.warning("priority authorize for service %s %s failed, gateway not answered: %s",
                                     service_id, creds.redacted(), outcome)
            else:
                try:
                    values = authorizations(outcome, [metric])
                except Exception as exc:
                    log.error("priority authorization error (%s: %s)", type(exc).__name__, str(exc)[:120])
            if values is None:
                for i, _ in enumerate(waiting):
                    metrics.priority_request("failed" if i == 0 else "deduplicated")
                continue
            for i, (request, received) in enumerate(waiting):
                merged = auths.setdefault(request.auth_key, {})
                merged.update(values)
                if request.response_channel not in channels:  # one publish per channel waiting
                    channels.add(request.response_channel)
                    answers.append((request.response_channel, values[metric]))
                answered.append((values[metric], received, i > 0))
        if allowed:
            self._allow(allowed)
        if not answered:
            return
        try:
            # One round trip: cache, then answer (the gateway reads the cache next).
            refused = self.storage.cache_and_answer(auths, answers, self.auth_ttl)
        except StorageUnavailable as exc:
            # Redis away for longer than the retry policy: whether the answers
            # went out is unknown; they are not sent again (once per request).
            log.warning("could not cache or publish %d priority answer(s): %s", len(answers), exc)
            for _, _, joined in answered:
                metrics.priority_request("deduplicated" if joined else "failed")
            return
        if refused:
            metrics.degraded_write("authorization", refused)
            self._not_cached.warning("answered %d priority request(s), could not cache %d authorization(s): "
                                     "Redis is full (maxmemory)", len(answers), refused)
        now = time.monotonic()
        for value, received, joined in answered:
            result = "deduplicated" if joined else ("denied" if value.startswith("0") else "authorized")
            metrics.priority_request(result, now - received)

    def _allow(self, allowed: List[Tuple[Tuple, List[Tuple[AuthRequest, float]], int]]) -> None:
        """--backend-outage allow: answer requests the backend could not, ``1`` unless the
        application is cached as denied (a denial other than a limit, which is per metric).

        A ``1`` is cached, with a short TTL, only for an application with no cached hash: a
        cached hash keeps its values and TTL (the keep-alive holds it).
        """
        requests = [request for _, waiting, _ in allowed for request, _ in waiting]
        keys = sorted({k for r in requests for k in (r.auth_key, auth_key(r.service_id, r.credentials.for_report()))})
        try:
            cached = dict(zip(keys, self.storage.cached_authorizations(keys)))
        except StorageUnavailable as exc:
            log.warning("could not read cached authorizations for %d priority request(s) during a backend "
                        "outage, gateway not answered: %s", len(requests), exc)
            return
        now = time.monotonic()
        for _, waiting, ttl in allowed:
            auths: Dict[str, Dict[str, str]] = {}
            answers: List[Tuple[str, str]] = []
            results = []
            for i, (request, received) in enumerate(waiting):
                mine = cached[request.auth_key] or cached[auth_key(request.service_id,
                                                                   request.credentials.for_report())]
                denial = next((v for v in mine.values() if v.startswith("0")
                               and denial_reason(v) != "limits_exceeded"), None)
                value = denial or AUTHORIZED
                if not mine:
                    auths.setdefault(request.auth_key, {})[request.metric] = value
                if all(c != request.response_channel for c, _ in answers):  # one publish per channel
                    answers.append((request.response_channel, value))
                results.append(("deduplicated" if i else ("denied" if denial else "authorized"), received))
                if not denial:
                    self.outage.allowed_one(request.auth_key)
            try:
                self.storage.cache_and_answer(auths, answers, ttl)
            except StorageUnavailable as exc:
                log.warning("could not cache or publish %d priority answer(s): %s", len(answers), exc)
                continue
            for result, received in results:
                metrics.priority_request(result, now - received)
