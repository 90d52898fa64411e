"""The release wheel, as ``make dist`` builds it, holds the daemon and nothing else: the
``xcflushd`` package's modules, its metadata and one console script. The simulator is a
distribution of its own (sim/) and never reaches a gateway node."""

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METADATA = {"METADATA", "WHEEL", "entry_points.txt", "top_level.txt", "RECORD"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    venv = Path(sys.prefix)
    # This interpreter's venv, never reinstalled by the build (-o), as make reproduce does.
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "dist", f"DIST_DIR={dist}",
                           f"VENV={venv}", f"PY={sys.executable}", f"--old-file={venv}/.installed"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = dist.glob("xcflushd-*-py3-none-any.whl")
    with zipfile.ZipFile(path) as zf:
        yield {name: zf.read(name) for name in zf.namelist()}


def test_the_wheel_holds_the_daemon_package_and_its_metadata_only(wheel):
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "xcflushd").rglob("*.py")}
    package = {n for n in wheel if not n.split("/", 1)[0].endswith(".dist-info")}
    assert package == modules
    assert not [n for n in wheel if n.startswith(("xcflushd/sim/", "xcflushd_sim/"))], "the simulator is in the wheel"
    info = {n.split("/", 1)[1] for n in wheel if n.split("/", 1)[0].endswith(".dist-info")}
    assert info == METADATA
    top_level = next(v for n, v in wheel.items() if n.endswith(".dist-info/top_level.txt"))
    assert top_level.decode().split() == ["xcflushd"]


def test_the_wheel_installs_one_console_script(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(next(v for n, v in wheel.items() if n.endswith(".dist-info/entry_points.txt")).decode())
    assert entry_points.sections() == ["console_scripts"]
    assert dict(entry_points["console_scripts"]) == {"xcflushd": "xcflushd.cli:main"}
