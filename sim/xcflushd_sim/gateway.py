"""A simulated XC gateway: talks to Redis exactly as apicast-xc does.

Used by ``make run``, the benchmarks and the reliability tests. It keeps the
exact totals of the usage it cached, so a test can check that nothing was
lost: usage the backend received + usage still in Redis == usage written.
Per request (shared protocol, 7.3): HGET the cached authorization; ``1`` ->
HINCRBY the report hash + SADD report_keys (pipelined, no MULTI) and allow;
``0...`` -> deny; missing -> subscribe to the response channel, then publish
the request, wait for one answer.
"""

import collections
import threading
from typing import Dict, Optional, Tuple

import redis

from xcflushd.defaults import AUTH_REQUESTS_CHANNEL, REPORT_KEYS_SET
from xcflushd.keys import AUTHORIZED, Credentials, auth_key, auth_request_message, report_key

Usage = Dict[Tuple[str, str, str], int]  # (service_id, report key, metric) -> hits


class Gateway:
    def __init__(self, client: redis.Redis, priority_timeout: float = 3.0):
        self.redis = client
        self.priority_timeout = priority_timeout
        self.written: Usage = collections.Counter()
        self.outcomes = collections.Counter()  # allowed / denied / unknown
        self._lock = threading.Lock()

    def cache_report(self, service_id: str, creds: Credentials, metric: str, value: int = 1) -> None:
        """What the gateway does for an authorized request."""
        key = report_key(service_id, creds)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(key, metric, value)
        pipe.sadd(REPORT_KEYS_SET, key)
        pipe.execute()
        with self._lock:
            self.written[(service_id, key, metric)] += value

    def request(self, service_id: str, creds: Credentials, metric: str, value: int = 1) -> str:
        """One API request through the gateway: 'allowed', 'denied' or 'unknown'."""
        cached = self.redis.hget(auth_key(service_id, creds), metric)
        if cached is None:
            cached = self.priority_authorization(service_id, creds, metric)
        if cached is not None and cached.startswith(AUTHORIZED):
            self.cache_report(service_id, creds, metric, value)
            outcome = "allowed"
        else:
            outcome = "denied" if cached is not None else "unknown"
        with self._lock:
            self.outcomes[outcome] += 1
        return outcome

    def priority_authorization(self, service_id: str, creds: Credentials, metric: str) -> Optional[str]:
        """Subscribe, then publish, then wait for one answer (apicast-xc >= 1.3)."""
        message = auth_request_message(service_id, creds, metric)
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe("xc_channel_auth_response:" + message)
            pubsub.get_message(timeout=1.0)  # the subscribe confirmation
            self.redis.publish(AUTH_REQUESTS_CHANNEL, message)
            answer = pubsub.get_message(timeout=self.priority_timeout)
            while answer is not None and answer["type"] != "message":
                answer = pubsub.get_message(timeout=self.priority_timeout)
            if answer is None:
                return None
            data = answer["data"]
            return data.decode() if isinstance(data, bytes) else data
        finally:
            pubsub.close()

    def totals_by_app(self) -> Dict[Tuple[str, str], Dict[str, int]]:
        """(service_id, report key) -> metric -> hits written."""
        out: Dict[Tuple[str, str], Dict[str, int]] = {}
        with self._lock:
            for (service_id, key, metric), hits in self.written.items():
                out.setdefault((service_id, key), {})[metric] = hits
        return out
