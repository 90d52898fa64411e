"""Cached authorizations and priority answers: one script, against a real redis-server."""

import time

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xcftest import RedisServer

from xcflushd.errors import StorageUnavailable
from xcflushd.storage import Storage, connect

texts = st.one_of(st.text(max_size=20), st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")))


def subscribed(client, *channels):
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(*channels)
    listener.get_message(timeout=1)
    return listener


def received(listener, count, timeout=3.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = listener.get_message(timeout=0.2)
        if message:
            got.append((message["channel"], message["data"]))
    return got


def test_hashes_are_written_with_their_ttl_before_the_answers_go_out(r):
    storage = Storage(r)
    listener = subscribed(r, "answer:1", "answer:2")
    auths = {"auth,service_id:1,app_id:a": {"hits": "1", "search": "0:limits_exceeded"},
             "auth,service_id:1,app_id:b": {"hits": "0"}, "auth,service_id:1,app_id:empty": {}}
    assert storage.cache_and_answer(auths, [("answer:1", "1"), ("answer:2", "0")], 60) == 0
    assert received(listener, 2) == [("answer:1", "1"), ("answer:2", "0")]
    assert r.hgetall("auth,service_id:1,app_id:a") == {"hits": "1", "search": "0:limits_exceeded"}
    assert r.hgetall("auth,service_id:1,app_id:b") == {"hits": "0"}
    assert 0 < r.ttl("auth,service_id:1,app_id:a") <= 60 and 0 < r.ttl("auth,service_id:1,app_id:b") <= 60
    assert not r.exists("auth,service_id:1,app_id:empty")
    listener.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(texts, st.dictionaries(texts, texts, max_size=4), max_size=5),
       st.lists(st.tuples(texts, texts), max_size=4))
def test_any_names_and_values_round_trip(r, auths, answers):
    r.flushall()
    assert Storage(r).write_authorizations(list(auths.items()), 60) == 0
    for key, values in auths.items():
        assert r.hgetall(key) == values
    Storage(r).cache_and_answer(auths, answers, 60)  # channels with any bytes: PUBLISH takes them


def test_a_key_that_is_not_a_hash_fails_the_write_but_not_the_others_nor_the_answer(r):
    r.set("auth,service_id:1,app_id:odd", "a string")
    listener = subscribed(r, "answer:1")
    with pytest.raises(StorageUnavailable, match="WRONGTYPE"):
        Storage(r).cache_and_answer({"auth,service_id:1,app_id:odd": {"hits": "1"},
                                     "auth,service_id:1,app_id:good": {"hits": "1"}}, [("answer:1", "1")], 60)
    assert r.hgetall("auth,service_id:1,app_id:good") == {"hits": "1"}
    assert received(listener, 1) == [("answer:1", "1")]
    listener.close()


def test_a_full_redis_refuses_the_hashes_counted_and_still_publishes():
    server = RedisServer()
    try:
        raw = redis.Redis(port=server.port, decode_responses=True)
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", str(int(raw.info("memory")["used_memory"]) + (1 << 20)))
        n = 0
        while True:
            try:
                raw.set(f"filler:{n}", "x" * 8192)
                n += 1
            except redis.ResponseError:
                break
        client = connect(server.url, retry_budget=0.5)
        listener = subscribed(raw, "answer:1", "answer:2")
        auths = {f"auth,service_id:1,app_id:{i}": {"hits": "1"} for i in range(3)}
        assert Storage(client).cache_and_answer(auths, [("answer:1", "1"), ("answer:2", "1")], 60) == 3
        assert received(listener, 2) == [("answer:1", "1"), ("answer:2", "1")]
        assert not any(raw.exists(k) for k in auths)
        listener.close()
        client.close()
    finally:
        server.close()
