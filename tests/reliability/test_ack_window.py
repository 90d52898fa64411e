"""Decision 6, the instant between the backend's 202 and the DEL, made exact.

The chaos suite hits that instant by chance; these tests put the daemon in it
on purpose. ``CLIENT PAUSE WRITE`` holds the daemon's DEL of its ``to_flush:``
key inside Redis after the backend has applied the report: a SIGKILL there is
the one way to count usage twice, and it duplicates exactly that report; a
Redis outage there must not.
"""

import pytest
from chaoslib import (
    chaos_apps,
    chaos_config,
    kill_daemon_connections,
    ledger_by_key,
    no_retry_client,
    usage_in_redis,
    wait_until,
)
from xcftest import DEMO_CONFIG, RedisServer

from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
FREE1 = Credentials({"app_id": "free1"})


@pytest.fixture
def own_redis():
    server = RedisServer(persistent=True)
    yield server
    server.close()


@pytest.fixture
def slow_sim():
    """Every call takes 0.5 s: time to act while a report is in flight."""
    with Simulator(DEMO_CONFIG, latency=0.5) as simulator:
        yield simulator


def daemon_holding_del(client) -> bool:
    return any(c.get("name") == "xcflushd" and c.get("cmd") == "del" and "b" in c.get("flags", "")
               for c in client.client_list())


def flush_args(tmp_path, redis_server, sim):
    key_file = tmp_path / "pk"
    key_file.write_text("pk-test\n")
    return ["flush", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file", str(key_file),
            "-c", "/dev/null", "--report-auth-wait", "0"]


def received_hits(sim, app):
    return sim.backend.received().get("555", {}).get(app, {}).get("hits", 0)


def test_sigkill_between_202_and_delete_duplicates_exactly_that_report(tmp_path, own_redis, slow_sim,
                                                                        daemon_process):
    client = no_retry_client(own_redis.port)
    gateway = Gateway(client)
    gateway.cache_report("555", A1, "hits", 5)
    args = flush_args(tmp_path, own_redis, slow_sim)
    daemon = daemon_process(args)
    wait_until(lambda: slow_sim.backend.calls()["report"] >= 1, 20, what="the report call")
    client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    try:
        wait_until(lambda: daemon_holding_del(client), 10, what="the daemon's DEL to wait in Redis")
        assert received_hits(slow_sim, "a1b2c3") == 5  # the backend has it, and said 202
        daemon.kill()
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
    usage, _ = usage_in_redis(client)
    assert sum(usage.values()) == 5, "the usage must still be in Redis: nothing acknowledged it"

    for lease in client.scan_iter("xcflushd:lease:*"):  # its process is dead, as after LEASE_TTL
        client.delete(lease)
    again = daemon_process(args)
    assert again.proc.wait(30) == 0, again.output()
    assert received_hits(slow_sim, "a1b2c3") == 10  # counted twice: exactly the report in the window
    assert usage_in_redis(client)[0] == {}


def test_redis_outage_between_202_and_delete_makes_no_duplicate(tmp_path, own_redis, slow_sim, daemon_process):
    client = no_retry_client(own_redis.port)
    Gateway(client).cache_report("555", FREE1, "hits", 7)
    daemon = daemon_process(flush_args(tmp_path, own_redis, slow_sim))
    wait_until(lambda: slow_sim.backend.calls()["report"] >= 1, 20, what="the report call")
    client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    try:
        wait_until(lambda: daemon_holding_del(client), 10, what="the daemon's DEL to wait in Redis")
        assert received_hits(slow_sim, "free1") == 7
        assert kill_daemon_connections(client) >= 1  # Redis drops the connection under the DEL
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
    assert daemon.proc.wait(30) == 0, daemon.output()
    assert usage_in_redis(client)[0] == {}, "acknowledged usage stayed in Redis: it would be sent again"
    assert "redis: ConnectionError" in daemon.output() and "retrying for up to" in daemon.output()


def test_redis_stall_during_the_report_phase_makes_no_duplicate(tmp_path, own_redis, daemon_process):
    """Redis stops answering writes for longer than the backend read timeout while
    report calls are in flight: answers that arrived meanwhile are answers, not timeouts."""
    apps = [a for a in chaos_apps() if a.known]
    with Simulator(chaos_config(), latency=0.1) as sim:
        client = no_retry_client(own_redis.port)
        gateway = Gateway(client)
        for app in apps:
            gateway.cache_report(app.service_id, app.creds, app.metrics[0], 3)
        # One call per application (no batch), so that eight are in flight at once.
        args = flush_args(tmp_path, own_redis, sim) + ["--threads", "8", "--backend-read-timeout", "1",
                                                       "--report-batch-size", "1"]
        daemon = daemon_process(args)
        wait_until(lambda: sim.backend.calls()["report"] >= 8, 20, what="report calls in flight")
        client.execute_command("CLIENT", "PAUSE", "2500", "WRITE")  # ends by itself
        daemon.proc.wait(60)
        for lease in client.scan_iter("xcflushd:lease:*"):
            client.delete(lease)
        again = daemon_process(args)
        assert again.proc.wait(60) == 0, again.output()
        received = ledger_by_key(sim.backend.received(), apps)
    assert usage_in_redis(client)[0] == {}
    written = {(k, m): n for (_, k, m), n in gateway.written.items()}
    duplicated = {k: received[k] - n for k, n in written.items() if received[k] != n}
    assert duplicated == {}, f"usage counted twice after a Redis stall:\n{daemon.output()[-2000:]}"
