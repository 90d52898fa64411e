"""The gateway's wire format: Redis keys, pub/sub messages and auth values.

Pure functions, no I/O. The format is fixed by apicast-xc (shared protocol,
section 7): fields are separated by ``,``, names from values by ``:``, and
both characters are escaped with one backslash inside names and values.
Backslash itself is not escaped, by either side.
"""

import re
import sys
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from .defaults import AUTH_RESPONSES_CHANNEL_PREFIX, TO_FLUSH_PREFIX
from .errors import MalformedKey

#: Credential names the gateway may send, in byte order (the encoding order).
CREDENTIAL_NAMES = ("access_token", "app_id", "app_key", "referrer", "user_id", "user_key")
#: ``referrer`` is left out of report keys: one app, one report, whatever the referrer.
REPORT_CREDENTIAL_NAMES = ("access_token", "app_id", "app_key", "user_id", "user_key")
#: Credentials that are secrets and are never logged in full.
SECRET_CREDENTIAL_NAMES = frozenset({"access_token", "app_key", "user_key"})

_SEP = re.compile(r"(?<!\\),")
_NAME_VALUE = re.compile(r"(?<!\\):")


def escape(text: str) -> str:
    return text.replace(":", "\\:").replace(",", "\\,")


def unescape(text: str) -> str:
    return text.replace("\\:", ":").replace("\\,", ",")


def _split(text: str, maxsplit: int = 0) -> List[str]:
    """Split at unescaped commas. Text without a backslash has nothing escaped:
    str.split gives the same fields for a fraction of the regular expression's cost."""
    if "\\" in text:
        return _SEP.split(text, maxsplit)
    return text.split(",", maxsplit if maxsplit else -1)


def _split_fields(text: str) -> List[Tuple[str, str]]:
    """Split ``a:1,b:2`` into unescaped ``(name, value)`` pairs."""
    if "\\" not in text:  # the common case: nothing escaped, nothing to unescape
        pairs = []
        for field in text.split(","):
            name, sep, value = field.partition(":")
            if not sep:
                raise MalformedKey(f"field without name:value separator ({_clip(field)!r})")
            pairs.append((sys.intern(name), value))  # a few names, held by every report of a cycle
        return pairs
    pairs = []
    for field in _SEP.split(text):
        parts = _NAME_VALUE.split(field, 1)
        if len(parts) != 2:
            raise MalformedKey(f"field without name:value separator ({_clip(field)!r})")
        pairs.append((unescape(parts[0]), unescape(parts[1])))
    return pairs


# A secret credential (``app_key:<value>``) anywhere in raw text; values may hold escapes.
_SECRET_FIELD = re.compile(r"((?:access_token|app_key|user_key):)((?:\\.|[^,\\])*)")


def _clip(text: str, size: int = 40) -> str:
    """Raw text for an error message: secrets cut as in ``Credentials.redacted``, then clipped."""
    text = _SECRET_FIELD.sub(lambda m: m.group(1) + (m.group(2)[:4] + "..." if len(m.group(2)) > 4 else m.group(2)),
                             text)
    return text if len(text) <= size else text[:size] + "..."


def redact_text(text: str) -> str:
    """Free text that may quote keys (a dead-letter reason): every secret credential cut short."""
    return _SECRET_FIELD.sub(lambda m: m.group(1) + (m.group(2)[:4] + "..." if len(m.group(2)) > 4 else m.group(2)),
                             text)


class Credentials:
    """An application's credentials, as the gateway encodes them.

    Immutable and hashable; unknown names are dropped, as the Ruby daemon did.
    """

    __slots__ = ("_items",)

    def __init__(self, fields: Dict[str, str]):
        self._items = tuple(sorted((n, v) for n, v in fields.items() if n in CREDENTIAL_NAMES))

    @classmethod
    def decode(cls, text: str) -> "Credentials":
        creds = cls(dict(_split_fields(text)))
        if not creds._items:
            raise MalformedKey("no known credentials")
        return creds

    def encode(self) -> str:
        return ",".join(f"{escape(n)}:{escape(v)}" for n, v in self._items)

    def for_report(self) -> "Credentials":
        return Credentials({n: v for n, v in self._items if n in REPORT_CREDENTIAL_NAMES})

    def get(self, name: str) -> Optional[str]:
        for n, v in self._items:
            if n == name:
                return v
        return None

    def items(self) -> Tuple[Tuple[str, str], ...]:
        return self._items

    @property
    def oauth(self) -> bool:
        return self.get("access_token") is not None

    def redacted(self) -> str:
        """For logs: identifiers in full, secrets cut to a recognisable prefix."""
        return ",".join(
            f"{n}:{v[:4] + '...' if n in SECRET_CREDENTIAL_NAMES and len(v) > 4 else v}"
            for n, v in self._items
        )

    def __eq__(self, other):
        return isinstance(other, Credentials) and self._items == other._items

    def __hash__(self):
        return hash(self._items)

    def __repr__(self):
        return f"Credentials({self.redacted()})"


def auth_key(service_id: str, creds: Credentials) -> str:
    return f"auth,service_id:{escape(service_id)},{creds.encode()}"


