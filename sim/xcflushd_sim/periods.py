"""Usage-limit periods, their UTC boundaries, and report timestamp parsing.

All times are POSIX seconds in UTC. A period instance starts at the beginning of the
minute/hour/day/week/month/year holding the instant (weeks start on Monday 00:00 UTC) and
ends, exclusively, where the next one starts. ``eternity`` has no bounds: it is reported
without ``period_start``/``period_end`` and its counters use the start ``0``.
"""

import calendar
import re
import time
from typing import Dict, Optional, Tuple

PERIODS = ("minute", "hour", "day", "week", "month", "year", "eternity")
PERIOD_INDEX = {p: i for i, p in enumerate(PERIODS)}

ETERNITY_START = 0
TIME_FORMAT = "%Y-%m-%d %H:%M:%S +0000"

# Accepted report window, relative to the backend's clock (apisonator transaction.rb).
REPORT_DEADLINE_PAST_S = 24 * 60 * 60
REPORT_DEADLINE_FUTURE_S = 60 * 60

Bounds = Dict[str, Tuple[int, Optional[int]]]


def _month_start(year: int, month: int) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


def compute_bounds(ts: float) -> Bounds:
    """Return ``{period: (start, end)}`` for the periods holding ``ts`` (end None: eternity)."""
    t = int(ts // 1)
    tm = time.gmtime(t)
    day = t - t % 86400
    week = day - tm.tm_wday * 86400  # tm_wday: Monday == 0
    next_month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return {
        "minute": (t - t % 60, t - t % 60 + 60),
        "hour": (t - t % 3600, t - t % 3600 + 3600),
        "day": (day, day + 86400),
        "week": (week, week + 7 * 86400),
        "month": (_month_start(tm.tm_year, tm.tm_mon), _month_start(*next_month)),
        "year": (_month_start(tm.tm_year, 1), _month_start(tm.tm_year + 1, 1)),
        "eternity": (ETERNITY_START, None),
    }


class BoundsCache:
    """Remembers the bounds of the last second asked for.

    Nearly every request of a run falls in the same second as the previous one, and
    computing month/year starts costs a few microseconds we do not want per counter.
    Not locked: a race only recomputes the same value.
    """

    def __init__(self):
        self._second = None
        self._bounds: Bounds = {}

    def get(self, ts: float) -> Bounds:
        second = int(ts // 1)
        if second != self._second:
            self._bounds = compute_bounds(second)
            self._second = second
        return self._bounds


_FORMATTED: Dict[int, str] = {}


def format_time(ts: int) -> str:
    """``2017-06-21 00:00:00 +0000`` — memoised: only a handful of boundaries exist at once."""
    text = _FORMATTED.get(ts)
    if text is None:
        if len(_FORMATTED) > 4096:
            _FORMATTED.clear()
        text = _FORMATTED[ts] = time.strftime(TIME_FORMAT, time.gmtime(ts))
    return text


_UNIX = re.compile(r"\A\s*[+-]?\d+\s*\Z")
_DATETIME = re.compile(
    r"\A\s*(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:[ T](\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?"
    r"\s*(Z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?\s*\Z",
    re.IGNORECASE,
)


def parse_timestamp(value) -> Optional[float]:
    """Parse a report ``timestamp``; None when absent or unparsable (the backend then uses now).

    Accepts UNIX seconds or ``YYYY-MM-DD[ HH:MM[:SS]]`` with an optional offset (``+HH:MM``,
    ``-0800``, ``Z``, ``UTC``). apisonator uses Ruby's very lenient ``Date._parse``; the
    forms above are the ones its documentation promises.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    if _UNIX.match(value):
        return float(int(value))
    m = _DATETIME.match(value)
    if not m:
        return None
    year, mon, mday, hour, minute, sec, offset = m.groups()
    fields = (int(year), int(mon), int(mday), int(hour or 0), int(minute or 0), int(sec or 0))
    # timegm() normalises out-of-range fields (month 13 -> next year): reject them instead.
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] < 24
            and fields[4] < 60 and fields[5] < 61):
        return None
    ts = calendar.timegm(fields + (0, 0, 0))
    if offset and offset.upper() not in ("Z", "UTC", "GMT"):
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        minutes = int(digits[:2]) * 60 + (int(digits[2:4]) if len(digits) > 2 else 0)
        ts -= sign * minutes * 60
    return float(ts)
