"""All Redis I/O of the flush cycle and the priority renewer.

At-least-once (decision 6): usage taken out of ``report_keys`` stays in Redis
under a ``to_flush:`` key until the backend acknowledged the call that carried
it. Every write that moves usage is atomic (RENAMENX, or a Lua script), so a
kill at any moment leaves each unit of usage in exactly one place, and each is
harmless when the retry policy sends it twice (docs/guarantees.md lists them).

A cycle works under a lease (``xcflushd:lease:<cycle id>``, with a TTL it
keeps renewing) and, in a daemon, under its heartbeat. Hand-over keys whose
cycle nothing vouches for belong to a cycle that died (see ``_dead``); a
later cycle finds them with SCAN and adopts them with RENAMENX, which only
one adopter can win.

Redis objects here are shared between threads through the client's connection
pool; no Pipeline or PubSub object crosses threads.
"""

import functools
import json
import logging
import os
import secrets
import socket
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

try:
    import hiredis
except ImportError:  # redis-py works without it, more slowly
    hiredis = None

from .defaults import (
    CLAIM_PREFIX,
    DEAD_LETTER_HASH,
    FAILURES_HASH,
    FLUSHING_PREFIX,
    HEARTBEAT_PREFIX,
    LEASE_PREFIX,
    QUARANTINE_PREFIX,
    REDIS_CHUNK,
    REDIS_RETRY_BASE,
    REDIS_RETRY_BUDGET,
    REDIS_RETRY_CAP,
    REPORT_KEYS_SET,
    TO_FLUSH_PREFIX,
)
from .errors import MalformedKey, StorageFull, StorageRefused, StorageUnavailable
from .keys import (
    Credentials,
    iter_chunks,
    parse_report_key,
    parse_usage,
    redact_key,
    split_suffixed,
    to_flush_key,
)

log = logging.getLogger(__name__)


class Report(NamedTuple):
    """One application's cached usage, taken out of the gateway's way.

    Its hand-over key is derived, not kept: the suffix is one string shared by
    the cycle's reports, where a key each was ~140 bytes per report held.
    """

    suffix: str               # of the hand-over key: the cycle's, or an adopted key's
    report_key: str
    service_id: str
    credentials: Credentials
    usage: Dict[str, int]

    @property
    def to_flush_key(self) -> str:
        return to_flush_key(self.report_key, self.suffix)


class Cycle(NamedTuple):
    """Names one flush cycle's hand-over keys: unique across processes and seconds.

    ``owner`` (in the lease) says who runs it: a daemon's heartbeat id
    (``host:pid:random``), or ``flush:host:pid:namespace`` for a one-shot
    ``xcflushd flush``, which keeps no heartbeat. A daemon's cycle ids begin
    with its heartbeat id's random part, so its heartbeat vouches for a cycle
    whose lease Redis refused or let expire.
    """

    id: str
    suffix: str
    owner: str = ""

    @classmethod
    def new(cls, owner: str = "") -> "Cycle":
        cycle_id = (daemon_token(owner) or secrets.token_hex(3)) + secrets.token_hex(3)
        return cls(cycle_id, time.strftime("_%Y%m%d%H%M%S", time.gmtime()) + "_" + cycle_id,
                   owner or one_shot_owner())


def one_shot_owner() -> str:
    """``flush:host:pid:namespace``: it keeps no heartbeat, so its lease says where its pid means it."""
    return f"flush:{socket.gethostname()}:{os.getpid()}" + (f":{PID_NAMESPACE}" if PID_NAMESPACE else "")


def daemon_token(owner: str) -> Optional[str]:
    """The random part of a daemon's heartbeat id (``host:pid:random``); None for a one-shot's."""
    token = owner.rpartition(":")[2]
    if owner.startswith("flush:") or len(token) != 6 or token.strip("0123456789abcdef"):
        return None
    return token


def process_namespace() -> str:
    """This machine (its boot) and PID namespace: a pid means the same process only where this is the same.

    The unit's ProcSubset=pid hides /proc/sys: then the machine id says which
    machine (a namespace of an earlier boot holds no live process anyway).
    """
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path) as fh:
                machine = fh.read().strip()
            if machine:
                return f"{machine}/{os.readlink('/proc/self/ns/pid')}"
        except OSError:
            continue
    return ""  # unknown: no pid is ever taken for a process of ours


PID_NAMESPACE = process_namespace()


def _namespace_of(owner: str, record: Optional[str]) -> str:
    """Where the owner's pid means it: in a one-shot's owner, or in a daemon's heartbeat record."""
    if owner.startswith("flush:"):
        parts = owner.split(":", 3)
        return parts[3] if len(parts) == 4 else ""
    try:
        return str(json.loads(record or "{}").get("pid_namespace") or "")
    except (ValueError, AttributeError):
        return ""