def report_key(service_id: str, creds: Credentials) -> str:
    return f"report,service_id:{escape(service_id)},{creds.for_report().encode()}"


def _parse_service_and_creds(text: str) -> Tuple[str, Credentials]:
    parts = _split(text, 1)
    if len(parts) != 2 or not parts[0].startswith("service_id:"):
        raise MalformedKey(f"does not start with service_id:<id>, ({_clip(text)!r})")
    service_id = unescape(parts[0][len("service_id:"):])
    if not service_id:
        raise MalformedKey("empty service_id")
    return service_id, Credentials.decode(parts[1])


def parse_report_key(key: str) -> Tuple[str, Credentials]:
    """``report,service_id:<sid>,<creds>`` -> (service_id, credentials)."""
    if not key.startswith("report,"):
        raise MalformedKey(f"not a report key ({_clip(key)!r})")
    return _parse_service_and_creds(key[len("report,"):])


# Hand-over suffix: ``_<UTC %Y%m%d%H%M%S>`` as the Ruby daemon wrote it, then
# ``_<cycle id>`` (random hex) that makes it unique across processes and
# within one second, and ``-<n>`` when a cycle adopts another cycle's leftover.
_SUFFIX = re.compile(r"_(\d{14})(?:_([0-9a-f]{12})(?:-\d+)?)?$")


def to_flush_key(report_key_: str, suffix: str) -> str:
    return f"{TO_FLUSH_PREFIX}{report_key_}{suffix}"


def split_suffixed(name: str, prefix: str) -> Tuple[str, Optional[str]]:
    """``<prefix><body><suffix>`` -> (body, cycle id or None for Ruby-era keys)."""
    if not name.startswith(prefix):
        raise MalformedKey(f"expected prefix {prefix!r} ({_clip(name)!r})")
    match = _SUFFIX.search(name, len(prefix))
    if not match:
        raise MalformedKey(f"no hand-over suffix ({_clip(name)!r})")
    return name[len(prefix):match.start()], match.group(2)


class AuthRequest(NamedTuple):
    """A priority authorization request received on the requests channel."""

    raw: str                 # the message exactly as received
    service_id: str
    credentials: Credentials
    metric: str

    @property
    def auth_key(self) -> str:
        # Decision 1: "auth," + the message minus its trailing ",metric:<metric>",
        # which is what the gateway itself computes, escaping and all.
        return "auth," + self.raw[: self.raw.rindex(",metric:")]

    @property
    def response_channel(self) -> str:
        return AUTH_RESPONSES_CHANNEL_PREFIX + self.raw

    @property
    def dedup_key(self) -> Tuple[str, Credentials, str]:
        return (self.service_id, self.credentials, self.metric)


def parse_auth_request(raw: str) -> AuthRequest:
    """``service_id:<sid>,<creds>,metric:<metric>`` -> AuthRequest."""
    fields = _split(raw)
    if len(fields) < 3 or not fields[-1].startswith("metric:"):
        raise MalformedKey(f"auth request without a trailing metric ({_clip(raw)!r})")
    metric = unescape(fields[-1][len("metric:"):])
    if not metric:
        raise MalformedKey("auth request with an empty metric")
    service_id, creds = _parse_service_and_creds(",".join(fields[:-1]))
    return AuthRequest(raw, service_id, creds, metric)


def auth_request_message(service_id: str, creds: Credentials, metric: str) -> str:
    """What the gateway publishes (used by the simulated gateway and tests)."""
    return f"service_id:{escape(service_id)},{creds.encode()},metric:{escape(metric)}"


# Auth values: "1" authorized, "0" denied, "0:<reason>" denied with a reason.
AUTHORIZED = "1"


def denied(reason: Optional[str] = None) -> str:
    return f"0:{reason}" if reason else "0"


def denial_reason(value: str) -> Optional[str]:
    """The reason of a denied value, as the gateway decodes it (from the 3rd char)."""
    return value[2:] if value.startswith("0") and len(value) >= 3 else None


_COUNTER = re.compile(r"[0-9]{1,19}")
_COUNTER_MAX = (1 << 63) - 1  # Redis counters are signed 64-bit


def parse_usage(fields: Dict[str, str]) -> Tuple[Dict[str, int], Dict[str, str]]:
    """A report hash's fields -> (usage, fields that HINCRBY cannot have written).

    Usage is what the gateway's HINCRBY leaves: plain decimal digits, at most
    a 64-bit counter. Anything else (``-4``, ``1.5``, `` 7``, ``1_000``, 10**23)
    was written by something else and is set aside, not reported.
    """
    usage, bad = {}, {}
    for metric, value in fields.items():
        number = int(value) if _COUNTER.fullmatch(value) else -1
        if not 0 <= number <= _COUNTER_MAX:
            bad[metric] = value
        elif number:
            usage[sys.intern(metric)] = number  # metric names repeat in every report of a cycle
    return usage, bad


def redact_key(key: str) -> str:
    """A Redis key for logs, with credential secrets cut short."""
    try:
        head, rest = key.split(",", 1)
        service_id, creds = _parse_service_and_creds(rest)
        return f"{head},service_id:{service_id},{creds.redacted()}"
    except (ValueError, MalformedKey):
        return _clip(key, 24)


def iter_chunks(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
