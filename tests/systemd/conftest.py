"""Fixtures for the systemd tests: the unit files, a notify socket, the nspawn lab."""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "xcflushd.service"

if str(TESTS) not in sys.path:  # makes `lab` (tests/lab) importable
    sys.path.insert(0, str(TESTS))

from lab.notifysock import NotifyListener  # noqa: E402
from lab.units import parse_unit  # noqa: E402


@pytest.fixture(scope="session")
def unit_text() -> str:
    return UNIT.read_text()


@pytest.fixture(scope="session")
def unit(unit_text) -> dict:
    return parse_unit(unit_text)


@pytest.fixture
def notify_socket(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


#: What an xcflushd node needs besides systemd and python3.
NODE_PACKAGES = ("python3-venv", "redis-server", "iproute2", "procps")


@pytest.fixture(scope="session")
def lab_root():
    """A cached bootable Debian root for xcflushd nodes (built on first use, ~1-2 min).

    Skips, saying why, where this machine cannot boot systemd-nspawn containers.
    """
    from lab import nspawn

    why = nspawn.unavailable()
    if why:
        pytest.skip(f"cannot boot a systemd-nspawn node here: {why}")
    root = nspawn.ensure_root(NODE_PACKAGES)
    probe = nspawn.Node(root)
    try:
        probe.start(timeout=60)
    except nspawn.LabError as exc:
        pytest.skip(f"systemd-nspawn could not boot a node on this machine: {exc}")
    finally:
        probe.stop()
    return root
