"""Backend answers that are not the API's: rejected as a failed call, with bounded
memory, on both paths (the priority path's blocking call, the flush cycle's
multiplexed calls). The simulator serves its fault kinds; a raw socket server
here serves what no well-meaning server would (endless bodies, endless
headers, a body trickled a byte at a time).

Nothing here asserts speed: a bound of several read timeouts only says that a
call ends at all.
"""

import threading
import tracemalloc

import pytest
from rawserver import RawServer

from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.errors import BackendError
from xcflushd.keys import Credentials

A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
READ_TIMEOUT = 1.0
MEMORY_BOUND = 8 << 20  # MAX_RESPONSE_BYTES is 1 MiB; a 64 MiB answer must not be held


def measured(call, bound: float):
    """Run ``call`` in a thread; (outcome or exception, peak bytes allocated by Python).

    A call still running after ``bound`` seconds fails the test: it would hold
    a flush cycle or a priority worker as long as the server pleases.
    """
    box = {}

    def run():
        try:
            box["outcome"] = call()
        except BackendError as exc:
            box["outcome"] = exc

    tracemalloc.start()
    try:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(bound)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not worker.is_alive(), f"the call was still running after {bound}s"
    return box["outcome"], peak


def both_paths(url):
    client = make_client(url, ServiceCredentials("pk-test"), 2, READ_TIMEOUT)
    yield "blocking", lambda: client.authorize("555", A1)
    yield "multiplexed", lambda: [o for _, o in client.authorize_many([(0, "555", A1)], 4)][0]
    client.close()


# (A huge answer is the raw server's below: this simulator runs in the test's process and
# builds its 64 MiB body there, which tracemalloc would count.)
@pytest.mark.parametrize("kind", ["xml_bomb", "garbage", "truncated", "wrong_content_type", "503_html",
                                  "500", "empty_4xx", "reset", "timeout"])
def test_simulated_faults_are_failed_calls(sim, kind):
    sim.backend.set_faults({"rate": 1.0, "kinds": [kind], "endpoints": ["authorize"], "timeout_s": 3.0})
    for path, call in both_paths(sim.url):
        outcome, peak = measured(call, 10 * READ_TIMEOUT)
        assert isinstance(outcome, BackendError), (path, outcome)
        assert peak < MEMORY_BOUND, f"{path}: {peak} bytes held for a {kind} answer"


def hostile_server(serve) -> RawServer:
    """Answers each connection, once its request has arrived, with ``serve(conn, stopping)``."""
    def handle(conn, stopping):
        conn.recv(65536)
        serve(conn, stopping)
    return RawServer(handle)


def endless(head: bytes, piece: bytes, pause: float = 0.0):
    def serve(conn, stop):
        conn.sendall(head)
        while not stop.is_set():
            conn.sendall(piece)
            if pause:
                stop.wait(pause)
    return serve


XML = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.3scale-v2.0+xml\r\n"
HOSTILE = {
    "endless chunked body": endless(XML + b"Transfer-Encoding: chunked\r\n\r\n",
                                    b"10000\r\n" + b"x" * 0x10000 + b"\r\n"),
    "endless body until close": endless(XML + b"Connection: close\r\n\r\n", b"<" * 65536),
    "endless headers": endless(b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"y" * 1000 + b"\r\n"),
    "one endless header line": endless(b"HTTP/1.1 200 OK\r\nX-Filler: ", b"y" * 65536),
    "endless status line": endless(b"HTTP/1.1 200 ", b"O" * 65536),
    "a 64 MiB answer": endless(XML + b"Content-Length: 67108864\r\n\r\n", b"<" * 65536),
    "lying Content-Length": endless(XML + b"Content-Length: 99999999999999999999\r\n\r\n", b"z" * 65536),
    "body trickled a byte at a time": endless(XML + b"Content-Length: 100000\r\n\r\n", b"<", pause=0.2),
    "headers trickled a byte at a time": endless(b"HTTP/1.1 200 OK\r\n", b"X", pause=0.2),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_servers_are_failed_calls(name):
    server = hostile_server(HOSTILE[name])
    try:
        for path, call in both_paths(server.url):
            outcome, peak = measured(call, 10 * READ_TIMEOUT)
            assert isinstance(outcome, BackendError), (path, outcome)
            assert peak < MEMORY_BOUND, f"{path}: {peak} bytes held"
    finally:
        server.close()
