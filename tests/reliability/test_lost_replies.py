"""Issue 28: a reply lost after Redis ran the command, the gateway writing before the retry.

Every Redis command of the daemon runs under the retry policy
(storage.BoundedRetry), which re-sends a command, or a whole pipeline, whose
reply was lost. faultproxy.FaultProxy loses one chosen reply once, and the
gateway (HINCRBY + SADD report_keys, as apicast-xc writes, on a connection of
its own) writes between the lost reply and the retry. Hypothesis chooses the
command, which of its occurrences, and what the gateway writes.

The books must balance exactly per (report key, metric): written by the
gateway = received by the backend + set aside in Redis (dead letter,
quarantine). No decision-6 window applies: the backend's answers all arrive.
And nothing may be left where no cycle looks (a report hash missing from
report_keys, a hand-over key nobody owns).
"""

import collections
import json

import pytest
from chaoslib import App, ledger_by_key, no_retry_client, usage_in_redis
from faultproxy import Command, FaultProxy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from xcftest import DEMO_CONFIG, RedisServer

from xcflushd import deadletter
from xcflushd import storage as storage_module
from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.defaults import (
    AUTH_RESPONSES_CHANNEL_PREFIX,
    DEAD_LETTER_HASH,
    FAILURES_HASH,
    QUARANTINE_PREFIX,
    REPORT_KEYS_SET,
)
from xcflushd.flusher import Flusher, FlushSettings
from xcflushd.keys import Credentials, auth_request_message
from xcflushd.storage import Report, Storage, connect
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

C = Credentials
APPS = [App("555", C({"app_id": "a1b2c3", "app_key": "s3cr3t"}), "a1b2c3", ["hits", "search"]),
        App("555", C({"app_id": "free1"}), "free1", ["hits"]),
        App("555", C({"app_id": "free2"}), "free2", ["hits", "other"]),
        App("555", C({"app_id": "free3"}), "free3", ["hits"]),
        App("777", C({"user_key": "uk:1"}), "uk-app", ["hits"])]
#: Not UTF-8: the backend refuses its reports for good (422 not_valid_data).
BAD = App("555", C({"app_id": "bad\udcff"}), "bad\udcff", ["hits"])
#: A member of report_keys that is no report key: its hash is quarantined.
GARBLED = "report,nonsense"
#: Left behind by a cycle that died (no lease): the first cycle adopts it.
LEFTOVER = "to_flush:" + APPS[3].report_key + "_20261207000000_0123456789ab"
DEAD_LETTER_AFTER = 2


def _renames(cmd: Command) -> bool:
    return cmd.name in ("RENAME", "RENAMENX")


def _script_keys(cmd: Command, n: int):
    return cmd.keys[:n] if cmd.name in ("EVAL", "EVALSHA") else []


#: Where a reply is lost: the writes of the hand-over (and adoption), acknowledgement,
#: put-back, dead-letter, quarantine and counter paths, and the lease. (name, match, most occurrences in a cycle)
POINTS = {
    "hand-over": (lambda c: _renames(c) and c.args[0] == REPORT_KEYS_SET, 1),
    "member": (lambda c: _renames(c) and c.args[0].startswith("report,"), len(APPS)),
    "adoption": (lambda c: _renames(c) and c.args[0].startswith("to_flush:"), 1),
    "quarantine": (lambda c: _renames(c) and c.args[1].startswith(QUARANTINE_PREFIX), 1),
    "acknowledge": (lambda c: c.name == "DEL" and c.args[0].startswith("to_flush:"), 1),
    "put-back": (lambda c: len(_script_keys(c, 2)) == 2 and c.keys[0].startswith("to_flush:")
                 and c.keys[1].startswith("report,"), len(APPS)),
    "counter": (lambda c: c.name != "HDEL" and (c.keys or [""])[0] == FAILURES_HASH, 1),
    "dead-letter": (lambda c: len(_script_keys(c, 2)) == 2 and c.keys[1] == DEAD_LETTER_HASH, 1),
    "lease": (lambda c: _script_keys(c, 1) and c.keys[0].startswith("xcflushd:lease:"), 1),
}


@pytest.fixture(scope="module")
def lab():
    server = RedisServer()
    proxy = FaultProxy(server.port)
    sim = Simulator(DEMO_CONFIG).start()
    backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
    # Every script known to Redis before any reply is lost: a lost NOSCRIPT
    # reply would be a command Redis did not run, not the case under test.
    client = connect(server.url)
    storage = Storage(client)
    for name in [*storage_module._MOVING_SCRIPTS, *storage_module._PLAIN_SCRIPTS]:
        storage._script(name)
    for body in [s.script for s in storage._scripts.values()] + [deadletter._REQUEUE, deadletter._DROP]:
        client.script_load(body)
    client.close()
    yield server, proxy, sim, backend
    backend.close()
    sim.stop()
    proxy.close()
    server.close()