def _process_gone(owner: str, namespace: str) -> bool:
    """The owner's process is provably gone: it ran in our PID namespace and its pid is free.

    A host name alone says too little: containers with the host's network
    (and name) each have PID namespaces of their own, where another's pid is
    free while it lives.
    """
    if not namespace or namespace != PID_NAMESPACE:
        return False
    parts = owner.split(":")
    if parts[0] == "flush":
        parts = parts[1:]
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class HandOver(NamedTuple):
    """The reports a cycle owns: the members it renamed with its suffix, and adopted leftovers.

    The common case keeps only the report keys (their ``to_flush:`` names are
    derived), so 50 000 pending applications cost one string each.
    """

    members: List[str]
    suffix: str
    adopted: List[Tuple[str, str]]  # (to_flush key, report key)

    def __len__(self) -> int:
        return len(self.members) + len(self.adopted)

    def items(self) -> Iterator[Tuple[str, str]]:
        """``(to_flush key, report key)`` pairs."""
        for member in self.members:
            yield to_flush_key(member, self.suffix), member
        yield from self.adopted


# Error replies that pass with time: a script running long, a dataset loading, a
# replica without its master, a cluster slot moving, too few replicas to write to,
# a script cache emptied by a restart (the next try loads the scripts again).
# redis-py turns some into classes of their own and cuts the code off the text.
_TRANSIENT = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "NOSCRIPT")
_TRANSIENT_CLASSES = tuple(c for c in (getattr(redis.exceptions, name, None) for name in (
    "MasterDownError", "TryAgainError", "ClusterDownError", "NoScriptError")) if isinstance(c, type))


def storage_error(exc: redis.RedisError) -> StorageUnavailable:
    """Our error for a redis-py one, by what the caller can do.

    StorageFull when Redis is at maxmemory; StorageUnavailable (wait and
    retry) for a lost connection, a timeout or a reply that passes with time;
    StorageRefused for any other error reply (READONLY, NOPERM, WRONGTYPE, a
    wrong password...): retrying it every second would only hide it.
    """
    if _is_oom(exc):
        cls = StorageFull
    elif isinstance(exc, redis.AuthenticationError) or not (
            isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.InvalidResponse, *_TRANSIENT_CLASSES))
            or isinstance(exc, redis.ResponseError) and _reply_code(exc) in _TRANSIENT):
        cls = StorageRefused
    else:
        cls = StorageUnavailable
    return cls(f"redis: {type(exc).__name__}: {' '.join(_reply(exc)[:160].split())}")


def _reply(exc: redis.RedisError) -> str:
    """The error's text without redis-py's note on a pipeline's command: that quotes the
    command's keys, and a report key holds application credentials."""
    text = str(exc)
    _, annotated, reply = text.partition(" of pipeline caused error: ")
    return reply if annotated else text


def _reply_code(exc: redis.RedisError) -> str:
    """The error reply's code: its first word."""
    return _reply(exc).split(" ", 1)[0]


def _is_oom(exc) -> bool:
    return isinstance(exc, redis.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and _reply(exc).startswith("OOM"))


