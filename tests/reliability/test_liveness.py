"""No cycle is adopted while its owner lives (issue 29): a stopping daemon, a cycle
without a lease, a daemon in another PID namespace, a stop shorter than a call.

Each test has a live cycle's report call in flight at a slow simulator while
another cycle looks for leftovers; the books must then show every hit
received exactly once (none of these is decision 6's window).
"""

import os
import shutil
import socket
import threading

import pytest
from chaoslib import chaos_apps, chaos_config, ledger_by_key, no_retry_client, wait_until
from xcftest import RedisServer

from xcflushd import storage as storage_module
from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.defaults import LEASE_PREFIX
from xcflushd.errors import StorageFull
from xcflushd.flusher import Flusher, FlushSettings
from xcflushd.heartbeat import Heartbeat
from xcflushd.keys import Credentials, auth_key, report_key
from xcflushd.storage import Cycle, Storage, connect
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

CYCLE_DONE = "flush cycle: reports="
READY = "ready: priority auth channel subscribed"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "pk"
    path.write_text("pk-test\n")
    return str(path)


def daemon_args(redis_server, sim, key_file, **options):
    settings = {"frequency": 1, "auth-ttl": 3, "report-auth-wait": 0, "threads": 4, "prio-threads": 2,
                "report-batch-size": 7, "backend-connect-timeout": 1, "backend-read-timeout": 1,
                "max-term-wait": 10, **options}
    args = ["run", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file", key_file,
            "-c", "/dev/null"]
    for name, value in settings.items():
        args += [f"--{name}", str(value)]
    return args


class Books:
    """Usage written by a gateway, and what the simulator received of it."""

    def __init__(self, client, apps, hits=2, cached=False):
        self.apps = apps
        gateway = Gateway(client)
        for app in apps:
            gateway.cache_report(app.service_id, app.creds, app.metrics[0], hits)
            if cached:  # a cached 1 vouches for the metric: the report call is the cycle's first
                client.hset(auth_key(app.service_id, app.creds), app.metrics[0], "1")
        self.written = {(k, m): n for (_, k, m), n in gateway.written.items()}

    def received(self, sim):
        received = ledger_by_key(sim.backend.received(), self.apps)
        return {k: received[k] for k in self.written}


def known_apps(n):
    return [a for a in chaos_apps() if a.known][:n]


def wait_quiet(sim):
    """Every call the simulator took has been answered (and so applied, if it is ever)."""
    wait_until(lambda: not sim._server.connections, 30, what="simulator connections to end")


def reports_in_flight(sim, n=1):
    wait_until(lambda: sim.backend.calls().get("report", 0) >= n, 20, what="report calls in flight")


class InProcessDaemon:
    """A daemon's flush cycle and heartbeat in this process: ours to slow down and look into."""

    def __init__(self, redis_url, sim):
        self.heartbeat = Heartbeat(connect(redis_url), 60, threading.Event()).start()
        wait_until(lambda: self.heartbeat.redis.exists(self.heartbeat.key), 5, what="the first heartbeat")
        self.backend = make_client(sim.url, ServiceCredentials("pk-test"), 1, 10)
        self.flusher = Flusher(Storage(connect(redis_url)), self.backend,
                               FlushSettings(report_auth_wait=0, auth_ttl=600), owner=self.heartbeat.id)
        self.result = None
        self.thread = threading.Thread(target=self._cycle, daemon=True)

    def _cycle(self):
        self.result = self.flusher.flush_once()

    def start(self):
        self.thread.start()
        return self

    def finish(self):
        self.thread.join(30)
        assert not self.thread.is_alive(), "the cycle did not end"
        self.heartbeat.clear()
        self.backend.close()
        return self.result