def write(gateway, app: App, hits: int, metric: str = "hits") -> None:
    gateway.cache_report(app.service_id, app.creds, metric, hits)


def app_of(cmd: Command):
    """The application a command moves usage of, if any."""
    for key in cmd.keys:
        for app in APPS:
            if app.report_key in key:
                return app
    return None


def books(direct, sim, gateway, extra_written):
    """Per (report key, metric) where the books do not balance: received + in Redis - written."""
    written = collections.Counter(extra_written)
    for (_, key, metric), n in gateway.written.items():
        written[(key, metric)] += n
    in_redis, places = usage_in_redis(direct)
    received = ledger_by_key(sim.backend.received(), APPS + [BAD])
    keys = set(written) | set(received) | set(in_redis)
    return {k: received[k] + in_redis[k] - written[k] for k in keys if received[k] + in_redis[k] != written[k]}, places


writes = st.lists(st.tuples(st.integers(0, len(APPS) - 1), st.integers(1, 5)), max_size=3)


def at_every_point(test):
    """One explicit example per point, so every run loses a reply at each."""
    for point in sorted(POINTS):
        test = example(point=point, nth=2, first=[3] * len(APPS), between=[(0, 2)], same_app=True)(test)
    return test


@pytest.mark.slow  # ~5 s: 40 examples of three flush cycles each
@settings(max_examples=31, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@at_every_point
@given(point=st.sampled_from(sorted(POINTS)), nth=st.integers(1, len(APPS)),
       first=st.lists(st.integers(1, 9), min_size=len(APPS), max_size=len(APPS)),
       between=writes, same_app=st.booleans())
def test_a_lost_reply_and_the_retry_lose_nothing_and_count_nothing_twice(lab, point, nth, first, between, same_app):
    server, proxy, sim, backend = lab
    match, most = POINTS[point]
    nth = min(nth, most)  # the occurrence of the write whose reply is lost
    direct = no_retry_client(server.port)
    direct.flushall()
    sim.backend.reset()
    sim.backend.set_faults({"rate": 1.0, "kinds": ["500"], "endpoints": ["report"]} if point == "put-back" else None)
    gateway = Gateway(direct)
    for app, hits in zip(APPS, first):
        write(gateway, app, hits, app.metrics[hits % len(app.metrics)])
    write(gateway, BAD, 3)
    direct.hset(LEFTOVER, "hits", 6)
    written_by_hand = {(APPS[3].report_key, "hits"): 6}
    if point == "quarantine":
        direct.hincrby(GARBLED, "hits", 4)
        direct.sadd(REPORT_KEYS_SET, GARBLED)
        written_by_hand[(GARBLED, "hits")] = 4

    def gateway_writes(cmd: Command) -> None:
        doomed = app_of(cmd)
        if same_app and doomed is not None:
            write(gateway, doomed, 2)
        for i, hits in between:
            write(gateway, APPS[i], hits)

    storage = Storage(connect(proxy.url, retry_budget=5))
    flusher = Flusher(storage, backend, FlushSettings(report_auth_wait=0, dead_letter_after=DEAD_LETTER_AFTER))
    proxy.lose_reply(match, nth, gateway_writes)
    cycles = [flusher.flush_once(recover=True)]
    sim.backend.set_faults(None)
    cycles.append(flusher.flush_once(recover=True))
    proxy.disarm()
    assert proxy.fired.is_set(), f"no reply lost at the {point} point (occurrence {nth})"
    assert proxy.error is None, proxy.error
    storage.redis.close()

    # Whatever is left, ordinary cycles find it (no lost reply now, no faults).
    final = Flusher(Storage(connect(server.url)), backend, FlushSettings(report_auth_wait=0, dead_letter_after=1))
    for _ in range(3):
        if not final.flush_once(recover=True).reports:
            break
    final.storage.redis.close()
    excess, places = books(direct, sim, gateway, written_by_hand)
    assert excess == {}, f"usage lost (< 0) or counted twice (> 0) after a reply lost at {proxy.lost}"
    assert set(places) <= {"dead_letter", "quarantine"}, f"usage no cycle will deliver: {places}"
    assert not direct.exists(REPORT_KEYS_SET)
    # Nothing was put off to a later cycle's adoption, and the cycles said so.
    summaries = [c.summary() for c in cycles]
    assert [c.error for c in cycles] == [None, None], summaries
    assert cycles[0].reports == len(APPS) + 2, summaries  # and BAD, and LEFTOVER
    assert sum(c.delivered for c in cycles) >= len(APPS), summaries
    # The refused report reaches the dead letter after its second refusal, not its first. Its
    # metric check (an authorize call, which the put-back point's report faults leave alone) is
    # refused in each cycle before its report could be sent, so it counts at every point.
    assert [c.dead_lettered for c in cycles] == [0, 1], summaries


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drop=st.booleans(), hits=st.integers(1, 9), same_app=st.integers(0, 3))
def test_a_dead_letter_requeue_or_drop_re_sent_applies_once(lab, drop, hits, same_app):
    """`xcflushd dead-letter requeue|drop` under the same retry policy: the entry's usage moves once."""
    server, proxy, sim, backend = lab
    direct = no_retry_client(server.port)
    direct.flushall()
    app = APPS[1]
    field = app.report_key + "_20261207120000_0123456789ab"
    direct.hset(DEAD_LETTER_HASH, field, json.dumps({"usage": {"hits": hits}, "reason": "test", "at": "x"}))
    gateway = Gateway(direct)
    [entry] = deadletter.entries(direct)

    proxy.lose_reply(lambda c: _script_keys(c, 1) == [DEAD_LETTER_HASH], 1,
                     lambda cmd: write(gateway, app, same_app) if same_app else None)
    client = connect(proxy.url, retry_budget=5)
    outcome = (deadletter.drop if drop else deadletter.requeue)(client, entry)
    proxy.disarm()
    assert proxy.fired.is_set() and proxy.error is None
    # Applied by the first send; the re-sent script finds the entry gone, and its receipt.
    assert outcome == (deadletter.DROPPED if drop else deadletter.REQUEUED)
    assert not direct.hexists(DEAD_LETTER_HASH, field)
    expected = same_app + (0 if drop else hits)
    assert int(direct.hget(app.report_key, "hits") or 0) == expected
    assert direct.sismember(REPORT_KEYS_SET, app.report_key) == (expected > 0)