def _storage_errors(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except redis.RedisError as exc:
            raise storage_error(exc) from None
    return wrapper


class BoundedRetry(Retry):
    """redis-py's Retry (exponential backoff, equal jitter), bounded in time as well as count.

    Every command of every client the daemon builds goes through it: a lost
    connection or a timeout is retried, on a fresh connection, until
    ``budget`` seconds have passed since the command was first sent. The
    commands that run under it are written so that running one twice does
    no harm (DEL, RENAMENX to the cycle's own names, scripts that check
    their preconditions, HSET of the same values).
    """

    def __init__(self, budget: float = REDIS_RETRY_BUDGET, base: float = REDIS_RETRY_BASE,
                 cap: float = REDIS_RETRY_CAP):
        # The count is only a backstop: the budget ends the retries.
        super().__init__(EqualJitterBackoff(cap=cap, base=base), retries=max(1, int(4 * budget / base)))
        self.budget = budget

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        deadline = time.monotonic() + self.budget
        first = [True]

        def retryable(error: Exception) -> bool:
            if is_retryable is not None and not is_retryable(error):
                return False
            if first[0]:
                first[0] = False
                log.info("redis: %s (%s); retrying for up to %.0fs", type(error).__name__,
                         str(error)[:120], self.budget)
            return time.monotonic() < deadline

        return super().call_with_retry(do, fail, retryable, with_failure_count)


class _SurrogateEscapePacker:
    """Commands in the Redis protocol, strings encoded UTF-8 with surrogateescape.

    redis-py packs with hiredis when it is installed, which encodes strict
    UTF-8 and would fail on the rare key holding bytes that are not UTF-8; its
    pure-Python packer takes the error handler but costs ~11 us a command
    (three per priority answer). Here each argument is encoded as that
    packer's encoder does, then hiredis frames the bytes: ~3 us, the same bytes.
    """

    def __init__(self, encode: Callable[[Any], bytes]):
        self._encode = encode

    def pack(self, *args) -> List[bytes]:
        if isinstance(args[0], str):  # "CONFIG GET": the words go as separate arguments
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        encoded = []
        for arg in args:
            if arg.__class__ is str:
                encoded.append(arg.encode("utf-8", "surrogateescape"))
            else:
                arg = self._encode(arg)  # numbers as redis-py writes them; refuses what it refuses
                encoded.append(arg if arg.__class__ is bytes else bytes(arg))
        return [hiredis.pack_command(tuple(encoded))]


def _command_packer():
    """The packer every client of the daemon uses: see _SurrogateEscapePacker."""
    try:
        from redis.connection import Encoder, PythonRespSerializer
        encode = Encoder("utf-8", "surrogateescape", False).encode
    except (ImportError, TypeError):  # older or newer redis-py: its default packer
        return None
    if hiredis is None:
        return PythonRespSerializer(6000, encode)
    return _SurrogateEscapePacker(encode)


# TCP keepalive on every connection: the pub/sub listener only reads, and without
# it a Redis host gone silent (no FIN, no RST) would keep it waiting. redis-py
# turns it on by default only since 8.0; these are 8.0's probes. Keepalive stays
# quiet while data is unacknowledged, and the listener's health-check PING is
# (every 30 s): TCP_USER_TIMEOUT ends such a connection after 45 s, where the
# kernel's retransmissions took ~15 min. Measured, every packet dropped: the
# listener noticed after 87 s, and not within 200 s without it.
_KEEPALIVE = {option: value for option, value in ((getattr(socket, "TCP_KEEPIDLE", None), 30),
                                                  (getattr(socket, "TCP_KEEPINTVL", None), 5),
                                                  (getattr(socket, "TCP_KEEPCNT", None), 3),
                                                  (getattr(socket, "TCP_USER_TIMEOUT", None), 45_000))
              if option is not None}


def connect(url: str, password: Optional[str] = None, pool_size: int = 32, timeout: float = 10.0,
            retry_budget: float = REDIS_RETRY_BUDGET) -> redis.Redis:
    """A client whose strings round-trip any bytes the gateway wrote, under the one retry policy."""
    kwargs = dict(decode_responses=True, encoding_errors="surrogateescape", socket_timeout=timeout,
                  socket_connect_timeout=min(timeout, 5.0), max_connections=pool_size,
                  health_check_interval=30, client_name="xcflushd", retry=BoundedRetry(retry_budget))
    if not url.startswith("unix:"):  # TCP options: a unix socket's connection class refuses them
        kwargs.update(socket_keepalive=True, socket_keepalive_options=_KEEPALIVE)
    packer = _command_packer()
    if packer is not None:
        kwargs["command_packer"] = packer
    if password is not None:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


# Scripts that move usage are idempotent: each first checks that its hand-over
# key still exists, and deletes it last, so the retry policy re-sending one
# after a lost reply applies it once. They run with ``allow-oom`` (Redis 7):
# what they write is what they free, and a full Redis must not keep usage
# out of the gateway's report hashes.
# A put-back that fails halfway takes back the increments it made, exactly,
# so the usage stays whole in its hand-over key. When the report key is what
# refused it (WRONGTYPE: the gateway's key became a string meanwhile; a field
# that is not an integer; an overflow), the script returns Redis's text, for
# restore() to set the usage aside; any other error (OOM, NOPERM) is raised.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do
  local added = redis.pcall('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  if type(added) == 'table' and added.err then
    for j = 1, i - 2, 2 do
      if ARGV[j + 1] ~= '0' then redis.call('HINCRBY', KEYS[2], ARGV[j], '-' .. ARGV[j + 1]) end
    end
    local err = added.err
    if string.find(err, '^WRONGTYPE') or string.find(err, 'not an integer', 1, true)
        or string.find(err, 'overflow', 1, true) then
      return err
    end
    return redis.error_reply(err)
  end
end
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('DEL', KEYS[1])
return 1
"""
_DEAD_LETTER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
"""
# The refusals in a row of one report key, as "<count> <hand-over suffix>": a
# re-sent call finds its own suffix and counts nothing (a bare count, from an
# older daemon, counts on). No allow-oom: it writes, and a full Redis
# refusing it only means a few more retries (flusher.py).
_COUNT_FAILURE = """
local count, last = 0, ''
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value then
  local n, tag = string.match(value, '^(%d+) ?(.*)$')
  count, last = tonumber(n) or 0, tag or ''
end
if last == ARGV[2] then return count end
count = count + 1
redis.call('HSET', KEYS[1], ARGV[1], count .. ' ' .. ARGV[2])
return count
"""
# Usage of metrics the backend does not know, out of a hand-over key: the
# first metric still there says it was not done yet. ``whole``: nothing of
# the report is left to deliver, the key goes.
_DEAD_LETTER_METRICS = """
if redis.call('HEXISTS', KEYS[1], ARGV[5]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[3], ARGV[3])
else
  redis.call('HDEL', KEYS[1], unpack(ARGV, 5))
end
return 1
"""
# A few bytes that say who owns what (set_record), and a dead letter's entry:
# written even when Redis is full, so no other daemon takes a live cycle's
# keys for a dead one's.
_HSET_SMALL = "return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])"
_SET_EX_SMALL = "return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])"
ALLOW_OOM = "#!lua flags=allow-oom\n"
# Auth hashes (HSET + EXPIRE each), then priority answers (PUBLISH), in one
# command: through a pipeline each of those cost ~8 us of the daemon's CPU to
# pack and read back, three per priority answer. No allow-oom: a full Redis
# refuses an HSET (counted, the script goes on) and still takes the PUBLISH.
# KEYS: the auth hashes; ARGV: ttl, then per hash its number of fields, then
# the fields and values, then channel and message pairs.
# Returns {hashes refused for want of memory, first other error or ''}.
_CACHE_AND_ANSWER = """
local n = #KEYS
local at = n + 2
local refused, failure = 0, ''
for k = 1, n do
  local fields = tonumber(ARGV[k + 1]) * 2
  local reply = redis.pcall('HSET', KEYS[k], unpack(ARGV, at, at + fields - 1))
  at = at + fields
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 3) == 'OOM' then refused = refused + 1
    elseif failure == '' then failure = reply.err end
  else
    redis.call('EXPIRE', KEYS[k], ARGV[1])
  end
end
while at < #ARGV do
  redis.call('PUBLISH', ARGV[at], ARGV[at + 1])
  at = at + 2
end
return {refused, failure}
"""
# Priority claims, one per request message (renewer.py): taken when free or
# already ours (a command re-sent after a lost reply finds its own claim, and
# a holder takes an identical request again), with a TTL so that a dead
# daemon's claim lapses; not released on answer (see renewer.py). A claim
# that cannot be written (maxmemory) counts as taken: better two calls than
# no answer.
# KEYS: the claims; ARGV: owner, ttl in ms. Returns 1 (ours) or 0 per claim.
_CLAIM = """
local out = {}
for k = 1, #KEYS do
  out[k] = 1
  if redis.pcall('SET', KEYS[k], ARGV[1], 'NX', 'PX', ARGV[2]) == false
     and redis.call('GET', KEYS[k]) ~= ARGV[1] then
    out[k] = 0
  end
end
return out
"""

# Through a backend outage (--backend-outage resilient or allow): hold each
# auth hash's TTL at ARGV[1] at least, values untouched. Only lengthens, and
# never gives a TTL to a key without one nor makes a key: re-sent, it does
# the same. Returns how many of KEYS are auth hashes still alive.
_KEEP_ALIVE = """
local alive = 0
for _, key in ipairs(KEYS) do
  local ttl = redis.call('TTL', key)
  if ttl >= 0 then
    alive = alive + 1
    if ttl < tonumber(ARGV[1]) then redis.call('EXPIRE', key, ARGV[1]) end
  end
end
return alive
"""


#: Scripts that only move or free data, or write a few bytes that say who owns what: they run with
#: ``allow-oom`` where the server knows it (Redis >= 7).
_MOVING_SCRIPTS = {"restore": _RESTORE, "dead_letter": _DEAD_LETTER, "dead_letter_metrics": _DEAD_LETTER_METRICS,
                   "hset": _HSET_SMALL, "set_ex": _SET_EX_SMALL}
#: Scripts that a full Redis may refuse, or that need no memory.
_PLAIN_SCRIPTS = {"count_failure": _COUNT_FAILURE, "cache_and_answer": _CACHE_AND_ANSWER, "claim": _CLAIM,
                  "keep_alive": _KEEP_ALIVE}


class Storage:
    def __init__(self, client: redis.Redis, chunk: int = REDIS_CHUNK):
        self.redis = client
        self.chunk = chunk
        self._scripts: Dict[str, Any] = {}
        self._oom_flag: Optional[str] = None

    def _script(self, name: str):
        """The named script, registered at its first use (see _MOVING_SCRIPTS and _PLAIN_SCRIPTS)."""
        script = self._scripts.get(name)
        if script is None:
            body = _PLAIN_SCRIPTS.get(name)
            if body is None:
                if self._oom_flag is None:
                    version = str(self.redis.info("server").get("redis_version", "0"))
                    self._oom_flag = ALLOW_OOM if int(version.split(".")[0] or 0) >= 7 else ""
                body = self._oom_flag + _MOVING_SCRIPTS[name]
            script = self._scripts[name] = self.redis.register_script(body)
        return script

    # ---- leases ------------------------------------------------------------

    @_storage_errors
    def set_record(self, key: str, value: str, ttl: int) -> None:
        """SET key value EX ttl, even when Redis is full (Redis >= 7): a few bytes
        that say who owns what (a lease, a daemon's heartbeat)."""
        try:
            self._script("set_ex")(keys=[key], args=[value, ttl])
        except redis.RedisError as exc:
            # Before Redis 7 a full Redis refuses the SET, not EXPIRE (it needs
            # no memory): a record that exists lives on, with what it said.
            if not _is_oom(exc) or not self.redis.expire(key, ttl):
                raise

    def take_lease(self, cycle: Cycle, ttl: int) -> None:
        self.set_record(LEASE_PREFIX + cycle.id, cycle.owner, ttl)

    renew_lease = take_lease

    @_storage_errors
    def vouched(self, owner: str) -> bool:
        """A live heartbeat stands for the owner's cycles (a one-shot flush has none)."""
        return daemon_token(owner) is not None and bool(self.redis.exists(HEARTBEAT_PREFIX + owner))

    @_storage_errors
    def release_lease(self, cycle: Cycle) -> None:
        self.redis.delete(LEASE_PREFIX + cycle.id)

    # ---- hand-over ---------------------------------------------------------

    @_storage_errors
    def hand_over(self, cycle: Cycle, recover: bool) -> HandOver:
        """Move cached reports out of the gateway's way.

        Returns the reports now owned by this cycle: those in ``report_keys``
        and, when ``recover``, those left behind by dead cycles.
        """
        flushing = FLUSHING_PREFIX + cycle.suffix
        sets = [flushing] if self._move([(REPORT_KEYS_SET, flushing)])[0] else []
        orphans: List[str] = []
        if recover:
            sets += self._dead(self.redis.scan_iter(match=FLUSHING_PREFIX + "_*", count=1000), FLUSHING_PREFIX,
                               cycle)
            orphans = self._dead(self.redis.scan_iter(match=TO_FLUSH_PREFIX + "*", count=1000), TO_FLUSH_PREFIX,
                                 cycle)

        members = []
        seen = set()
        for name in sets:
            for member in self._set_members(name):
                if member not in seen:
                    seen.add(member)
                    members.append(member)
        renamed = self._rename_members(members, cycle.suffix)
        if sets:
            self.redis.delete(*sets)
        return HandOver(renamed, cycle.suffix, self._adopt(orphans, cycle.suffix))

    def _dead(self, names: Iterable[str], prefix: str, current: Cycle) -> List[str]:
        """Those hand-over keys whose cycle is over: nothing vouches for its owner.

        A daemon's heartbeat vouches for its cycles, leased or not (a lease
        Redis refused, or let expire while its renewals failed): the cycle id
        names the daemon. A one-shot flush has only its lease. A daemon's
        lease outlives it by up to LEASE_TTL, its heartbeat by at most its TTL
        (heartbeat.py), and a pid says at once, but only in its own PID
        namespace (the heartbeat's ``pid_namespace``, the end of a one-shot's
        owner).
        """
        by_cycle: Dict[Optional[str], List[str]] = {}
        for name in names:
            try:
                _, cycle_id = split_suffixed(name, prefix)
            except MalformedKey:
                log.warning("leaving alone a key with our prefix but not our format: %s", redact_key(name))
                continue
            by_cycle.setdefault(cycle_id, []).append(name)
        if not by_cycle:
            return []
        ids = [c for c in by_cycle if c is not None and c != current.id]
        owners = dict(zip(ids, self.redis.mget([LEASE_PREFIX + c for c in ids]))) if ids else {}
        daemons = sorted({o for o in owners.values() if o and daemon_token(o)})
        beating = dict(zip(daemons, self.redis.mget([HEARTBEAT_PREFIX + d for d in daemons]))) if daemons else {}
        ours = daemon_token(current.owner)
        tokens: Optional[set] = None
        alive = {current.id}
        for cycle_id in ids:
            owner = owners.get(cycle_id)
            if owner is not None:
                if owner == current.owner or _process_gone(owner, _namespace_of(owner, beating.get(owner))):
                    continue  # one of our own cycles that is over (we run one at a time), or a dead process
                if owner not in beating or beating[owner] is not None:
                    alive.add(cycle_id)
                continue
            if cycle_id[:6] == ours:
                continue
            if tokens is None:
                tokens = {daemon_token(key[len(HEARTBEAT_PREFIX):])
                          for key in self.redis.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000)}
            if cycle_id[:6] in tokens:
                alive.add(cycle_id)  # no lease, but its daemon's heartbeat is live
        # Keys without a cycle id were written by the Ruby daemon, which this one replaces.
        return [n for c, names_ in by_cycle.items() if c not in alive for n in names_]

    def _set_members(self, name: str) -> List[str]:
        try:
            return list(self.redis.sscan_iter(name, count=1000))
        except redis.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            target = QUARANTINE_PREFIX + name
            if not self._move([(name, target)])[0]:
                return []
            self._record_dead_letter(name, {}, f"{REPORT_KEYS_SET} was not a set; moved to {target}")
            log.error("%s is not a set: moved to %s, the gateway starts a new one", REPORT_KEYS_SET, target)
            return []

    def _move(self, moves: Sequence[Tuple[str, str]]) -> List[bool]:
        """RENAMENX each (key, target) in one pipeline: True where the target now holds the key's data for us.

        Every target is a name only this cycle writes (its suffix, or the
        name of a key it owns), so a target that exists was made by this very
        command, sent before a reply that was lost: the retry policy may
        re-send the whole pipeline. RENAME
        would then move whatever the gateway wrote to the key since over the
        target, and the target's usage would be lost; RENAMENX leaves the new
        data where the gateway indexed it, for the next cycle. A key that is
        gone was moved by that earlier send, or by another cycle (an adopter
        that won): whether the target exists says which.
        """
        pipe = self.redis.pipeline(transaction=False)
        for key, target in moves:
            pipe.renamenx(key, target)
        moved, gone = [], []
        for i, result in enumerate(pipe.execute(raise_on_error=False)):
            if isinstance(result, Exception):
                if "no such key" not in str(result).lower():
                    raise result  # a real Redis error, not a key gone missing
                gone.append(i)
            moved.append(not isinstance(result, Exception))  # False too: the target exists
        if gone:
            pipe = self.redis.pipeline(transaction=False)
            for i in gone:
                pipe.exists(moves[i][1])
            for i, exists in zip(gone, pipe.execute()):
                moved[i] = bool(exists)
        return moved

    def _rename_members(self, members: Sequence[str], suffix: str) -> List[str]:
        renamed = []
        for chunk in iter_chunks(members, self.chunk):
            moved = self._move([(member, to_flush_key(member, suffix)) for member in chunk])
            renamed.extend(member for member, ok in zip(chunk, moved) if ok)
        return renamed

    def _adopt(self, orphans: Sequence[str], suffix: str) -> List[Tuple[str, str]]:
        owned = []
        for first in range(0, len(orphans), self.chunk):
            chunk = orphans[first:first + self.chunk]
            members = [split_suffixed(name, TO_FLUSH_PREFIX)[0] for name in chunk]
            targets = [to_flush_key(member, f"{suffix}-{first + n}") for n, member in enumerate(members)]
            # False: another cycle adopted it first.
            owned += [(target, member) for target, member, ok in
                      zip(targets, members, self._move(list(zip(chunk, targets)))) if ok]
        if owned:
            log.warning("adopted %d report(s) left behind by a cycle that died", len(owned))
        return owned

    # ---- reading -----------------------------------------------------------

    @_storage_errors
    def read_reports(self, owned: Sequence[Tuple[str, str]], cycle: Cycle) -> List[Report]:
        """Read owned hand-over keys; set aside what cannot be reported."""
        reports = []
        for chunk in iter_chunks(owned, self.chunk):
            pipe = self.redis.pipeline(transaction=False)
            for key, _ in chunk:
                pipe.hgetall(key)
            for (key, member), fields in zip(chunk, pipe.execute(raise_on_error=False)):
                if isinstance(fields, Exception):
                    self._quarantine(key, member, f"unreadable report: {str(fields)[:80]}")
                    continue
                if not fields:
                    continue
                try:
                    service_id, creds = parse_report_key(member)
                except MalformedKey as exc:
                    self._quarantine(key, member, f"unparsable report key: {exc}")
                    continue
                usage, bad = parse_usage(fields)
                if bad:
                    self._record_dead_letter(member + cycle.suffix, bad, "non-integer usage values")
                    log.error("set aside %d non-integer usage field(s) of %s", len(bad), redact_key(member))
                if usage:
                    suffix = sys.intern(key[len(TO_FLUSH_PREFIX) + len(member):])
                    reports.append(Report(suffix, member, service_id, creds, usage))
                else:
                    self.redis.delete(key)
        return reports

    def _quarantine(self, key: str, member: str, reason: str) -> None:
        target = QUARANTINE_PREFIX + key
        if not self._move([(key, target)])[0]:
            return
        self._record_dead_letter(member, {}, f"{reason}; moved to {target}")
        log.error("quarantined %s: %s", redact_key(member), reason)

    def _record_dead_letter(self, field: str, usage: Dict, reason: str) -> None:
        self._script("hset")(keys=[DEAD_LETTER_HASH], args=[field, _dead_letter_entry(usage, reason)])

    @_storage_errors
    def cached_authorizations(self, keys: Sequence[str]) -> List[Dict[str, str]]:
        """HGETALL of many auth hashes, pipelined."""
        out: List[Dict[str, str]] = []
        for chunk in iter_chunks(keys, self.chunk):
            pipe = self.redis.pipeline(transaction=False)
            for key in chunk:
                pipe.hgetall(key)
            out.extend(r if isinstance(r, dict) else {} for r in pipe.execute(raise_on_error=False))
        return out

    # ---- outcomes of report calls -----------------------------------------

    @_storage_errors
    def acknowledge(self, reports: Sequence[Report]) -> None:
        """The backend took these: their usage leaves Redis now.

        Usage left here after the backend's 2xx is reported again by a later
        cycle. DEL and HDEL are idempotent (nothing else ever writes a
        cycle's ``to_flush:`` names), so the retry policy may re-send them
        after a lost connection, and they need no memory: Redis at
        ``maxmemory`` still runs them.
        """
        for chunk in iter_chunks(reports, self.chunk):
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(*(r.to_flush_key for r in chunk))
            # A delivery ends a run of refusals: only refusals in a row lead to the dead letter.
            pipe.hdel(FAILURES_HASH, *(r.report_key for r in chunk))
            pipe.execute()

    @_storage_errors
    def restore(self, reports: Sequence[Report]) -> int:
        """Put usage back where the gateway writes, to be retried next cycle.

        One idempotent script per report (see _RESTORE): a re-sent put-back
        finds its hand-over key gone and adds nothing. A report whose report
        key refuses its usage goes to the dead letter with Redis's reason;
        returns how many did.
        """
        script = self._script("restore")
        refused = []
        for chunk in iter_chunks(reports, self.chunk):
            pipe = self.redis.pipeline(transaction=False)
            for r in chunk:
                args = [x for metric, value in r.usage.items() for x in (metric, value)]
                script(keys=[r.to_flush_key, r.report_key, REPORT_KEYS_SET], args=args, client=pipe)
            refused += [(r, done) for r, done in zip(chunk, pipe.execute()) if isinstance(done, str)]
        for report, reason in refused:
            reason = "could not put back, the report key refused it: " + " ".join(reason[:160].split())
            self._dead_letter(report, reason, report.suffix)
            log.error("set aside the usage of %s, moved to %s: %s", redact_key(report.report_key), DEAD_LETTER_HASH,
                      reason)
        return len(refused)

    @_storage_errors
    def count_failure(self, report: Report) -> int:
        """One more refusal of this report key; once per hand-over key however often it is re-sent."""
        return int(self._script("count_failure")(keys=[FAILURES_HASH], args=[report.report_key, report.suffix]))

    @_storage_errors
    def dead_letter(self, report: Report, reason: str, cycle: Cycle) -> None:
        self._dead_letter(report, reason, cycle.suffix)

    def _dead_letter(self, report: Report, reason: str, suffix: str) -> None:
        self._script("dead_letter")(
            keys=[report.to_flush_key, DEAD_LETTER_HASH, FAILURES_HASH],
            args=[report.report_key + suffix, _dead_letter_entry(report.usage, reason), report.report_key])

    @_storage_errors
    def dead_letter_metrics(self, report: Report, metrics: Sequence[str], reason: str) -> None:
        """Move these metrics' usage from the report's hand-over key to the dead letter; the rest stays
        to be delivered. The entry's field is the report key with a suffix of its own, so an entry per
        refusal: a report key met twice in a cycle, or refused again later, overwrites none."""
        usage = {m: report.usage[m] for m in metrics}
        field = report.report_key + time.strftime("_%Y%m%d%H%M%S", time.gmtime()) + "_" + secrets.token_hex(6)
        self._script("dead_letter_metrics")(
            keys=[report.to_flush_key, DEAD_LETTER_HASH, FAILURES_HASH],
            args=[field, _dead_letter_entry(usage, reason), report.report_key,
                  "1" if len(usage) == len(report.usage) else "0", *usage])

    # ---- authorizations ----------------------------------------------------

    @_storage_errors
    def write_authorizations(self, items: Iterable[Tuple[str, Dict[str, str]]], ttl: int) -> int:
        """HSET + EXPIRE per auth hash (the TTL covers the whole hash), many hashes per round trip.

        Returns how many hashes Redis refused for want of memory: a full
        Redis costs cached authorizations (the gateway asks on the priority
        path), never the cycle.
        """
        return sum(self._cache_and_answer(chunk, (), ttl) for chunk in iter_chunks(items, self.chunk))

    @_storage_errors
    def keep_alive(self, ttl: int, skip: Iterable[str] = ()) -> int:
        """Hold every cached authorization (``auth,*``, found with SCAN) but ``skip`` alive for
        ``ttl`` seconds at least; returns how many there are."""
        skip = frozenset(skip)
        keys = (k for k in self.redis.scan_iter(match="auth,*", count=1000) if k not in skip)
        return sum(int(self._script("keep_alive")(keys=chunk, args=[ttl])) for chunk in iter_chunks(keys, self.chunk))

    @_storage_errors
    def cache_and_answer(self, auths: Dict[str, Dict[str, str]], answers: Sequence[Tuple[str, str]],
                         ttl: int) -> int:
        """Write auth hashes and publish priority answers, in this order, in one round trip.

        PUBLISH needs no memory, so the answers go out even when Redis
        refuses the auth hashes; returns how many it refused.
        """
        return self._cache_and_answer(auths.items(), answers, ttl)

    @_storage_errors
    def claim(self, messages: Sequence[str], owner: str, ttl_ms: int) -> List[bool]:
        """Claim priority request messages for ``owner``, one round trip: True where it is ours
        to answer, False where another daemon took it (and will answer after our request)."""
        taken = self._script("claim")(keys=[CLAIM_PREFIX + m for m in messages], args=[owner, ttl_ms])
        return [bool(t) for t in taken]

    def _cache_and_answer(self, auths: Iterable[Tuple[str, Dict[str, str]]], answers: Sequence[Tuple[str, str]],
                          ttl: int) -> int:
        keys: List[str] = []
        counts: List[int] = []
        fields: List[str] = []
        for key, values in auths:
            if values:
                keys.append(key)
                counts.append(len(values))
                for item in values.items():
                    fields.extend(item)
        args: List[Any] = [ttl, *counts, *fields]
        for answer in answers:
            args.extend(answer)
        refused, failure = self._script("cache_and_answer")(keys=keys, args=args)
        if failure:
            raise redis.ResponseError(failure)  # e.g. WRONGTYPE: a key that is not a hash
        return int(refused)


def _dead_letter_entry(usage: Dict, reason: str) -> str:
    return json.dumps({"usage": usage, "reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


class Backlog(NamedTuple):
    """What waits in Redis: for ``xcflushd status`` and the metrics."""

    gateway_reports: int   # applications in the gateway's report_keys set
    handover_keys: int     # flushing_report_keys_* sets and to_flush:* hashes (cycles at work, or dead)
    reports_pending: int   # applications with usage waiting: the two above, hashes only
    dead_letters: int


@_storage_errors
def read_backlog(client: redis.Redis) -> Backlog:
    """Counted with SCARD, HLEN and SCANs: cheap next to a cycle, not free on a big keyspace."""
    gateway = client.scard(REPORT_KEYS_SET)
    to_flush = sum(1 for _ in client.scan_iter(match=TO_FLUSH_PREFIX + "*", count=1000))
    sets = sum(1 for _ in client.scan_iter(match=FLUSHING_PREFIX + "_*", count=1000))
    return Backlog(gateway, to_flush + sets, gateway + to_flush, client.hlen(DEAD_LETTER_HASH))


@_storage_errors
def read_heartbeats(client: redis.Redis) -> list:
    """Every live daemon's heartbeat record (see heartbeat.py), oldest first; unreadable ones are skipped."""
    keys = sorted(client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000))
    if not keys:
        return []
    records = []
    for key, text in zip(keys, client.mget(keys)):
        if text is None:
            continue  # expired between SCAN and MGET
        try:
            record = json.loads(text)
        except ValueError:
            log.warning("unreadable heartbeat %s skipped", key)
            continue
        if isinstance(record, dict):
            records.append(record)
    return sorted(records, key=lambda rec: rec.get("started_at") or 0)
