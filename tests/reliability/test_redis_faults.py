"""Redis faults (issue 15): restarts under load, a full Redis, a killed daemon, SIGTERM in every phase.

The gateway writer here does HINCRBY + SADD in MULTI, so a write is applied
whole or not at all, and only a write whose EXEC reply was lost (Redis went
away under it) has an unknown outcome: it is kept apart in ``uncertain``.
Per (report key, metric) the books must then give

    0 <= received + dropped + in Redis - written - duplicated by lost 2xx <= uncertain

(``duplicated by lost 2xx`` is the simulator's ``report_applied_then_reset``
ledger: decision 6's window). XCFLUSHD_CHAOS=long (``make chaos``) restarts
Redis five times as often.
"""

import collections
import json
import os
import random
import re
import threading
import time
import urllib.request

import pytest
import redis
from chaoslib import (
    LONG,
    GatedGateway,
    Load,
    chaos_apps,
    chaos_config,
    ledger_by_key,
    no_retry_client,
    usage_in_redis,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from xcftest import RedisServer

from xcflushd import heartbeat
from xcflushd.defaults import LEASE_PREFIX, REPORT_KEYS_SET
from xcflushd.keys import Credentials, auth_key, auth_request_message, report_key
from xcflushd.storage import Cycle, Storage, connect
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

READY = "ready: priority auth channel subscribed"
CYCLE_DONE = "flush cycle: reports="
RESTARTS = 15 if LONG else 3


class MultiGateway(GatedGateway):
    """The gateway's cached report, HINCRBY + SADD in one MULTI/EXEC."""

    def __init__(self, client, gate):
        super().__init__(client, gate)
        self.refused = collections.Counter()  # EXECABORT (Redis full): nothing applied

    def cache_report(self, service_id, creds, metric, value=1):
        key = report_key(service_id, creds)
        with self.gate.op():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(key, metric, value)
            pipe.sadd(REPORT_KEYS_SET, key)
            try:
                pipe.execute()
            except redis.ResponseError:
                with self._lock:
                    self.refused[(key, metric)] += value
                raise
            except redis.RedisError:
                with self._lock:
                    self.uncertain[(key, metric)] += value
                raise
            with self._lock:
                self.written[(service_id, key, metric)] += value


class MultiLoad(Load):
    def __init__(self, port, apps, seed):
        super().__init__(port, apps, seed)
        self.gateway = MultiGateway(no_retry_client(port), self.gate)
        self.prio_gateway = MultiGateway(no_retry_client(port), self.gate)
        for attr in ("written", "_lock", "uncertain", "refused"):
            setattr(self.prio_gateway, attr, getattr(self.gateway, attr))


def daemon_args(redis_server, sim, key_file, *extra):
    return ["run", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file", str(key_file),
            "-c", "/dev/null", "--frequency", "1", "--auth-ttl", "3", "--report-auth-wait", "0",
            "--threads", "4", "--prio-threads", "2", "--report-batch-size", "7",
            "--backend-connect-timeout", "1", "--backend-read-timeout", "1", "--max-term-wait", "10", *extra]


def final_flush(daemon_process, redis_server, sim, key_file):
    """No daemon is alive: one `flush` must deliver whatever is left."""
    sim.backend.set_faults(None)
    sim.latency = 0.0
    args = daemon_args(redis_server, sim, key_file)[1:]
    final = daemon_process(["flush", *args])
    assert final.proc.wait(60) == 0, final.output()[-3000:]
    return final


def books(client, sim, load, apps):
    """Per key: received + dropped + in Redis - written - unacknowledged; and what is left in Redis."""
    written = load.written()
    in_redis, places = usage_in_redis(client)
    state = sim.backend.state()
    received = ledger_by_key(state["received"], apps)
    dropped = ledger_by_key(state["dropped"], apps)
    unacked = ledger_by_key(state["unacknowledged"], apps)
    keys = set(written) | set(received) | set(dropped) | set(in_redis)
    excess = {k: received[k] + dropped[k] + in_redis[k] - written[k] - unacked[k] for k in keys}
    return excess, in_redis, places, state


def assert_exact(excess, uncertain):
    lost = {k: -v for k, v in excess.items() if v < 0}
    duplicated = {k: v - uncertain.get(k, 0) for k, v in excess.items() if v > uncertain.get(k, 0)}
    assert lost == {}, f"usage lost: {lost}"
    assert duplicated == {}, f"usage counted twice beyond writes of unknown outcome: {duplicated}"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "pk"
    path.write_text("pk-test\n")
    return path


@pytest.mark.slow
def test_redis_restarts_under_load_lose_nothing_and_count_nothing_twice(key_file, daemon_process, capsys):
    seed = int(os.environ.get("XCFLUSHD_CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    redis_server = RedisServer(persistent=True)
    faults = {"rate": 0.2, "kinds": ["500", "timeout", "reset", "report_applied_then_reset"], "timeout_s": 1.0,
              "seed": seed}
    sim = Simulator(chaos_config(), faults=faults, latency=0.05).start()
    apps = chaos_apps()
    client = no_retry_client(redis_server.port)
    load = MultiLoad(redis_server.port, apps, seed)
    try:
        daemon = daemon_process(daemon_args(redis_server, sim, key_file))
        daemon.wait_for(READY, timeout=30)
        load.start()
        for _ in range(RESTARTS):
            time.sleep(rng.uniform(0.5, 2.0))
            # Down for up to 3 s, within the retry budget; the load keeps
            # writing: some EXEC replies are lost.
            redis_server.stop()
            time.sleep(rng.uniform(0.2, 3.0))
            redis_server.start()
        cycles = daemon.output().count(CYCLE_DONE)
        wait_until(lambda: daemon.output().count(CYCLE_DONE) > cycles + 1, 30, what="cycles after the restarts")
        load.finish()
        assert daemon.stop() == 0
        out = daemon.output()
        final_flush(daemon_process, redis_server, sim, key_file)
        excess, in_redis, places, state = books(client, sim, load, apps)
    finally:
        load.finish()
        sim.stop()
        redis_server.close()
    uncertain = dict(load.gateway.uncertain)
    with capsys.disabled():
        print("\nredis restarts:", json.dumps({
            "seed": seed, "restarts": RESTARTS, "written": sum(load.written().values()),
            "uncertain": sum(uncertain.values()), "unacknowledged": sum(ledger_by_key(state["unacknowledged"],
                                                                                      apps).values()),
            "faults": state["faults_by_kind"], "cycles": out.count(CYCLE_DONE),
            "failed_cycles": out.count("flush cycle failed"), "load_errors": dict(load.errors)}))
    assert_exact({k: v for k, v in excess.items() if k[0] not in {a.report_key for a in apps if not a.known}},
                 uncertain)
    assert sum(in_redis.values()) == 0, f"usage left in Redis after the final flush: {places}"
    assert sum(state["faults_by_kind"].values()) > 0
    # An outage shorter than the retry policy's budget fails no cycle.
    assert "flush cycle failed" not in out, out[-3000:]
    assert "Traceback" not in out


def scrape(daemon, name):
    text = urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}\{{what="(\w+)"\}} (\S+)$', text, re.M)}


class Filler:
    """Keeps Redis at maxmemory: whatever memory the daemon frees, this takes back."""

    def __init__(self, port):
        self.client = no_retry_client(port)
        self.stop = threading.Event()
        self.full = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        n = 0
        while not self.stop.is_set():
            try:
                self.client.set(f"filler:{n}", "x" * 4096)
                n += 1
            except redis.ResponseError:
                self.full += 1
                time.sleep(0.002)


@pytest.mark.slow
def test_a_full_redis_keeps_cycles_delivering(key_file, daemon_process):
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + (6 << 20)))
    sim = Simulator(chaos_config()).start()
    apps = chaos_apps()
    load = MultiLoad(redis_server.port, apps, 7)
    filler = Filler(redis_server.port)
    try:
        daemon = daemon_process(daemon_args(redis_server, sim, key_file))
        daemon.wait_for(READY, timeout=30)
        load.start()
        filler.thread.start()
        wait_until(lambda: filler.full > 0, 30, what="Redis to be full")
        cycles = daemon.output().count(CYCLE_DONE)
        wait_until(lambda: daemon.output().count(CYCLE_DONE) >= cycles + 4, 60, what="cycles while full")

        # The priority path answers once, even when it cannot cache (a referrer
        # of its own: no request of the load shares its channel).
        probe = Credentials({"app_id": "free1", "referrer": "probe.example.org"})
        message = auth_request_message("555", probe, "hits")
        listener = no_retry_client(redis_server.port).pubsub(ignore_subscribe_messages=True)
        listener.subscribe("xc_channel_auth_response:" + message)
        client.publish("xc_channel_auth_requests", message)
        answers = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            got = listener.get_message(timeout=0.2)
            if got:
                answers.append(got["data"])
        listener.close()
        degraded = scrape(daemon, "xcflushd_redis_degraded_writes_total")
        full_cycles = [line for line in daemon.output().splitlines()[-200:] if CYCLE_DONE in line]
        refused_while_full = sum(load.gateway.refused.values())
        filler.stop.set()
        filler.thread.join(5)
        load.finish()
        for name in client.scan_iter("filler:*", count=1000):
            client.delete(name)
        assert daemon.stop() == 0
        out = daemon.output()
        final_flush(daemon_process, redis_server, sim, key_file)
        excess, in_redis, places, _ = books(client, sim, load, apps)
    finally:
        filler.stop.set()
        load.finish()
        sim.stop()
        redis_server.close()
    assert answers == ["1"], f"priority answers published for one request: {answers}"
    assert refused_while_full > 0, "the gateway's writes were never refused: Redis was not full"
    assert "flush cycle failed" not in out, out[-3000:]
    # Cycles kept running while full (the wait above) and delivered what the gateway got in.
    delivering = [line for line in full_cycles if not re.search(r" delivered=0 ", line)]
    assert delivering, "\n".join(full_cycles)
    assert degraded.get("authorization", 0) > 0, f"no authorization refused, though Redis was full: {degraded}"
    assert "could not cache" in out
    assert_exact({k: v for k, v in excess.items() if k[0] not in {a.report_key for a in apps if not a.known}},
                 dict(load.gateway.uncertain))
    assert sum(in_redis.values()) == 0, places