def test_a_re_sent_priority_answer_reaches_the_channel_twice_with_the_same_value(lab):
    """What a lost reply costs the priority path: the cache-and-answer script runs
    twice, so the auth hash is written twice with the same values (its TTL restarts
    at the retry) and the answer is published twice, the same value both times."""
    server, proxy, _, _ = lab
    direct = no_retry_client(server.port)
    direct.flushall()
    app = APPS[1]
    channel = AUTH_RESPONSES_CHANNEL_PREFIX + auth_request_message(app.service_id, app.creds, "hits")
    listener = direct.pubsub()
    listener.subscribe(channel)
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    storage = Storage(connect(proxy.url, retry_budget=5))
    proxy.lose_reply(lambda c: _script_keys(c, 1) == [app.auth_key])
    refused = storage.cache_and_answer({app.auth_key: {"hits": "1", "other": "0:limits_exceeded"}},
                                       [(channel, "1")], 600)
    storage.redis.close()
    assert proxy.fired.is_set() and proxy.error is None and refused == 0
    listener.ping("after")  # answered after every message published before it
    answers = []
    while True:
        message = listener.get_message(timeout=5)
        assert message is not None, f"no pong; answers so far: {answers}"
        if message["type"] == "pong":
            break
        answers.append(message["data"])
    listener.close()
    assert answers == ["1", "1"]
    assert direct.hgetall(app.auth_key) == {"hits": "1", "other": "0:limits_exceeded"}
    assert 590 < direct.ttl(app.auth_key) <= 600


def test_the_refusal_counter_counts_once_per_hand_over_and_carries_on_an_older_bare_count(lab):
    server, _, _, _ = lab
    direct = no_retry_client(server.port)
    direct.flushall()
    storage = Storage(connect(server.url))
    app = APPS[0]
    direct.hset(FAILURES_HASH, app.report_key, "2")  # as a daemon before issue 28 left it
    first = Report("_20261207120000_0123456789ab", app.report_key, app.service_id, app.creds, {"hits": 1})
    assert [storage.count_failure(first) for _ in range(3)] == [3, 3, 3]
    assert storage.count_failure(first._replace(suffix="_20261207120500_0123456789ab")) == 4
    storage.redis.close()
