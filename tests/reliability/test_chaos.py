"""Fault injection with exact accounting: nothing lost, nothing invented.

A gateway load writes usage as apicast-xc does while the daemon, at a short
frequency and with no wait, flushes it to the simulator, which faults a share
of its calls. The daemon is SIGKILLed at random moments and restarted;
redis-server (AOF, fsync always) is restarted; the daemon's Redis connections
are killed with CLIENT KILL. After every disruption, with the daemon stopped
and the load paused, the books are balanced per application and metric:

    received + dropped + still in Redis - written == duplicates >= 0

and the duplicates found since the last balance must be explained: those of
the simulator's ``report_applied_then_reset`` fault (its ``unacknowledged``
ledger), and after a SIGKILL, the reports caught between the backend's 202
and the DEL of their ``to_flush:`` key (decision 6): per application and
metric, no more than the usage the kill left in ``to_flush:`` keys. Anything
else fails.

Some rounds have a second daemon watching, which must never take the first's
live cycle for a dead one's: a SIGTERM while report calls are in flight (no
duplicate allowed), and a SIGKILL of a daemon in a PID namespace of its own
(``unshare``; its pid means nothing to the watcher).

XCFLUSHD_CHAOS=long (``make chaos``) runs ten times as many disruptions.
XCFLUSHD_CHAOS_SEED=N replays a run's schedule.
"""

import collections
import json
import os
import random
import shutil
import time

from chaoslib import (
    LONG,
    Load,
    chaos_apps,
    chaos_config,
    daemon_connections,
    handed_over_usage,
    kill_daemon_connections,
    ledger_by_key,
    no_retry_client,
    usage_in_redis,
    wait_until,
)
from xcftest import RedisServer

from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

KILLS, REDIS_RESTARTS, CLIENT_KILL_ROUNDS = (300, 20, 20) if LONG else (26, 3, 3)
SIGTERMS, PIDNS_KILLS = (30, 30) if LONG else (3, 3)
# The daemon as pid 1 of a PID namespace of its own; a SIGKILL of unshare kills it (--kill-child).
PIDNS = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
PIDNS_OK = os.geteuid() == 0 and shutil.which("unshare") is not None
FAULT_RATE = 0.15
FAULTS = {"rate": FAULT_RATE, "kinds": ["500", "503_html", "timeout", "reset", "empty_4xx", "truncated", "garbage",
                                        "xml_bomb", "huge", "wrong_content_type", "report_applied_then_reset"],
          "timeout_s": 1.5, "huge_bytes": 2 << 20}
READY = "ready: priority auth channel subscribed"
SUBSCRIBED = "listening for priority auth requests"
CYCLE_DONE = "flush cycle: reports="


class Books:
    """Balances the books after each disruption and attributes new duplicates to it."""

    def __init__(self, client, sim, load, apps):
        self.client, self.sim, self.load, self.apps = client, sim, load, apps
        self.unknown = {a.report_key for a in apps if not a.known}
        self.excess = collections.Counter()
        self.unacked = collections.Counter()
        self.entries = []

    def balance(self, event: str, **facts) -> dict:
        with self.load.gate.paused():
            written = self.load.written()
            in_redis, places = usage_in_redis(self.client)
            state = self.sim.backend.state()
        received = ledger_by_key(state["received"], self.apps)
        dropped = ledger_by_key(state["dropped"], self.apps)
        unacked = ledger_by_key(state["unacknowledged"], self.apps)
        keys = set(written) | set(received) | set(dropped) | set(in_redis)
        excess = {k: received[k] + dropped[k] + in_redis[k] - written[k] for k in keys}
        lost = {k: -v for k, v in excess.items() if v < 0}
        wrongly_dropped = {k: v for k, v in dropped.items() if v and k[0] not in self.unknown}
        new = collections.Counter()
        for k in keys:
            if k[0] in self.unknown:
                continue
            n = excess[k] - self.excess[k] - (unacked[k] - self.unacked[k])
            if n:
                new[k] = n
        entry = {"event": event, "lost": lost, "wrongly_dropped": wrongly_dropped,
                 "new_duplicates": sum(new.values()), "new_duplicates_by_key": dict(new),
                 "unacked_total": sum(unacked.values()), "in_redis": sum(in_redis.values()), "places": places,
                 "written_total": sum(written.values()), **facts}
        self.entries.append(entry)
        self.excess = collections.Counter(excess)
        self.unacked = unacked
        return entry


def daemon_args(redis_server, sim, key_file):
    return ["run", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file", key_file,
            "-c", "/dev/null", "--frequency", "1", "--auth-ttl", "3", "--report-auth-wait", "0",
            "--threads", "4", "--prio-threads", "2", "--report-batch-size", "7",
            "--backend-connect-timeout", "1", "--backend-read-timeout", "1", "--max-term-wait", "10"]


def wait_quiet(sim):
    """No HTTP request of a (dead or stopped) daemon is still being served."""
    wait_until(lambda: not sim._server.connections, FAULTS["timeout_s"] + 15, what="simulator connections to end")


