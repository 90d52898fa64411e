"""The unit and its companion files, checked by systemd's own tools without booting anything."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xcflushd import defaults
from xcflushd.config import CREDENTIAL_FILES

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze not installed (Debian package systemd)")

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "xcflushd.service"
EXEC = "/opt/xcflushd/bin/xcflushd"
MAX_EXPOSURE = 2.0


def make_root(tmp: Path, unit_text: str) -> Path:
    """A throw-away --root for systemd-analyze: the unit, stand-in ExecStart and
    ExecReload binaries and the host's stock units (sysinit.target and friends)."""
    root = tmp / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for binary in (EXEC, "/bin/kill"):
        stand_in = root / binary.lstrip("/")
        stand_in.parent.mkdir(parents=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    (root / "etc/systemd/system/xcflushd.service").write_text(unit_text)
    return root


def verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                           str(root / "etc/systemd/system/xcflushd.service")],
                          capture_output=True, text=True, cwd="/", timeout=60)


def test_verify_is_silent(tmp_path, unit_text):
    proc = verify(make_root(tmp_path, unit_text))
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "")


def test_verify_check_would_catch_a_mistake(tmp_path, unit_text):
    """systemd-analyze only warns (exit 0) on unknown keys: the stderr check is what catches them."""
    broken = unit_text.replace("[Service]\n", "[Service]\nWatchDogSec=60s\n", 1)
    proc = verify(make_root(tmp_path, broken))
    assert "WatchDogSec" in proc.stderr


def test_security_exposure_at_most_2(tmp_path):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for xcflushd\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_service_contract(unit):
    service, unit_section = unit["Service"], unit["Unit"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"{EXEC} run"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # the daemon reloads on SIGHUP
    assert service["Restart"] == ["on-failure"]
    assert "WatchdogSec" in service
    assert "StartLimitBurst" in unit_section and "StartLimitIntervalSec" in unit_section
    for key in ("MemoryHigh", "MemoryMax", "LimitNOFILE", "User"):
        assert key in service, key


def test_stop_timeout_outlasts_max_term_wait(unit):
    (value,) = unit["Service"]["TimeoutStopSec"]
    seconds = subprocess.run(["systemd-analyze", "timespan", value], capture_output=True,
                             text=True, check=True).stdout
    usec = int(re.search(r"μs: (\d+)", seconds).group(1))
    assert usec / 1e6 > defaults.MAX_TERM_WAIT


def test_redis_and_network_are_soft_dependencies(unit):
    section = unit["Unit"]
    assert "Requires" not in section and "BindsTo" not in section
    after = " ".join(section["After"]).split()
    assert "network-online.target" in after and "redis-server.service" in after


def test_secrets_only_through_credentials(unit):
    service = unit["Service"]
    names = {c.split(":", 1)[0] for c in service["LoadCredential"]}
    assert names == {"provider_key", "service_tokens", "redis_password", "backend_proxy_password"}
    assert names == set(CREDENTIAL_FILES)  # every credential the daemon reads, and no other
    # Relative sources are looked up in the credential store, where a missing
    # file is skipped (an absolute missing path fails the start on systemd 252).
    assert all(not c.split(":", 1)[1].startswith("/") for c in service["LoadCredential"])
    command_line = " ".join(service["ExecStart"] + service.get("Environment", []))
    assert not re.search(r"key|token|password", command_line, re.I)


def test_sysusers_creates_the_units_user(tmp_path, unit):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSTEMD_DIR / "xcflushd.sysusers")],
                   check=True, capture_output=True, timeout=60)
    passwd = (root / "etc/passwd").read_text().splitlines()
    (user,) = unit["Service"]["User"]
    entry = next(line.split(":") for line in passwd if line.startswith(user + ":"))
    assert int(entry[2]) < 1000  # a system user
    assert entry[6] == "/usr/sbin/nologin"
    assert (root / "etc/group").read_text().startswith(unit["Service"]["Group"][0] + ":")


def test_tmpfiles_creates_a_private_credential_store(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create",
                           str(SYSTEMD_DIR / "xcflushd.tmpfiles")],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (root / "etc/credstore").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/xcflushd").stat().st_mode & 0o777 == 0o755
