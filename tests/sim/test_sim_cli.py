"""``xcflushd-backend-sim``: one-line errors with exit 2, serving, clean stop on signals."""

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from xcflushd_sim.cli import main

from .helpers import spec_config

SCRIPT = Path(sys.executable).parent / "xcflushd-backend-sim"


@pytest.mark.parametrize("argv", [
    ["--nope"],
    ["--listen", "8081"],
    ["--listen", "127.0.0.1:99999"],
    ["--latency-ms", "-5"],
    ["--fault-rate", "2"],
    ["--fault-rate", "x"],
    ["--fault-kinds", "500,bogus"],
    ["--demo-apps", "x"],
    ["--config", "/nonexistent/sim.json"],
    ["extra-positional"],
])
def test_bad_flags_give_one_line_and_exit_2(capsys, argv):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("xcflushd-backend-sim: error: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("content", ["{not json", json.dumps({"services": []}),
                                     json.dumps({"services": [{"id": "1", "plans": {"p": {
                                         "hits": {"day": 1}}}}]})])
def test_bad_config_file_gives_one_line_and_exit_2(capsys, tmp_path, content):
    path = tmp_path / "sim.json"
    path.write_text(content)
    assert main(["--config", str(path)]) == 2
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def start(args):
    proc = subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.fullmatch(r"xcflushd-backend-sim listening on (http://127\.0\.0\.1:\d+)\n", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, match.group(1)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serves_config_and_stops_cleanly_on_signal(tmp_path, stop_signal):
    path = tmp_path / "sim.json"
    path.write_text(json.dumps(spec_config()))
    proc, url = start(["--listen", "127.0.0.1:0", "--config", str(path)])
    try:
        r = requests.get(f"{url}/transactions/authorize.xml?app_id=a1b2c3&app_key=s3cr3t"
                         "&provider_key=pk123")
        assert r.status_code == 200
    finally:
        proc.send_signal(stop_signal)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in err


def test_demo_config_and_faults_from_flags():
    proc, url = start(["--listen", "127.0.0.1:0", "--demo-apps", "4", "--fault-rate", "1",
                       "--fault-kinds", "500", "--fault-seed", "3"])
    try:
        r = requests.get(f"{url}/transactions/authorize.xml?app_id=app-0&app_key=key-0"
                         "&provider_key=pk-demo")
        assert r.status_code == 500
        faults = requests.get(f"{url}/_sim/faults").json()
        assert (faults["rate"], faults["kinds"], faults["seed"]) == (1.0, ["500"], 3)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_port_in_use_is_one_line_exit_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([str(SCRIPT), "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert "cannot listen" in proc.stderr
