"""Per-metric authorization values from one authorize answer (pure).

The rule is the Ruby daemon's (decision 4): a metric is authorized only if
``current < max`` for every limited period, because the cached value must
hold for the *next* hit; a denied metric denies its descendants, since usage
of a child counts against its parents; a denial that is not about limits
denies every reported metric with the error code.
"""

from typing import Dict, Iterable, List

from .backend import LIMITS_EXCEEDED, AuthStatus
from .keys import AUTHORIZED, denied


def authorizations(status: AuthStatus, reported_metrics: Iterable[str]) -> Dict[str, str]:
    """Map metric -> auth value ('1', '0', '0:<reason>') for the auth hash.

    Covers every limited metric, every reported metric, and the descendants
    of denied metrics.
    """
    reported = list(reported_metrics)
    if not status.authorized and not status.limits_exceeded:
        value = denied(status.reason_code)
        return {metric: value for metric in reported}

    limits: Dict[str, List[bool]] = {}
    for report in status.usage_reports:
        limits.setdefault(report.metric, []).append(report.current_value < report.max_value)
    for metric in reported:
        limits.setdefault(metric, [])

    result: Dict[str, str] = {}
    exceeded = denied(LIMITS_EXCEEDED)
    # Parents first, so a denial reaches children before they are judged alone.
    ordered = [m for m in status.hierarchy if m in limits] + [m for m in limits if m not in status.hierarchy]
    for metric in ordered:
        if metric in result:
            continue
        if all(limits[metric]):
            result[metric] = AUTHORIZED
        else:
            result[metric] = exceeded
            _deny_descendants(metric, status.hierarchy, result, exceeded)
    return result


def _deny_descendants(metric: str, hierarchy: Dict[str, List[str]], result: Dict[str, str], value: str):
    stack = list(hierarchy.get(metric, ()))
    while stack:
        child = stack.pop()
        if result.get(child) != value:
            result[child] = value
            stack.extend(hierarchy.get(child, ()))
