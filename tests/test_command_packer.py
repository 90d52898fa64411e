"""The daemon's Redis command packer writes redis-py's own bytes, and Redis reads them back."""

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.connection import Encoder, PythonRespSerializer
from redis.exceptions import DataError

from xcflushd import storage

REFERENCE = PythonRespSerializer(6000, Encoder("utf-8", "surrogateescape", False).encode)
PACKER = storage._command_packer()

# Text as the daemon holds it: any code point, and the surrogates surrogateescape makes of bad bytes.
texts = st.one_of(st.text(max_size=30), st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape")))
arguments = st.one_of(texts, st.binary(max_size=9000), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True), st.binary(max_size=20).map(memoryview),
                      st.binary(max_size=20).map(bytearray))


def packed(packer, args):
    try:
        return b"".join(bytes(part) for part in packer.pack(*args))
    except (DataError, UnicodeEncodeError) as exc:
        return type(exc)


def test_hiredis_frames_the_commands():
    assert isinstance(PACKER, storage._SurrogateEscapePacker)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["HSET", "CONFIG GET", b"SET", b"CLIENT SETNAME", "PUBLISH"]), st.lists(arguments, max_size=6))
def test_the_same_bytes_as_redis_pys_own_serializer(command, args):
    assert packed(PACKER, (command, *args)) == packed(REFERENCE, (command, *args))


@pytest.mark.parametrize("bad", [True, None, object(), "\ud800"])
def test_what_redis_py_refuses_is_refused(bad):
    assert packed(PACKER, ("SET", "k", bad)) == packed(REFERENCE, ("SET", "k", bad))
    assert packed(PACKER, ("SET", "k", bad)) in (DataError, UnicodeEncodeError)


def test_keys_that_are_not_utf8_round_trip_through_redis(r, redis_server):
    raw = redis.Redis.from_url(redis_server.url)  # bytes in, bytes out
    key = b"report,service_id:1,app_id:\xff\xfe".decode("utf-8", "surrogateescape")
    r.hset(key, mapping={"hits": 3, "caf\xe9": 1.5})
    assert raw.hgetall(b"report,service_id:1,app_id:\xff\xfe") == {b"hits": b"3", "caf\xe9".encode(): b"1.5"}
    assert r.hgetall(key) == {"hits": "3", "caf\xe9": "1.5"}
    raw.close()
