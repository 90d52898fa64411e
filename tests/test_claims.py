"""Several daemons on one Redis: each priority request is answered by one of them,
with one backend call and one publish (a claim in Redis); losing one leaves the
others answering. Real redis-server, simulator and pub/sub; outcomes, not timings."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis as redislib
from xcftest import DEMO_CONFIG, Stream, wait_until

from xcflushd.defaults import CLAIM_PREFIX
from xcflushd.keys import Credentials
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})


class Published:
    """Counts every answer published on any response channel."""

    def __init__(self, r):
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("xc_channel_auth_response:*")
        self.count = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            if self.pubsub.get_message(timeout=0.1):
                self.count += 1

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.pubsub.close()


def test_two_daemons_make_one_call_and_one_publish_per_distinct_request(sim, r, renewer_for):
    first, second = renewer_for(sim.url), renewer_for(sim.url)
    assert first.owner != second.owner
    published = Published(r)
    gateway = Gateway(r)
    n = 60
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: gateway.priority_authorization("555", Credentials({"app_id": f"d{i}"}),
                                                                         "hits"), range(n)))
    assert answers == ["0:application_not_found"] * n
    wait_until(lambda: published.count >= n, 5, "every answer counted")
    time.sleep(0.3)  # a second publish, were there one, would come from the same round of calls
    published.close()
    assert sim.backend.calls()["authorize"] == n
    assert published.count == n
    # Each request claimed by one of the two, for a few seconds: a daemon that reads it late skips it.
    holders = [r.get(key) for key in r.scan_iter(match=CLAIM_PREFIX + "*")]
    assert len(holders) == n and set(holders) <= {first.owner, second.owner}


def test_identical_concurrent_requests_to_two_daemons_make_one_call(redis_server, r, renewer_for):
    with Simulator(DEMO_CONFIG, latency=0.5).start() as slow:
        renewer_for(slow.url), renewer_for(slow.url)
        barrier = threading.Barrier(30)

        def ask(_):
            barrier.wait()
            client = redislib.Redis(port=redis_server.port, decode_responses=True)
            try:
                return Gateway(client).priority_authorization("555", A1, "hits")
            finally:
                client.close()

        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(ask, range(30)))
        assert answers == ["1"] * 30
        assert slow.backend.calls()["authorize"] == 1


def test_a_claim_held_by_a_dead_daemon_lapses(sim, r, renewer_for):
    renewer_for(sim.url)
    message = "service_id:555,app_id:a1b2c3,app_key:s3cr3t,metric:hits"
    r.set(CLAIM_PREFIX + message, "a-daemon-killed-mid-call", px=300)
    gateway = Gateway(r, priority_timeout=0.2)
    assert gateway.priority_authorization("555", A1, "hits") is None  # another daemon's to answer
    wait_until(lambda: not r.exists(CLAIM_PREFIX + message), 5, "the claim to lapse")
    assert Gateway(r).priority_authorization("555", A1, "hits") == "1"


def test_killing_one_of_two_daemons_leaves_every_later_request_answered(
        tmp_path, r, redis_server, sim, daemon_process):
    key = tmp_path / "pk"
    key.write_text("pk-test\n")
    args = ["run", "--redis", redis_server.address, "--backend", sim.url, "--provider-key-file", str(key),
            "-c", "/dev/null", "--frequency", "60"]
    doomed, survivor = daemon_process(args), daemon_process(args)
    doomed.wait_for("ready:")
    survivor.wait_for("ready:")
    with Stream(redislib.Redis(port=redis_server.port, decode_responses=True), workers=4) as stream:
        wait_until(lambda: stream.count() >= 40, 30, "answers from the pair")
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        killed = time.monotonic()
        asked = stream.count()
        wait_until(lambda: stream.count() >= asked + 40, 30, "answers after the kill")
    after = [answer for at, answer in stream.asked if at > killed]
    assert len(after) >= 30
    assert after == ["0:application_not_found"] * len(after)
    assert survivor.proc.poll() is None


def test_a_claim_is_ours_again_when_re_sent_and_never_another_daemons(r):
    """A claim re-sent after a lost reply (the retry policy) finds its own claim: still ours."""
    from xcflushd.storage import Storage

    storage = Storage(r)
    assert storage.claim(["m1", "m2"], "daemon-a", 3000) == [True, True]
    assert storage.claim(["m1", "m3"], "daemon-a", 3000) == [True, True]
    assert storage.claim(["m1", "m2", "m3", "m4"], "daemon-b", 3000) == [False, False, False, True]
    assert 0 < r.pttl(CLAIM_PREFIX + "m1") <= 3000