def fill(client):
    """Redis full: every write that needs memory is refused (noeviction), as the gateway's are."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) // 2))


# ---- 1. SIGTERM: the heartbeat beats until the cycle has ended ----------------------------------------

@pytest.mark.slow
def test_sigterm_during_a_slow_report_with_a_second_daemon_watching_counts_nothing_twice(key_file,
                                                                                          daemon_process):
    """The report takes longer than the heartbeat's TTL (15 s): the record must outlive it."""
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    books = Books(client, known_apps(4), cached=True)
    try:
        with Simulator(chaos_config(), latency=19.0) as sim:
            first = daemon_process(daemon_args(redis_server, sim, key_file, frequency=600,
                                               **{"auth-ttl": 600, "backend-read-timeout": 25,
                                                  "max-term-wait": 30}))
            reports_in_flight(sim)
            sim.latency = 0.0  # the watching daemon's own calls are quick: any adoption counts at once
            first.proc.send_signal(15)
            second = daemon_process(daemon_args(redis_server, sim, key_file))
            assert first.proc.wait(40) == 0, first.output()[-3000:]
            cycles = second.output().count(CYCLE_DONE)
            wait_until(lambda: second.output().count(CYCLE_DONE) >= cycles + 2, 20, what="two more cycles")
            assert second.stop() == 0
            wait_quiet(sim)
            received = books.received(sim)
    finally:
        redis_server.close()
    assert received == books.written, second.output()[-3000:]
    assert "Traceback" not in first.output() + second.output()


# ---- 2. a cycle without a lease: its daemon's heartbeat vouches for it ----------------------------------

@pytest.mark.parametrize("lease", ["refused by a full Redis before 7", "expired while renewals failed"])
def test_a_cycle_without_a_lease_is_not_adopted_while_its_heartbeat_beats(lease, monkeypatch):
    refused = lease.startswith("refused")
    if refused:
        monkeypatch.setattr(storage_module, "ALLOW_OOM", "")  # the scripts as Redis < 7 runs them
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    books = Books(client, known_apps(3), cached=True)
    try:
        with Simulator(chaos_config(), latency=2.0) as sim:
            owner = InProcessDaemon(redis_server.url, sim)
            if refused:
                fill(client)
            owner.start()
            reports_in_flight(sim)
            if not refused:
                for lease_key in client.scan_iter(LEASE_PREFIX + "*"):
                    # The owner's heartbeat id alone: what daemons of earlier versions look up.
                    assert client.get(lease_key) == owner.heartbeat.id
                    client.delete(lease_key)
            assert not list(client.scan_iter(LEASE_PREFIX + "*"))
            peer = Storage(connect(redis_server.url))
            adopted = peer.hand_over(Cycle.new("peer-host:1:abc123"), recover=True)
            sim.latency = 0.0
            result = owner.finish()
            client.config_set("maxmemory", "0")
            wait_quiet(sim)
            received = books.received(sim)
    finally:
        redis_server.close()
    assert len(adopted) == 0, f"a live cycle's reports adopted: {list(adopted.items())}"
    assert result.error is None and result.delivered == 3, result.summary()
    assert received == books.written


def test_a_one_shot_flush_without_a_lease_does_not_run(monkeypatch):
    """Nothing would vouch for it: its keys would look like a dead cycle's at once."""
    monkeypatch.setattr(storage_module, "ALLOW_OOM", "")
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    Books(client, known_apps(2))
    try:
        with Simulator(chaos_config()) as sim:
            backend = make_client(sim.url, ServiceCredentials("pk-test"), 1, 5)
            flusher = Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(report_auth_wait=0))
            fill(client)
            result = flusher.flush_once(recover=True)
            backend.close()
            calls = sim.backend.calls().get("report", 0)
            pending = client.scard("report_keys")
    finally:
        redis_server.close()
    assert result.error and StorageFull.__name__ in result.error and "no lease" in result.error, result.error
    assert calls == 0 and pending == 2


def test_a_full_redis_before_7_keeps_a_heartbeat_that_exists(monkeypatch):
    """The SET is refused, EXPIRE is not: the record keeps vouching, with what it said last."""
    monkeypatch.setattr(storage_module, "ALLOW_OOM", "")
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    try:
        beat = Heartbeat(connect(redis_server.url), 60, threading.Event())
        assert beat.beat()
        fill(client)
        client.expire(beat.key, 2)
        kept = beat.beat()
        ttl = client.ttl(beat.key)
        lease_refused = pytest.raises(StorageFull, Storage(connect(redis_server.url)).take_lease,
                                      Cycle.new(beat.id), 60)
    finally:
        redis_server.close()
    assert kept and ttl > 2, ttl
    assert lease_refused  # a new record cannot be made: the cycle runs on the heartbeat


