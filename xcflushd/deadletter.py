"""The dead-letter hash (``xcflushd:dead_letter``): list, requeue and drop its entries.

Entries are written by storage.py (``_record_dead_letter``), value
``{"usage", "reason", "at"}`` as JSON, in two kinds:

* usage set aside: field ``<report key><cycle suffix>``, usage the backend
  kept refusing (metric -> count) or values HINCRBY cannot have written
  (metric -> the raw text);
* quarantine records: field ``<report key>`` (or the name of a report set),
  empty usage; the data was renamed to the ``xcflushd:quarantine:`` key the
  reason names, and stays there.

Requeue merges an entry's usage back where the gateway writes (HINCRBY into
the report hash, SADD report_keys) and deletes the entry, in one Lua script:
the next flush cycle reports it, and two requeues, a drop and a running
daemon cannot count it twice or lose it. A script changes an entry only if
it still holds exactly what was listed, so a re-sent one changes nothing.
Like storage.py this module is part of the storage layer (it speaks Redis
through the client passed in).
"""

import hashlib
import json
import secrets
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence

import redis

from .defaults import DEAD_LETTER_HASH, REPORT_KEYS_SET
from .errors import MalformedKey, StorageUnavailable
from .keys import parse_report_key, redact_key, redact_text, split_suffixed

#: Counts below this add to any counter HINCRBY left without overflowing a signed 64-bit value.
_MAX_COUNT = 10 ** 18
ID_LENGTH = 12

# The last key of both scripts is a receipt (RECEIPT_PREFIX + a token of this
# call), kept a minute: a call the retry policy re-sends after a lost reply
# then reports what its first send did, not "gone".
_REQUEUE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return redis.call('EXISTS', KEYS[4]) end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'hash' then return -1 end
for i = 3, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[2], ARGV[i])
  if v and (#v > 18 or not string.match(v, '^%-?%d+$')) then return -1 end
end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], '1', 'EX', 60)
return 1
"""

_DROP = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return redis.call('EXISTS', KEYS[2]) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'EX', 60)
return 1
"""
RECEIPT_PREFIX = "xcflushd:dead_letter_receipt:"

REQUEUED, DROPPED, GONE, REFUSED = "requeued", "dropped", "gone", "refused"


class Entry(NamedTuple):
    id: str                     # short handle for the command line (the field holds secrets)
    field: str
    raw: str                    # the stored value, as read
    report_key: Optional[str]   # where requeued usage goes; None if the field names none
    service_id: Optional[str]
    credentials: str            # redacted
    usage: Dict[str, Any]
    reason: str                 # redacted
    at: Optional[str]
    refusal: Optional[str]      # why requeue would not take it; None if it would

    def as_dict(self) -> Dict[str, Any]:
        """For ``--json``: everything but the field and raw value, which hold secrets."""
        return {"id": self.id, "service_id": self.service_id, "credentials": self.credentials,
                "usage": self.usage, "reason": self.reason, "at": self.at,
                "requeueable": self.refusal is None, "refusal": self.refusal}


def entry_id(field: str) -> str:
    return hashlib.sha256(field.encode("utf-8", "surrogateescape")).hexdigest()[:ID_LENGTH]


def parse_entry(field: str, raw: str) -> Entry:
    """One hash field and value -> Entry; never raises (odd entries are listed, not requeued)."""
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        value = {"usage": {}, "reason": "unreadable entry (not the JSON xcflushd writes)"}
    usage = value.get("usage") if isinstance(value.get("usage"), dict) else {}
    reason = redact_text(str(value.get("reason", "")))[:300]
    at = value.get("at") if isinstance(value.get("at"), str) else None
    try:
        body, _ = split_suffixed(field, "")
    except MalformedKey:
        body = field  # quarantine records name the report key itself
    report_key = service_id = None
    credentials = redact_key(field)
    try:
        service_id, creds = parse_report_key(body)
        report_key, credentials = body, creds.redacted()
    except MalformedKey:
        pass
    return Entry(entry_id(field), field, raw, report_key, service_id, credentials, usage, reason, at,
                 _refusal(report_key, usage, reason))


def _refusal(report_key: Optional[str], usage: Dict[str, Any], reason: str) -> Optional[str]:
    if not usage:
        where = reason.rpartition("moved to ")[2] if "moved to " in reason else "nowhere"
        return f"a quarantine record, with no usage of its own (the data is in {where}): inspect it by hand"
    if report_key is None:
        return "the entry does not name a report key of the gateway"
    bad = [m for m, v in usage.items()
           if not m or type(v) is not int or not 0 < v < _MAX_COUNT]  # noqa: E721 (bool is not a count)
    if bad:
        return f"usage of {', '.join(sorted(bad))[:80]} is not a count the backend takes: fix or drop it"
    return None


def _errors(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StorageUnavailable(f"redis: {type(exc).__name__}: {str(exc)[:160]}") from None
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_errors
def entries(client) -> List[Entry]:
    """Every entry, oldest first."""
    found = [parse_entry(f, v) for f, v in client.hscan_iter(DEAD_LETTER_HASH, count=1000)]
    return sorted(found, key=lambda e: (e.at or "", e.id))


def select(found: Sequence[Entry], ids: Iterable[str]) -> List[Entry]:
    """The entries the given ids (or unambiguous id prefixes, 4+ characters) name; ValueError otherwise."""
    chosen: List[Entry] = []
    for wanted in ids:
        wanted = wanted.strip().lower()
        matches = [e for e in found if e.id.startswith(wanted)] if len(wanted) >= 4 else []
        if len(matches) != 1:
            raise ValueError(f"{wanted!r}: {'no entry has that id' if not matches else 'ambiguous id'}"
                             " (see `xcflushd dead-letter list`)")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


@_errors
def requeue(client, entry: Entry) -> str:
    """Put the entry's usage back for the next flush cycle: REQUEUED, GONE (someone else took it) or REFUSED."""
    if entry.refusal is not None:
        return REFUSED
    args: List[Any] = [entry.field, entry.raw]
    for metric, count in entry.usage.items():
        args += [metric, count]
    done = client.register_script(_REQUEUE)(keys=[DEAD_LETTER_HASH, entry.report_key, REPORT_KEYS_SET, _receipt()],
                                            args=args)
    if done == -1:
        return REFUSED
    return REQUEUED if done == 1 else GONE


def _receipt() -> str:
    return RECEIPT_PREFIX + secrets.token_hex(8)


def refusal_after(entry: Entry, outcome: str) -> Optional[str]:
    """The one-line reason for a REFUSED outcome."""
    if outcome != REFUSED:
        return None
    return entry.refusal or "the report hash in Redis holds a value HINCRBY cannot add to: fix it by hand"


@_errors
def drop(client, entry: Entry) -> str:
    """Delete the entry (a quarantined key it points at stays): DROPPED or GONE."""
    done = client.register_script(_DROP)(keys=[DEAD_LETTER_HASH, _receipt()], args=[entry.field, entry.raw])
    return DROPPED if done == 1 else GONE