# ---- adoption of a dead daemon's cycle -------------------------------------------------------------

def test_a_lease_whose_daemon_heartbeat_is_gone_is_adopted_at_once(redis_server, r):
    """Another host's daemon died: its lease (60 s) still stands, its heartbeat (15 s) is gone."""
    storage = Storage(connect(redis_server.url))
    dead = Cycle.new("elsewhere:4242:abcdef")
    alive = Cycle.new("elsewhere:4343:fedcba")
    gateway = Gateway(r)
    for cycle, app in ((dead, "free1"), (alive, "free2")):
        gateway.cache_report("555", Credentials({"app_id": app}), "hits", 3)
        member = report_key("555", Credentials({"app_id": app}))
        r.rename(member, "to_flush:" + member + cycle.suffix)
        r.srem(REPORT_KEYS_SET, member)
        storage.take_lease(cycle, 60)
    r.set(heartbeat.PREFIX + alive.owner, "{}", ex=15)

    owned = storage.hand_over(Cycle.new("here:1:000000"), recover=True)

    adopted = [member for _, member in owned.items()]
    assert adopted == [report_key("555", Credentials({"app_id": "free1"}))]
    assert r.exists(LEASE_PREFIX + dead.id), "adopted before the lease ran out"


@pytest.mark.slow
def test_a_killed_daemon_is_adopted_by_the_next_one_without_waiting_for_its_lease(
        tmp_path, key_file, daemon_process):
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    gateway = Gateway(client)
    apps = [a for a in chaos_apps() if a.known][:12]
    for app in apps:
        gateway.cache_report(app.service_id, app.creds, app.metrics[0], 2)
    try:
        with Simulator(chaos_config(), latency=0.5) as sim:
            first = daemon_process(daemon_args(redis_server, sim, key_file))
            wait_until(lambda: sim.backend.calls().get("report", 0) >= 1, 20, what="the first daemon's reports")
            first.kill()
            leases = list(client.scan_iter(LEASE_PREFIX + "*"))
            assert leases and list(client.scan_iter("to_flush:*")), "the kill left no cycle to adopt"
            second = daemon_process(daemon_args(redis_server, sim, key_file))
            second.wait_for("adopted ", timeout=30)
            wait_until(lambda: not list(client.scan_iter("to_flush:*")), 30, what="the adopted reports delivered")
            # Adopted because its daemon is gone, not because its lease ran out.
            assert any(client.exists(name) for name in leases)
            assert second.output().count(CYCLE_DONE) <= 3, second.output()[-3000:]
            second.stop()
            received = ledger_by_key(sim.backend.received(), apps)
    finally:
        redis_server.close()
    written = {(k, m): n for (_, k, m), n in gateway.written.items()}
    assert all(received[k] >= n for k, n in written.items()), "usage lost"