def test_nothing_lost_under_kills_restarts_and_faults(tmp_path, daemon_process, capsys):
    from lab.notifysock import NotifyListener

    seed = int(os.environ.get("XCFLUSHD_CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    started = time.monotonic()
    key_file = tmp_path / "pk"
    key_file.write_text("pk-test\n")
    redis_server = RedisServer(persistent=True)
    sim = Simulator(chaos_config(), faults=dict(FAULTS, seed=seed)).start()
    apps = chaos_apps()
    client = no_retry_client(redis_server.port)
    probe = Gateway(no_retry_client(redis_server.port), priority_timeout=1.0)
    load = Load(redis_server.port, apps, seed,
                referrers={apps[0].report_key: ["a.example.org", "b.example.org"]}).start()
    books = Books(client, sim, load, apps)
    events = (["kill"] * KILLS + ["redis"] * REDIS_RESTARTS + ["clients"] * CLIENT_KILL_ROUNDS
              + ["sigterm"] * SIGTERMS + ["pidns" if PIDNS_OK else "kill"] * PIDNS_KILLS)
    rng.shuffle(events)
    daemons, failures, seen_hand_over = [], [], set()
    stats = collections.Counter()
    try:
        for n, event in enumerate(events):
            sim.latency = rng.choice([0.0, 0.0, 0.01, 0.05])
            listener = NotifyListener(tmp_path / f"n{n}.sock")
            args = daemon_args(redis_server, sim, str(key_file))
            if event == "sigterm":
                # The slow calls of this round must not time out: a report the backend applies after
                # its caller gave up is put back and counted twice, and that is not what is tested here.
                args[args.index("--backend-read-timeout") + 1] = "5"
            watcher = None
            if event in ("sigterm", "pidns"):
                watcher = daemon_process(args)
                daemons.append(watcher)
            daemon = daemon_process(args,
                                    env=listener.environ(WATCHDOG_USEC="1000000"),
                                    wrapper=PIDNS if event == "pidns" else ())
            daemons.append(daemon)
            try:
                daemon.wait_for(READY, timeout=60)
                if watcher is not None:  # a SIGTERM before it set its handlers would end it with -15
                    watcher.wait_for(READY, timeout=60)
                if rng.random() < 0.3:  # expire some cached auths: the priority path gets work
                    for app in rng.sample(apps, 5):
                        client.delete(app.auth_key)
                if event in ("kill", "pidns"):
                    time.sleep(rng.uniform(0.0, 2.5))
                    daemon.kill()
                    window = handed_over_usage(client)  # all this kill can have counted twice
                    stats["sigkill" if event == "kill" else "pidns_sigkill"] += 1
                    if watcher is not None:
                        assert watcher.stop() == 0, watcher.output()[-3000:]
                    wait_quiet(sim)
                    entry = books.balance("sigkill" if event == "kill" else event)
                    stats["kills_with_duplicates"] += bool(entry["new_duplicates"])
                    outside = {k: d for k, d in entry["new_duplicates_by_key"].items() if d > window[k]}
                    if outside:
                        failures.append(f"{event} #{n}: duplicates outside decision 6's window: {outside}")
                    hand_over = set(client.scan_iter("to_flush:*")) | set(client.scan_iter("flushing_report_keys_*"))
                    stats["kills_mid_cycle"] += bool(hand_over - seen_hand_over)  # it left hand-over keys
                    seen_hand_over |= hand_over
                elif event == "sigterm":
                    time.sleep(rng.uniform(0.3, 1.5))
                    first = daemon.output().split("heartbeat xcflushd:daemon:")[1].split()[0]
                    sim.latency = rng.uniform(0.2, 0.8)
                    calls = sim.backend.calls().get("report", 0)
                    wait_until(lambda calls=calls, first=first: sim.backend.calls().get("report", 0) > calls and any(
                        client.get(name) == first
                        for name in client.scan_iter("xcflushd:lease:*")), 15,
                        what="a report call in flight, the first daemon's cycle under way")
                    daemon.proc.send_signal(15)
                    assert daemon.proc.wait(30) == 0, daemon.output()[-3000:]
                    stats["sigterm_in_flight"] += 1
                    assert watcher.stop() == 0, watcher.output()[-3000:]
                    wait_quiet(sim)
                    entry = books.balance("sigterm")
                    if entry["new_duplicates"]:
                        failures.append(f"sigterm #{n}: {entry['new_duplicates']} duplicate hit(s), a second "
                                        f"daemon watching: {entry['new_duplicates_by_key']}")
                else:
                    time.sleep(rng.uniform(0.3, 1.5))
                    subscribed_before = daemon.output().count(SUBSCRIBED)
                    cycles_before = daemon.output().count(CYCLE_DONE)
                    disrupted_at = time.monotonic()
                    if event == "redis":
                        with load.gate.paused():
                            redis_server.restart()
                        stats["redis_restarts"] += 1
                    else:
                        for _ in range(3):
                            stats["connections_killed"] += kill_daemon_connections(client)
                            time.sleep(rng.uniform(0.1, 0.8))
                        stats["client_kill_rounds"] += 1
                    # Alive and READY again: resubscribed, answering, flushing, feeding the watchdog.
                    if event == "redis":
                        wait_until(lambda d=daemon, n=subscribed_before: d.output().count(SUBSCRIBED) > n, 30,
                                   what="the listener to resubscribe")
                    wait_until(lambda: len(daemon_connections(client)) > 0, 30, what="the daemon to reconnect")
                    answered = None
                    for _ in range(20):
                        probe.redis.delete(apps[5].auth_key)
                        answered = probe.priority_authorization("555", apps[5].creds, "hits")
                        if answered is not None:
                            break
                    assert answered == "1", f"no priority answer after {event}"
                    wait_until(lambda d=daemon, n=cycles_before: d.output().count(CYCLE_DONE) > n, 30,
                               what="a flush cycle after the disruption")
                    listener.wait_for("WATCHDOG", timeout=10)
                    assert any(t > disrupted_at and "WATCHDOG" in f for t, f in listener.poll(2.5)), \
                        f"no watchdog ping after {event}"
                    assert daemon.proc.poll() is None, f"daemon died after {event}"
                    assert daemon.stop() == 0
                    wait_quiet(sim)
                    entry = books.balance(event)
                    if entry["new_duplicates"]:
                        failures.append(f"{event}: {entry['new_duplicates']} duplicate hit(s) without a SIGKILL: "
                                        f"{entry['new_duplicates_by_key']}")
                if entry["lost"] or entry["wrongly_dropped"]:
                    failures.append(f"after {event} #{n}: lost {entry['lost']}, "
                                    f"valid usage dropped {entry['wrongly_dropped']}")
                    break
            finally:
                daemon.kill()
                if watcher is not None:
                    watcher.kill()
                listener.close()
        load.finish()

        # The end: no daemon is alive, so every lease and heartbeat is a dead one's (as after
        # their TTLs): a one-shot flush without faults must deliver everything that is left.
        for name in [*client.scan_iter("xcflushd:lease:*"), *client.scan_iter("xcflushd:daemon:*")]:
            client.delete(name)
        sim.backend.set_faults(None)
        sim.latency = 0.0
        final = daemon_process(["flush", *daemon_args(redis_server, sim, str(key_file))[1:]])
        daemons.append(final)
        assert final.proc.wait(60) == 0, final.output()[-3000:]
        wait_quiet(sim)
        last = books.balance("final flush")
    finally:
        load.finish()
        sim.stop()
        redis_server.close()

    state = sim.backend.state()
    outputs = [d.output() for d in daemons]
    stats["adopted_reports"] = sum(int(line.split("adopted ")[1].split()[0]) for out in outputs
                                   for line in out.splitlines() if "adopted " in line)
    kill_duplicates = sum(e["new_duplicates"] for e in books.entries if e["event"] in ("sigkill", "pidns"))
    summary = {
        "seed": seed, "mode": "long" if LONG else "ci", "runtime_s": round(time.monotonic() - started, 1),
        **stats, "faults_injected": state["faults_by_kind"], "calls": state["calls"],
        "written": last["written_total"], "received": sum(ledger_by_key(state["received"], apps).values()),
        "dropped_unknown_app": sum(ledger_by_key(state["dropped"], apps).values()),
        "duplicates_ack_lost_in_transit": last["unacked_total"], "duplicates_sigkill_window": kill_duplicates,
        "uncertain_gateway_writes": sum(load.gateway.uncertain.values()), "load_errors": dict(load.errors),
        "priority": dict(load.priority),
    }
    with capsys.disabled():
        print("\nchaos summary:", json.dumps(summary, sort_keys=True))
    report_path = os.environ.get("XCFLUSHD_CHAOS_REPORT")
    if report_path:
        with open(report_path, "w") as fh:
            json.dump({"summary": summary, "balances": [{k: v for k, v in e.items() if k != "new_duplicates_by_key"}
                                                        for e in books.entries]}, fh, default=str, indent=1)

    assert not failures, "\n".join(failures)
    assert last["lost"] == {} and last["wrongly_dropped"] == {}
    assert last["in_redis"] == 0 and not last["places"], f"usage left in Redis after the final flush: {last}"
    assert stats["sigkill"] >= KILLS and stats["redis_restarts"] == REDIS_RESTARTS
    assert stats["sigterm_in_flight"] == SIGTERMS and stats["pidns_sigkill"] == (PIDNS_KILLS if PIDNS_OK else 0)
    assert sum(state["faults_by_kind"].values()) > 0 and state["applied_but_unacknowledged"] > 0
    assert summary["uncertain_gateway_writes"] == 0
    for out in outputs:
        assert "Traceback" not in out and "Logging error" not in out, out[-3000:]
