"""Fault injection: which requests fail, how, and the bodies the faults send.

A fault config is a JSON-able dict::

    {"rate": 0.1,                      # probability that an eligible request is faulted
     "kinds": ["500", "reset"],        # chosen uniformly among those eligible
     "endpoints": ["authorize", "oauth_authorize", "report"],
     "seed": 42,                       # None: non-reproducible
     "timeout_s": 30.0,                # how long "timeout" holds the connection
     "huge_bytes": 8388608}            # body size of "huge"

Kinds and what a client sees:

==============================  =================================================================
``500``                         500, ``text/plain`` body ``Internal Server Error\\n``
``503_html``                    503, an HTML error page (``text/html``)
``timeout``                     no answer for ``timeout_s``, then the connection is closed
``reset``                       the connection is reset (RST, SO_LINGER 0) before any answer
``empty_4xx``                   403 with an empty body
``truncated``                   the real status line with the XML cut in half (Content-Length
                                matches what is sent)
``garbage``                     200 with a body that is not XML
``xml_bomb``                    200 whose body declares a billion-laughs entity expansion
``huge``                        200 with a ``huge_bytes`` body
``wrong_content_type``          the real answer served as ``text/html``
``report_applied_then_reset``   (report only) the batch is applied, then the connection is reset
                                before the 202: the "acknowledgement lost in transit" case
==============================  =================================================================

Faults on a report are decided before anything is applied, and only kinds that a client can
recognise as a failure are eligible on the report endpoint (``500``, ``503_html``, ``timeout``,
``reset``, ``empty_4xx``, ``report_applied_then_reset``): a report that is answered 2xx without
being applied would be a backend that loses data, which is not what the faults are for. The
body-mangling kinds are for the authorization endpoints, whose XML a client must parse.
"""

import random
import threading
from typing import Any, Dict, List, Optional

ENDPOINTS = ("authorize", "oauth_authorize", "report")
_AUTH = frozenset(("authorize", "oauth_authorize"))
_ALL = frozenset(ENDPOINTS)

# kind -> endpoints where it may be injected
KINDS: Dict[str, frozenset] = {
    "500": _ALL,
    "503_html": _ALL,
    "timeout": _ALL,
    "reset": _ALL,
    "empty_4xx": _ALL,
    "truncated": _AUTH,
    "garbage": _AUTH,
    "xml_bomb": _AUTH,
    "huge": _AUTH,
    "wrong_content_type": _AUTH,
    "report_applied_then_reset": frozenset(("report",)),
}

DEFAULT_KINDS = ("500", "503_html", "reset")
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_HUGE_BYTES = 8 * 1024 * 1024

INTERNAL_ERROR_BODY = b"Internal Server Error\n"
HTML_503_BODY = (b"<html><head><title>503 Service Unavailable</title></head><body>"
                 b"<h1>503 Service Unavailable</h1>No server is available to handle this "
                 b"request.</body></html>\n")
GARBAGE_BODY = b"\x1f\x8b\x08\x00 {\"not\": \"xml\"} ]]> <<\xff\xfe\x00garbage"

XML_BOMB_BODY = (
    b'<?xml version="1.0"?><!DOCTYPE status [<!ENTITY lol "lol">'
    + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%s;" % (b"" if i == 1 else b"%d" % (i - 1)))
                                                * 10)
               for i in range(1, 10))
    + b"]><status><authorized>true</authorized><plan>&lol9;</plan></status>"
)


def huge_body(size: int) -> bytes:
    """A well-formed but absurdly large status document of ``size`` bytes (at least)."""
    head = b'<?xml version="1.0" encoding="UTF-8"?><status><authorized>true</authorized><plan>'
    tail = b"</plan></status>"
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


class FaultPlan:
    """The current fault config plus its random generator; thread-safe."""

    def __init__(self, spec: Optional[Dict[str, Any]] = None):
        self._lock = threading.Lock()
        self.configure(spec)

    def configure(self, spec: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """Replace the config (None or {} disables faults); ValueError when malformed."""
        normalized = normalize(spec or {})
        rng = random.Random(normalized["seed"])
        eligible = {ep: [k for k in normalized["kinds"] if ep in KINDS[k]] for ep in ENDPOINTS}
        huge = huge_body(normalized["huge_bytes"]) if "huge" in normalized["kinds"] else b""
        with self._lock:
            self.spec = normalized
            self._rng = rng
            self._rate = normalized["rate"]
            self._eligible = {ep: kinds for ep, kinds in eligible.items()
                              if ep in normalized["endpoints"] and kinds}
            self.timeout_s = normalized["timeout_s"]
            self.huge = huge
        return dict(normalized)

    def reseed(self) -> None:
        """Restart the random sequence (used by a state reset, for reproducible runs)."""
        with self._lock:
            self._rng = random.Random(self.spec["seed"])

    def pick(self, endpoint: str) -> Optional[str]:
        """Decide whether this request is faulted; return the kind or None."""
        if self._rate <= 0.0:  # fast path, no lock: faults are off in most runs
            return None
        with self._lock:
            kinds = self._eligible.get(endpoint)
            if not kinds or self._rng.random() >= self._rate:
                return None
            return kinds[0] if len(kinds) == 1 else self._rng.choice(kinds)


def normalize(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Validate a fault config and fill in the defaults."""
    if not isinstance(spec, dict):
        raise ValueError("faults must be an object")
    unknown = set(spec) - {"rate", "kinds", "endpoints", "seed", "timeout_s", "huge_bytes"}
    if unknown:
        raise ValueError(f"faults: unknown key(s) {sorted(unknown)}")
    rate = spec.get("rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError("faults: rate must be a number in [0, 1]")
    kinds = _names(spec.get("kinds", list(DEFAULT_KINDS)), "kinds", KINDS)
    endpoints = _names(spec.get("endpoints", list(ENDPOINTS)), "endpoints", ENDPOINTS)
    seed = spec.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("faults: seed must be an integer or null")
    timeout_s = spec.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s < 0:
        raise ValueError("faults: timeout_s must be a number >= 0")
    huge_bytes = spec.get("huge_bytes", DEFAULT_HUGE_BYTES)
    if isinstance(huge_bytes, bool) or not isinstance(huge_bytes, int) or huge_bytes < 0:
        raise ValueError("faults: huge_bytes must be an integer >= 0")
    return {"rate": float(rate), "kinds": kinds, "endpoints": endpoints, "seed": seed,
            "timeout_s": float(timeout_s), "huge_bytes": huge_bytes}


def _names(value: Any, what: str, known) -> List[str]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"faults: {what} must be a list of strings")
    bad = [v for v in value if v not in known]
    if bad:
        raise ValueError(f"faults: unknown {what} {bad}; known: {sorted(known)}")
    return list(dict.fromkeys(value))