# ---- SIGTERM in every phase --------------------------------------------------------------------------

def _holding(client, command):
    return any(c.get("name") == "xcflushd" and c.get("cmd") == command and "b" in c.get("flags", "")
               for c in client.client_list())


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["take", "report", "wait", "authorize"])
def test_sigterm_in_each_phase_exits_in_time_and_loses_nothing(phase, key_file, daemon_process):
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    gateway = Gateway(client)
    apps = [a for a in chaos_apps() if a.known]
    for app in apps:
        gateway.cache_report(app.service_id, app.creds, app.metrics[0], 2)
        # Cached: the reports go without a metric check, so every authorize call is the phase's.
        client.hset(auth_key(app.service_id, app.creds), app.metrics[0], "1")
    threads, max_term_wait = 4, 5
    try:
        with Simulator(chaos_config(), latency=0.4) as sim:
            args = daemon_args(redis_server, sim, key_file)
            args[args.index("--frequency") + 1] = "60"
            args[args.index("--auth-ttl") + 1] = "60"
            args[args.index("--report-auth-wait") + 1] = "3"
            args[args.index("--max-term-wait") + 1] = str(max_term_wait)
            if phase == "take":  # the cycle's first write (its lease) waits in Redis
                client.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
            daemon = daemon_process(args)
            if phase == "take":
                wait_until(lambda: _holding(client, "evalsha") or daemon.proc.poll() is not None, 20,
                           what="the lease to wait in Redis")
                assert daemon.proc.poll() is None, daemon.output()
            elif phase == "report":
                wait_until(lambda: sim.backend.calls().get("report", 0) >= 1, 20, what="report calls")
            elif phase == "wait":
                wait_until(lambda: "delivered=" in daemon.output() or (
                    sim.backend.calls().get("report", 0) and not usage_in_redis(client)[0]), 30,
                    what="the report phase to end")
                assert sim.backend.calls().get("authorize", 0) == 0
            else:
                wait_until(lambda: sim.backend.calls().get("authorize", 0) >= 1, 30, what="authorize calls")
            started_calls = sum(sim.backend.calls().get(e, 0) for e in ("report", "authorize"))
            daemon.proc.send_signal(15)
            if phase == "take":
                client.execute_command("CLIENT", "UNPAUSE")
            assert daemon.proc.wait(max_term_wait + 5) == 0, daemon.output()[-3000:]
            calls_after = sum(sim.backend.calls().get(e, 0) for e in ("report", "authorize")) - started_calls
            out = daemon.output()
            final_flush(daemon_process, redis_server, sim, key_file)
            received = ledger_by_key(sim.backend.received(), apps)
    finally:
        redis_server.close()
    # No new backend call after SIGTERM beyond those already starting (one engine turn).
    assert calls_after <= threads, f"{calls_after} calls started after SIGTERM in the {phase} phase"
    written = {(k, m): n for (_, k, m), n in gateway.written.items()}
    assert {k: received[k] for k in written} == written, out[-3000:]
    assert "Traceback" not in out