# ---- 3. PID namespaces: a pid is only asked about where it means our process ---------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_daemon_in_another_pid_namespace_does_not_adopt_a_live_cycle(key_file, daemon_process):
    """Same host name (host networking), two PID namespaces: our pid is free in the other one."""
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    books = Books(client, known_apps(3), cached=True)
    try:
        with Simulator(chaos_config(), latency=10.0) as sim:
            owner = InProcessDaemon(redis_server.url, sim).start()
            reports_in_flight(sim)
            other = daemon_process(daemon_args(redis_server, sim, key_file), wrapper=[
                "unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])
            wait_until(lambda: other.output().count(CYCLE_DONE) >= 2, 9, what="two cycles of the other daemon")
            assert any(":1:" in k for k in client.scan_iter("xcflushd:daemon:*")), "no daemon with pid 1"
            sim.latency = 0.0  # the owner's authorize phase: quick
            result = owner.finish()
            with open(f"/proc/{other.proc.pid}/task/{other.proc.pid}/children") as fh:
                os.kill(int(fh.read().split()[0]), 15)  # the daemon, pid 1 in its namespace
            assert other.proc.wait(20) == 0, other.output()[-3000:]
            wait_quiet(sim)
            received = books.received(sim)
    finally:
        redis_server.close()
    assert "adopted" not in other.output(), other.output()[-3000:]
    assert result.delivered == 3, result.summary()
    assert received == books.written


# ---- --max-term-wait shorter than a backend call ---------------------------------------------------------

@pytest.mark.slow
def test_a_stop_waits_out_a_report_call_longer_than_max_term_wait(key_file, daemon_process):
    """Exiting with the call in flight leaves usage in Redis that the backend applies: counted twice."""
    redis_server = RedisServer()
    client = no_retry_client(redis_server.port)
    books = Books(client, known_apps(2), cached=True)
    try:
        with Simulator(chaos_config(), latency=4.0) as sim:
            daemon = daemon_process(daemon_args(redis_server, sim, key_file, frequency=600,
                                                **{"auth-ttl": 600, "backend-read-timeout": 6,
                                                   "max-term-wait": 1}))
            reports_in_flight(sim)
            daemon.proc.send_signal(15)
            assert daemon.proc.wait(20) == 0
            sim.latency = 0.0
            final = daemon_process(["flush", *daemon_args(redis_server, sim, key_file)[1:]])
            assert final.proc.wait(30) == 0, final.output()[-3000:]
            wait_quiet(sim)
            received = books.received(sim)
    finally:
        redis_server.close()
    assert received == books.written, daemon.output()[-3000:]
    assert "cycle still running" not in daemon.output()


def test_a_one_shot_flush_is_taken_for_dead_by_its_pid_only_in_its_own_pid_namespace(redis_server, r):
    """``flush:host:pid:namespace`` keeps no heartbeat: its lease says where its pid means something."""
    free_pid = next(p for p in range(os.getpid() + 10000, 1 << 22) if not os.path.exists(f"/proc/{p}"))
    owner = f"flush:{socket.gethostname()}:{free_pid}"
    elsewhere = Cycle.new(owner + ":00000000-0000-0000-0000-000000000000/pid:[1]")
    here = Cycle.new(f"{owner}:{storage_module.PID_NAMESPACE}")
    gateway = Gateway(r)
    for cycle, app in ((elsewhere, "free1"), (here, "free2")):
        creds = Credentials({"app_id": app})
        gateway.cache_report("555", creds, "hits", 3)
        member = report_key("555", creds)
        r.rename(member, "to_flush:" + member + cycle.suffix)
        r.srem("report_keys", member)
    for cycle in (elsewhere, here):
        r.set(LEASE_PREFIX + cycle.id, cycle.owner, ex=60)

    owned = Storage(connect(redis_server.url)).hand_over(Cycle.new("here:1:000000"), recover=True)

    assert [member for _, member in owned.items()] == [report_key("555", Credentials({"app_id": "free2"}))]
