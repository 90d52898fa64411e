"""The nspawn lab itself: a node boots a real systemd, runs commands, shuts down; nodes share a bridge."""

import time

import pytest
from lab import nspawn

pytestmark = pytest.mark.lab


def test_node_boots_runs_commands_and_stops(lab_root):
    started = time.monotonic()
    with nspawn.Node(lab_root) as node:
        assert node.system_state in ("running", "degraded")
        assert nspawn._comm(node.leader) == "systemd"
        assert node.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
        node.write("/etc/lab-probe/hello.txt", "hi\n", mode=0o600)
        out = node.run(["stat", "-c", "%a %U %s", "/etc/lab-probe/hello.txt"]).stdout.split()
        assert out == ["600", "root", "3"]
        assert node.run(["false"], check=False).returncode == 1
        assert node.show("redis-server.service", "ActiveState")["ActiveState"] == "active"
        proc = node.proc
    assert proc.returncode is not None  # powered off, nspawn gone
    assert time.monotonic() - started < 30
    # ephemeral: the cached root never sees what the node wrote
    assert not (lab_root / "etc/lab-probe").exists()


def test_nodes_on_a_bridge_reach_each_other_and_nothing_else(lab_root):
    server_code = ("import socket; s = socket.create_server(('0.0.0.0', 7777)); c, _ = s.accept();"
                   " c.sendall(socket.gethostname().encode()); c.close()")
    with nspawn.Network(subnet="10.213.0.0/24") as net, \
            nspawn.Node(lab_root, network=net) as a, nspawn.Node(lab_root, network=net) as b:
        assert a.address == "10.213.0.2/24" and b.address == "10.213.0.3/24"
        a.run(["systemd-run", "--unit=probe-server", "python3", "-c", server_code])
        client = ("import socket, sys, time\n"
                  "for _ in range(50):\n"
                  "    try:\n"
                  "        c = socket.create_connection(('10.213.0.2', 7777), timeout=2); break\n"
                  "    except OSError: time.sleep(0.1)\n"
                  "print(c.recv(100).decode())\n")
        assert b.run(["python3", "-c", client]).stdout.strip() == a.name
        routes = b.run(["ip", "route"]).stdout
        assert "default" not in routes  # no way out of the namespace
