"""Issue 24's scenario, end to end: `python tests/bench/outage_scenario.py strict|resilient|allow`.

A daemon (`--frequency 2 --auth-ttl 6`) beside a simulated gateway sending requests for 20
applications; the backend (the simulator) is killed for 20 s, then started again on the same
port. Prints how many applications the gateway still served at the end of the outage, what a
new application got, and the hits written against the hits delivered. About 35 s.
"""

import copy
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xcftest import DEMO_CONFIG, DaemonProcess, RedisServer, free_port  # noqa: E402

from xcflushd.keys import Credentials  # noqa: E402
from xcflushd.storage import connect  # noqa: E402
from xcflushd_sim.gateway import Gateway  # noqa: E402
from xcflushd_sim.server import Simulator  # noqa: E402


def main(mode: str) -> None:
    config = copy.deepcopy(DEMO_CONFIG)
    config["services"][0]["applications"] += [{"app_id": f"app{i}", "plan": "free"} for i in range(21)]
    port = free_port()
    server = RedisServer()
    before = Simulator(config, port=port).start()
    client = connect(server.url)
    gateway = Gateway(client)
    key_file = tempfile.NamedTemporaryFile("w", suffix=".pk", delete=False)
    key_file.write("pk-test\n")
    key_file.close()
    daemon = DaemonProcess(["run", "--redis", server.address, "--backend", before.url, "-c", "/dev/null",
                            "--provider-key-file", key_file.name, "--frequency", "2", "--auth-ttl", "6",
                            "--report-auth-wait", "0", "--backend-outage", mode, "--max-stale", "60"])
    daemon.wait_for("ready:")
    apps = [Credentials({"app_id": f"app{i}"}) for i in range(20)]
    last = {}
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            for creds in apps:
                last[creds.get("app_id")] = gateway.request("555", creds, "hits")
            time.sleep(0.05)

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(5)
    before.stop()
    time.sleep(12)  # twice the auth TTL into the outage
    new = gateway.request("555", Credentials({"app_id": "app20"}), "hits")
    time.sleep(8)
    served = sum(1 for outcome in last.values() if outcome == "allowed")
    after = Simulator(config, port=port).start()
    time.sleep(8)
    stop.set()
    thread.join()
    time.sleep(3)
    daemon.stop()
    written = sum(gateway.written.values())
    delivered = sum(app.get("hits", 0) for sim in (before, after)
                    for app in sim.backend.received().get("555", {}).values())
    left = sum(int(v) for pattern in ("report,*", "to_flush:*") for k in client.keys(pattern) for v in client.hvals(k))
    print(f"--backend-outage {mode}: applications served at the end of a 20 s outage: {served} of 20; "
          f"a new application during it: {new}; hits written {written}, delivered {delivered}, "
          f"left in Redis {left}")
    for line in daemon.output().splitlines():
        if "backend outage" in line:
            print("  " + line[:200])
    after.stop()
    server.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resilient")
