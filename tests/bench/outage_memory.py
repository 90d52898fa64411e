"""Redis memory through a long backend outage: `python tests/bench/outage_memory.py [APPLICATIONS]`.

The simulator answers 503 to every call; each of 10 cycles the gateway adds 10 hits per
application and the daemon's cycle fails and puts the reports back. Prints, per cycle, the
hits written, the keys in Redis and Redis' used memory over an empty one: it grows with
applications, not with hits (HINCRBY into one hash per application).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xcftest import DEMO_CONFIG, RedisServer  # noqa: E402

from xcflushd.backend import ServiceCredentials, make_client  # noqa: E402
from xcflushd.flusher import Flusher, FlushSettings  # noqa: E402
from xcflushd.outage import OutageTracker  # noqa: E402
from xcflushd.storage import Storage, connect  # noqa: E402
from xcflushd_sim.server import Simulator  # noqa: E402


def main(applications: int) -> None:
    server = RedisServer()
    sim = Simulator(DEMO_CONFIG, faults={"rate": 1.0, "kinds": ["503_html"]}).start()
    client = connect(server.url)
    tracker = OutageTracker("resilient", 3600)
    backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
    backend.observer = tracker.observe
    flusher = Flusher(Storage(connect(server.url)), backend, FlushSettings(auth_ttl=600, report_auth_wait=0),
                      outage=tracker)
    keys = [f"report,service_id:555,app_id:app{i}" for i in range(applications)]
    empty = client.info("memory")["used_memory"]
    hits = 0
    for cycle in range(1, 11):
        pipe = client.pipeline(transaction=False)
        for key in keys:
            for _ in range(10):
                pipe.hincrby(key, "hits", 1)
            pipe.sadd("report_keys", key)
        pipe.execute()
        hits += 10 * applications
        result = flusher.flush_once()
        print(f"cycle {cycle:2}: hits written {hits:>8}, keys {client.dbsize():>6}, used memory over empty "
              f"{(client.info('memory')['used_memory'] - empty) / 1024:.0f} KiB, reports kept {result.failed}")
    backend.close()
    sim.stop()
    server.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
