"""Fixtures for the Ansible tests: the tools, signed releases, and a fleet of three nodes.

The fleet is real: three systemd-nspawn nodes (tests/lab) on a bridge in a network
namespace of our own, each running sshd. ansible-playbook runs inside that namespace and
reaches the nodes over SSH as an operator's would; the backend simulator listens on the
bridge's address, so all traffic stays in the namespace. Releases are built from this
checkout (the wheel and its dependency wheels, as the nodes' Python needs them) and signed
with a throw-away key by the project's own signing tool; the play is pointed at that key.
"""

import importlib.util
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent

if str(TESTS) not in sys.path:  # makes `lab` (tests/lab) importable
    sys.path.insert(0, str(TESTS))

#: What a gateway node has before Ansible comes: sshd, sudo and what the roles' package tasks
#: find already installed (the nodes have no network: apt could not fetch anything).
NODE_PACKAGES = ("iproute2", "openssh-server", "procps", "python3-apt", "python3-venv",
                 "redis-server", "sudo")

SIM_PORT = 8081
#: A comment only the unit of the second test release has: which release a node's unit came from.
RELEASE2_UNIT_MARK = "# e2e: the unit of release 2"


def tool(name: str) -> str:
    """A command of the test virtualenv (ansible-playbook, ansible-lint), or fail."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make install` installs the test extras")
    return found


def ansible_env(home: Path) -> Dict[str, str]:
    """Environment for ansible commands: nothing read from or written to ~/.ansible."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "HOME": str(home),
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_HOME": str(home / ".ansible"),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "TMPDIR": str(home / "tmp"),  # where the play's staging copy of the release goes
        "ANSIBLE_NOCOLOR": "1",
        # The slowest tasks, listed after the recap in every play log.
        "ANSIBLE_CALLBACK_PLUGINS": str(Path(__file__).parent / "callback_plugins"),
        "ANSIBLE_CALLBACKS_ENABLED": "tasktime",
        "ANSIBLE_FORCE_COLOR": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("GNUPGHOME", None)
    return env


# --------------------------------------------------------------------------- signing