# ---- a Redis that refuses writes (READONLY, NOPERM) ----------------------------------------------

def ended(flusher, recover=False, bound=30.0):
    """``flush_once()``'s result; a cycle still running after ``bound`` seconds (wedged) fails the test."""
    box = []
    worker = threading.Thread(target=lambda: box.append(flusher.flush_once(recover)), daemon=True)
    worker.start()
    worker.join(bound)
    flusher.stop.set()  # lets a wedged cycle end
    assert not worker.is_alive() and box, f"the flush cycle was still running after {bound}s"
    flusher.stop.clear()
    return box[0]


class Refusal:
    """Makes a Redis refuse our writes, and takes it back: a replica of an empty master, or an ACL
    user that loses @write."""

    def __init__(self, kind, server):
        self.kind = kind
        self.admin = redis.Redis(port=server.port, decode_responses=True)
        self.url = server.url
        self.master = None
        if kind == "acl":
            self.admin.execute_command("ACL", "SETUSER", "xcf", "on", ">pw", "~*", "&*", "+@all")
            self.url = f"redis://xcf:pw@127.0.0.1:{server.port}"
        else:
            self.master = RedisServer()

    def refuse(self):
        if self.kind == "acl":
            self.admin.execute_command("ACL", "SETUSER", "xcf", "-@write")
        else:
            self.admin.execute_command("REPLICAOF", "127.0.0.1", str(self.master.port))

    def take_back(self):
        if self.kind == "acl":
            self.admin.execute_command("ACL", "SETUSER", "xcf", "+@write")
        else:
            self.admin.execute_command("REPLICAOF", "NO", "ONE")

    def close(self):
        if self.master is not None:
            self.master.close()


