"""``xcflushd status``: one screen on the daemons sharing a Redis, from Redis alone.

Reads the daemons' heartbeats (heartbeat.py) and what waits in Redis, and
judges: healthy, degraded (no live daemon, flushing stale or failing, dead
letters), or Redis unreachable. The exit codes are the CLI's: 0, 1, 2.
"""

import time
from typing import Any, Dict, List, Optional

from .errors import StorageUnavailable
from .outage import describe_effect
from .storage import read_backlog, read_heartbeats

HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 2
#: A daemon whose last cycle ended longer ago than this many frequencies is stalled.
STALE_AFTER_CYCLES = 3


def collect(client, now: Optional[float] = None) -> Dict[str, Any]:
    """The status document (``--json`` prints it as is)."""
    now = time.time() if now is None else now
    try:
        daemons = read_heartbeats(client)
        backlog = read_backlog(client)
    except StorageUnavailable as exc:
        return {"redis": str(exc), "healthy": False, "problems": [f"Redis unreachable: {exc}"]}
    problems = [p for d in daemons for p in _outage_problems(d, now) + _daemon_problems(d, now)]
    problems += [f"{d.get('host')}:{d.get('pid')}: last reload refused: {(d.get('reload') or {}).get('error')}"
                 for d in daemons if (d.get("reload") or {}).get("ok") is False]
    # The daemon whose flush cycle began last (on a shared Redis, any of them may take a cycle).
    cycles = [d for d in daemons if (d.get("last_cycle") or {}).get("started_at")]
    last_cycle_by = max(cycles, key=lambda d: d["last_cycle"]["started_at"]).get("id") if cycles else None
    if not daemons:
        problems.append("no live xcflushd daemon on this Redis")
    if backlog.dead_letters:
        problems.append(f"{backlog.dead_letters} report(s) in the dead letter (xcflushd dead-letter list)")
    return {
        "redis": "ok", "daemons": daemons, "reports_pending": backlog.reports_pending,
        "gateway_reports": backlog.gateway_reports, "handover_keys": backlog.handover_keys,
        "dead_letters": backlog.dead_letters, "last_cycle_by": last_cycle_by,
        "healthy": not problems, "problems": problems,
    }


def _outage_problems(daemon: Dict[str, Any], now: float) -> List[str]:
    outage = daemon.get("outage") or {}
    if not outage.get("in_outage"):
        return []
    return [f"{daemon.get('host')}:{daemon.get('pid')}: backend outage since "
            f"{_ago(outage.get('started_at'), now)}: {describe_effect(outage, now)}"]


def _daemon_problems(daemon: Dict[str, Any], now: float) -> List[str]:
    name = f"{daemon.get('host')}:{daemon.get('pid')}"
    frequency = float(daemon.get("frequency") or 0)
    cycle = daemon.get("last_cycle")
    since = (cycle or {}).get("finished_at") or daemon.get("started_at") or now
    if frequency and now - since > STALE_AFTER_CYCLES * frequency + 60:
        what = "its last flush cycle ended" if cycle else "it started"
        return [f"{name}: flushing stalled, {what} {now - since:.0f}s ago (frequency {frequency:.0f}s)"]
    if cycle and cycle.get("result") != "ok":
        reason = cycle.get("error") or cycle.get("backend_error") or f"{cycle.get('failed', 0)} report(s) kept"
        return [f"{name}: last flush cycle {cycle.get('result')}: {reason}"]
    return []


def exit_code(document: Dict[str, Any]) -> int:
    if document.get("redis") != "ok":
        return UNREACHABLE
    return HEALTHY if document["healthy"] else DEGRADED


def _ago(ts: Optional[float], now: float) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) + f" ({now - ts:.0f}s ago)"


def render(document: Dict[str, Any], redis_display: str, now: Optional[float] = None) -> str:
    """The human screen."""
    now = time.time() if now is None else now
    lines = [f"redis:          {redis_display} ({document['redis']})"]
    if document.get("redis") == "ok":
        daemons = document["daemons"]
        lines.append(f"daemons alive:  {len(daemons)}")
        for d in daemons:
            lines.append(f"  {d.get('host')} pid {d.get('pid')} version {d.get('version')}, "
                         f"up since {_ago(d.get('started_at'), now)}, {d.get('cycles', 0)} cycle(s), "
                         f"every {d.get('frequency')}s"
                         + (", took the last cycle" if d.get("id") == document.get("last_cycle_by") else ""))
            lines.append(f"    metrics {d.get('metrics') or 'not served'}")
            o = d.get("outage")
            if o:
                lines.append(f"    backend outage since {_ago(o.get('started_at'), now)}: {describe_effect(o, now)}"
                             if o.get("in_outage") else
                             f"    backend answering, last answer {_ago(o.get('last_answer'), now)}, "
                             f"--backend-outage {o.get('mode')}")
            reload = d.get("reload")
            if reload:
                lines.append(f"    last reload {'ok' if reload.get('ok') else 'REFUSED'}, {_ago(reload.get('at'), now)}"
                             + (f": {reload.get('error')}" if reload.get("error") else ""))
            c = d.get("last_cycle")
            if c:
                lines.append(f"    last cycle {c.get('result')}, ended {_ago(c.get('finished_at'), now)}: "
                             f"{c.get('delivered')}/{c.get('reports')} reports delivered, {c.get('failed')} kept, "
                             f"{c.get('dead_lettered')} dead-lettered, {c.get('authorized')} authorizations renewed"
                             + (f"; {c.get('error') or c.get('backend_error')}"
                                if c.get("error") or c.get("backend_error") else ""))
            else:
                lines.append("    no flush cycle finished yet")
        lines += [f"reports pending: {document['reports_pending']} "
                  f"({document['gateway_reports']} in report_keys, {document['handover_keys']} hand-over keys)",
                  f"dead letters:   {document['dead_letters']}"]
    lines.append("health:         " + ("healthy" if document["healthy"] else "DEGRADED"))
    lines += [f"  - {p}" for p in document["problems"]]
    return "\n".join(lines)