def _signing_helpers():
    """make_key/drop_key from the signing tests (a throw-away release key, as real ones are)."""
    spec = importlib.util.spec_from_file_location("_signing_test_keys", TESTS / "signing" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def throwaway_key():
    """A certify-only primary with a signing subkey, in a private home under /tmp."""
    helpers = _signing_helpers()
    key = helpers.make_key("Deploy Test")
    yield key
    helpers.drop_key(key)


def sign_release(directory: Path, key) -> None:
    """SHA256SUMS over every wheel and systemd file in ``directory`` and its detached
    signature, by our tool."""
    artifacts = sorted(str(p) for p in [*directory.glob("*.whl"), *directory.glob("xcflushd.*")])
    cmd = [sys.executable, "-m", "signing", "sign", "--key-id", key.primary,
           "--secret-key-file", key.secret_file, "--sums", str(directory / "SHA256SUMS"),
           "--sums-signature", str(directory / "SHA256SUMS.asc"),
           *(f"--artifact={a}" for a in artifacts)]
    env = {k: v for k, v in os.environ.items() if k != "GNUPGHOME"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"signing failed:\n{proc.stdout}\n{proc.stderr}"


@dataclass(frozen=True)
class Release:
    """A signed release directory."""

    dir: Path
    version: str

    @property
    def wheel(self) -> Path:
        return self.dir / f"xcflushd-{self.version}-py3-none-any.whl"

    def extra_vars(self) -> List[str]:
        return ["-e", f"xcflushd_release_dir={self.dir}", "-e", f"xcflushd_version={self.version}"]


def _project_copy(dest: Path, version: str) -> None:
    """This checkout's package, with another version string (a "next release")."""
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "xcflushd", dest / "xcflushd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    init = dest / "xcflushd" / "__init__.py"
    text, count = re.subn(r'^__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text(),
                          flags=re.M)
    assert count == 1, "xcflushd/__init__.py has no __version__ line"
    init.write_text(text)


@pytest.fixture(scope="session")
def releases(deploy_root, throwaway_key, tmp_path_factory) -> List[Release]:
    """Two signed releases of this code, as two versions: every wheel the nodes install --
    xcflushd and its dependencies, resolved by the node root's own interpreter (cached in the
    lab cache) -- signed together (the role installs them with pip --require-hashes)."""
    from lab.wheels import build_wheels

    import xcflushd

    base = tmp_path_factory.mktemp("releases")
    wheels = build_wheels(REPO, base / "wheels", root=deploy_root)
    next_src = base / "next-src"
    next_src.mkdir()
    _project_copy(next_src, f"{xcflushd.__version__}+e2e.next")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "-w", str(base / "next-wheel"), str(next_src)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (first_wheel,) = wheels.glob("project/*.whl")
    (next_wheel,) = (base / "next-wheel").glob("*.whl")
    deps = sorted(wheels.glob("deps/*.whl"))

    first = Release(base / "release1", xcflushd.__version__)
    first.dir.mkdir()
    systemd_files = [REPO / "systemd" / f"xcflushd.{kind}" for kind in ("service", "sysusers", "tmpfiles")]
    for whl in [first_wheel, *deps, *systemd_files]:
        shutil.copy(whl, first.dir / whl.name)
    sign_release(first.dir, throwaway_key)

    second = Release(base / "release2", next_wheel.name.split("-")[1])
    second.dir.mkdir()
    for whl in [next_wheel, *deps, *systemd_files]:
        shutil.copy(whl, second.dir / whl.name)
    with open(second.dir / "xcflushd.service", "a") as unit:  # release 2's unit is its own
        unit.write(f"\n{RELEASE2_UNIT_MARK}\n")
    sign_release(second.dir, throwaway_key)
    assert first.wheel.exists() and second.wheel.exists() and second.version != first.version
    return [first, second]


# --------------------------------------------------------------------------- collection


def build_collection(out: Path) -> Path:
    """``make collection`` into ``out``; returns the tarball."""
    proc = subprocess.run(["make", "-s", "collection", f"COLLECTION_STAGE={out / 'stage'}",
                           f"COLLECTION_OUT={out}", f"ANSIBLE_GALAXY={tool('ansible-galaxy')}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tarball,) = out.glob("threescale-xcflushd-*.tar.gz")
    return tarball


@pytest.fixture(scope="session")
def installed_collection(tmp_path_factory) -> Path:
    """The collection built from this checkout and installed with ansible-galaxy elsewhere;
    returns the collections path."""
    work = tmp_path_factory.mktemp("collection")
    tarball = build_collection(work / "build")
    target = work / "collections"
    proc = subprocess.run([tool("ansible-galaxy"), "collection", "install", "--offline", "-p", str(target),
                           str(tarball)], cwd=work, capture_output=True, text=True, timeout=120,
                          env=ansible_env(work / "home"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


# --------------------------------------------------------------------------- nodes


@pytest.fixture(scope="session")
def deploy_root():
    """The cached bootable root for gateway nodes (built once, ~2 min); skips where impossible."""
    from lab import nspawn

    if not shutil.which("ssh"):
        pytest.skip("no ssh client (Debian package openssh-client; `make deps` installs it)")
    return nspawn.root_or_skip(NODE_PACKAGES)


@dataclass
class PlayResult:
    returncode: int
    output: str
    recap: Dict[str, Dict[str, int]]
    seconds: float
    log: Path

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]


_RECAP = re.compile(r"^(\S+)\s*:\s*((?:\w+=\d+\s*)+)$", re.M)


def parse_recap(output: str) -> Dict[str, Dict[str, int]]:
    """PLAY RECAP lines as {host: {ok: N, changed: N, failed: N, ...}}."""
    _, _, tail = output.rpartition("PLAY RECAP")
    recap = {}
    for host, counts in _RECAP.findall(tail):
        recap[host] = {k: int(v) for k, v in (c.split("=") for c in counts.split())}
    return recap


@dataclass
class Fleet:
    """Three booted gateway nodes, the walk-through's inventory for them (made by its own
    commands, vault included), and a way to run site.yml."""

    nodes: list
    network: object
    inventory: Path
    workdir: Path
    sim_url: str
    ssh_control_dir: Path
    session: object  # walkthrough.Session: the operator's shell, HOME = workdir/home
    runs: List[PlayResult] = field(default_factory=list)

    @property
    def deployment(self) -> Path:
        """The operator's ~/xcflushd (inventory/, releases/<version>/)."""
        return self.workdir / "home" / "xcflushd"

    def place(self, release: Release) -> Path:
        """Put ``release`` where the walk-through keeps it: releases/<version>/."""
        target = self.deployment / "releases" / release.version
        if not target.exists():
            shutil.copytree(release.dir, target)
        return target

    def walk(self, name: str, values: Optional[Dict[str, str]] = None, collections: Optional[Path] = None,
             stdin_extra: str = "") -> PlayResult:
        """Run the walk-through's sh block ``name``; a play's output and recap as a PlayResult.
        With ``collections``: from outside the checkout, without its ansible.cfg."""
        session = self.session
        saved = (session.cwd, dict(session.env))
        if collections:
            session.cwd = self.workdir
            (self.workdir / "ansible.cfg").write_text("[defaults]\n")
            session.env.update(ANSIBLE_CONFIG=str(self.workdir / "ansible.cfg"),
                               ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_PIPELINING="1")
        started = time.monotonic()
        try:
            procs = session.run(name, values, stdin_extra=stdin_extra)
        finally:
            if collections:
                session.cwd, session.env = saved
        seconds = time.monotonic() - started
        output = "".join(p.stdout for p in procs)
        log = self.workdir / f"play-{len(self.runs) + 1}-{name}.log"
        log.write_text("".join(session.log[-len(procs):]) + f"\nafter {seconds:.1f}s\n")
        result = PlayResult(procs[-1].returncode if procs else 0, output, parse_recap(output), seconds, log)
        self.runs.append(result)
        return result

    @property
    def hosts(self) -> List[str]:
        return [f"gw{i + 1}" for i in range(len(self.nodes))]

    def staging_left(self) -> List[str]:
        """Staging copies of a release the play left on the controller (none, normally)."""
        return sorted(p.name for p in (self.workdir / "home" / "tmp").glob("*.xcflushd-release"))

    def play(self, *args: str, release: Optional[Release] = None, timeout: float = 300,
             collections: Optional[Path] = None) -> PlayResult:
        """``ansible-playbook -i <inventory> site.yml ARGS`` inside the fleet's namespace; with
        ``collections`` (an installed collections path), the collection's playbook instead, run
        from outside the checkout without its ansible.cfg."""
        extra = release.extra_vars() if release else []
        playbook = "threescale.xcflushd.site" if collections else str(ANSIBLE_DIR / "site.yml")
        cmd = ["nsenter", f"--net={self.network.netns_path}", tool("ansible-playbook"),
               "-i", str(self.inventory), playbook, "--vault-password-file", str(self.workdir / "vault-pass"),
               *extra, *args]
        log = self.workdir / f"play-{len(self.runs) + 1}.log"
        started = time.monotonic()
        env = dict(ansible_env(self.workdir / "home"), ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.ssh_control_dir))
        cwd = ANSIBLE_DIR
        if collections:
            cwd = self.workdir
            (self.workdir / "ansible.cfg").write_text("[defaults]\n")  # nothing of the checkout's
            env.update(ANSIBLE_CONFIG=str(self.workdir / "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=str(collections),
                       ANSIBLE_PIPELINING="1")
        proc = subprocess.run(cmd, cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        seconds = time.monotonic() - started
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\nexit status {proc.returncode} after {seconds:.1f}s\n")
        result = PlayResult(proc.returncode, proc.stdout, parse_recap(proc.stdout), seconds, log)
        self.runs.append(result)
        return result


#: The walk-through's hosts.yml, with what this lab needs: the nodes' addresses and SSH, and
#: (host vars beat every group_vars file) the simulator as backend and short cycles.
INVENTORY = """\
all:
  children:
    gateways:
      hosts:
{hosts}
      vars:
        ansible_user: root
        ansible_ssh_private_key_file: {key}
        ansible_ssh_common_args: >-
          -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
"""

HOST_VARS = """\
          ansible_host: {address}
          xcflushd_backend: {sim_url}
          xcflushd_frequency: 5
          xcflushd_auth_ttl: 60"""

VAULT_PASSWORD = "vault-pass-e2e"


@pytest.fixture(scope="module")
def fleet(deploy_root, releases, throwaway_key, tmp_path_factory):
    """Three nodes on a private bridge, sshd up, the simulator on the bridge, an inventory."""
    from lab import nspawn

    work = tmp_path_factory.mktemp("fleet")
    ssh_key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_key)], check=True)
    control = Path(f"/tmp/xcf-cp-{secrets.token_hex(3)}")  # short: ssh socket paths are limited
    control.mkdir(mode=0o700)
    network = nspawn.Network("10.213.9.0/24")
    nodes, sim = [], None
    try:
        for i in range(3):
            node = nspawn.Node(deploy_root, name=f"xcf-gw{i + 1}-{secrets.token_hex(2)}",
                               network=network, console_log=work / f"gw{i + 1}-console.log")
            nodes.append(node)
            node.start(timeout=60)
            node.write("/root/.ssh/authorized_keys", (ssh_key.with_suffix(".pub")).read_text(),
                       mode=0o600)
            node.run(["chmod", "700", "/root/.ssh"])
            node.systemctl("start", "ssh")  # usually up already; waits for it
        sim_url = f"http://{network.gateway}:{SIM_PORT}"
        sim_log = open(work / "backend-sim.log", "w")
        sim = subprocess.Popen(
            ["nsenter", f"--net={network.netns_path}", str(VENV_BIN / "xcflushd-backend-sim"),
             "--listen", f"{network.gateway}:{SIM_PORT}", "--demo-apps", "3"],
            stdout=sim_log, stderr=subprocess.STDOUT)
        # The inventory as the walk-through makes it: copied, the nodes listed, the provider
        # key vaulted, the release key pinned; the release in releases/<version>/.
        from .walkthrough import Session

        home = work / "home"
        session = Session(dict(ansible_env(home), ANSIBLE_SSH_CONTROL_PATH_DIR=str(control)),
                          network.netns_path, VAULT_PASSWORD)
        (work / "vault-pass").write_text(VAULT_PASSWORD + "\n")
        fleet = Fleet(nodes, network, home / "xcflushd" / "inventory", work, sim_url, control, session)
        for name, extra in (("inventory", ""), ("vault", "pk-demo\n")):
            result = fleet.walk(name, stdin_extra=extra)
            assert result.returncode == 0, result.output
        inv = fleet.inventory
        hosts = "\n".join(f"        gw{i + 1}:\n" + HOST_VARS.format(address=n.address.split('/')[0], sim_url=sim_url)
                          for i, n in enumerate(nodes))
        (inv / "hosts.yml").write_text(INVENTORY.format(hosts=hosts, key=ssh_key))
        pin = {"fingerprint": throwaway_key.primary}
        shutil.copy(throwaway_key.public_file, fleet.deployment / f"{throwaway_key.primary}.asc")
        with open(inv / "group_vars" / "all.yml", "a") as all_yml:
            all_yml.write(session.yaml("own-key", pin))
        fleet.place(releases[0])
        yield fleet
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait(10)
        for node in nodes:
            node.stop()
        network.close()
        shutil.rmtree(control, ignore_errors=True)