@pytest.mark.parametrize("kind, says", [("replica", "ReadOnlyError"), ("acl", "NoPermissionError")])
def test_a_redis_refusing_writes_mid_cycle_fails_that_cycle_and_the_next_ones_run(kind, says):
    from rawserver import StatusServer

    from xcflushd.backend import ServiceCredentials, make_client
    from xcflushd.flusher import Flusher, FlushSettings

    own = RedisServer()
    refusal = Refusal(kind, own)
    server = StatusServer([lambda _app: b"1000"], on_report=refusal.refuse)
    backend = make_client(server.url, ServiceCredentials("pk-test"), 2, 5)
    try:
        Gateway(refusal.admin).cache_report("555", Credentials({"app_id": "a1b2c3"}), "hits", 3)
        flusher = Flusher(Storage(connect(refusal.url)), backend, FlushSettings(report_auth_wait=0))
        refused = [ended(flusher) for _ in range(3)]  # mid-cycle, then at the start of each
        refusal.take_back()
        server.on_report = lambda: None
        Gateway(refusal.admin).cache_report("555", Credentials({"app_id": "free1"}), "hits")
        after = ended(flusher, recover=True)
    finally:
        backend.close()
        server.close()
        refusal.close()
        own.close()
    assert says in refused[0].error and "a1b2c3" not in refused[0].error, refused[0].summary()  # no key quoted
    for result in refused:
        assert result.error and result.error.startswith("StorageRefused"), result.summary()
    assert refused[0].delivered == 1 and refused[0].held == 1, refused[0].summary()
    assert after.error is None and after.delivered >= 1, after.summary()


@pytest.mark.slow
def test_a_daemon_whose_redis_becomes_a_replica_counts_failed_cycles_and_keeps_running(key_file, daemon_process):
    from rawserver import StatusServer

    own = RedisServer()
    refusal = Refusal("replica", own)
    server = StatusServer([lambda _app: b"1000"], on_report=refusal.refuse)
    try:
        Gateway(refusal.admin).cache_report("555", Credentials({"app_id": "a1b2c3"}), "hits", 3)
        daemon = daemon_process(["run", "--redis", own.address, "--backend", server.url, "--provider-key-file",
                                 str(key_file), "-c", "/dev/null", "--frequency", "1", "--report-auth-wait", "0"])
        daemon.wait_for(READY, timeout=30)

        def failed_cycles():
            text = urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=5).read().decode()
            found = re.search(r'^xcflushd_flush_cycles_total\{result="failed"\} (\S+)$', text, re.M)
            return float(found.group(1)) if found else 0.0

        wait_until(lambda: failed_cycles() >= 3, 30, what="three failed cycles, counted")
        assert daemon.stop() == 0
        out = daemon.output()
    finally:
        server.close()
        refusal.close()
        own.close()
    assert "Redis refused a write of this flush cycle" in out, out[-3000:]
    assert out.count("flush cycle failed") >= 3, out[-3000:]


REPLIES = st.one_of(st.text(max_size=300), st.sampled_from(["BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                                                            "NOREPLICAS", "READONLY", "NOPERM", "WRONGTYPE", "OOM",
                                                            "MISCONF", "ERR"]).flatmap(
    lambda code: st.text(max_size=200).map(lambda rest: f"{code} {rest}")))


@settings(max_examples=300, deadline=None)
@given(reply=REPLIES, in_pipeline=st.booleans(),
       cls=st.sampled_from([redis.ResponseError, redis.exceptions.ReadOnlyError, redis.exceptions.NoPermissionError,
                            redis.ConnectionError, redis.TimeoutError, redis.OutOfMemoryError, redis.DataError,
                            redis.exceptions.NoScriptError]))
def test_every_redis_error_is_one_line_of_one_of_three_kinds_and_quotes_no_key(reply, in_pipeline, cls):
    from xcflushd.errors import StorageFull, StorageRefused, StorageUnavailable
    from xcflushd.storage import storage_error

    secret = "to_flush:report,service_id:1,app_id:a,app_key:Ks3cr3t_x"
    text = f"Command # 3 (DEL {secret}) of pipeline caused error: {reply}" if in_pipeline else reply
    error = storage_error(cls(text))
    message = str(error)
    assert "\n" not in message and "\r" not in message and len(message) < 300, message
    assert "Ks3cr3t" not in message or "Ks3cr3t" in reply
    reply_to_a_command = issubclass(cls, redis.ResponseError)
    if cls in (redis.ConnectionError, redis.TimeoutError):
        assert type(error) is StorageUnavailable
    elif cls is redis.OutOfMemoryError or reply_to_a_command and reply.startswith("OOM"):
        assert type(error) is StorageFull
    elif cls is redis.exceptions.NoScriptError or reply_to_a_command and reply.split(" ", 1)[0] in (
            "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "NOSCRIPT"):
        assert type(error) is StorageUnavailable
    else:
        assert type(error) is StorageRefused, (cls, reply)
