"""A small lab of real systemd nodes: cached Debian roots booted with systemd-nspawn.

Reusable by any test that needs a real service manager (the systemd unit
tests, the Ansible role tests). Three pieces:

* :func:`ensure_root` builds (once) and caches a bootable Debian root with
  debootstrap plus the packages asked for, under :data:`CACHE_DIR`
  (``XCFLUSHD_LAB_CACHE`` overrides). The apt mirror is read from the host's
  own apt sources at run time. Concurrent builders wait on a lock.
* :class:`Node` boots a root (by default under a throw-away tmpfs overlay) with
  ``--keep-unit --register=no`` in the background, finds the container's PID 1
  and runs commands in it through ``nsenter``. A context manager.
* :class:`Network` makes a network namespace with a bridge in it; nodes
  booted with ``network=`` get a veth on that bridge and an address, so several
  nodes can talk to each other and to nothing else.

:func:`unavailable` says why this machine cannot boot a node (``None`` when it
can); tests skip with that message.

Needs root, ``systemd-container`` and ``debootstrap`` (the tests' system
packages), and a host whose kernel lets nspawn create its namespaces.
"""

import contextlib
import fcntl
import glob
import hashlib
import io
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = [
    "root_or_skip",
    "BASE_PACKAGES",
    "CACHE_DIR",
    "LabError",
    "Network",
    "Node",
    "ensure_root",
    "host_mirror",
    "unavailable",
]

#: Where built roots live (outside the repo; ~300-400 MB each).
CACHE_DIR = Path(os.environ.get("XCFLUSHD_LAB_CACHE", "/var/cache/xcflushd-lab"))

#: What every root gets from debootstrap: enough to boot systemd and run Python.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3")

SUITE = "bookworm"

#: Bump when _build_root changes what it makes: old cached roots are then ignored.
RECIPE = 2

#: PATH for commands run inside a node (the host's PATH means nothing there).
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PathLike = Union[str, "os.PathLike[str]"]


class LabError(RuntimeError):
    """A node could not be built, booted, reached or stopped."""


# --------------------------------------------------------------------------- roots


def host_mirror() -> str:
    """The Debian mirror URI of the host's own apt sources (never hard-coded)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = Path(path).read_text()
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(
                (m.group(1).lower(), m.group(2).strip())
                for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)
            )
            suites = fields.get("suites", "").split()
            if "deb" in fields.get("types", "").split() and SUITE in suites:
                return fields["uris"].split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                uri_at = 1
                while words[uri_at].startswith("["):  # [signed-by=...] options
                    uri_at += 1
                if words[uri_at + 1] == SUITE:
                    return words[uri_at]
    raise LabError(f"no 'deb ... {SUITE}' source in the host's apt configuration")


def root_name(packages: Iterable[str] = ()) -> str:
    """Cache directory name for a root with these extra packages."""
    wanted = sorted(set(packages))
    digest = hashlib.sha256(" ".join([SUITE, str(RECIPE), *BASE_PACKAGES, "|", *wanted]).encode())
    return f"{SUITE}-{digest.hexdigest()[:12]}"


def ensure_root(packages: Iterable[str] = (), cache_dir: PathLike = CACHE_DIR,
                log: Optional[io.TextIOBase] = None) -> Path:
    """Return a bootable Debian root holding ``packages``, building it if needed.

    The first build takes a minute or two (debootstrap, then apt-get inside
    the root); later calls return the cached directory at once. Treat the root
    as read-only: boot it with ``Node(..., ephemeral=True)``.
    """
    packages = sorted(set(packages))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / root_name(packages)
    stamp = final / ".xcflushd-lab-root"
    if stamp.exists():
        return final
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder may be at it
        if stamp.exists():
            return final
        build = cache_dir / f".build-{final.name}-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        try:
            _build_root(build, packages, log)
            (build / ".xcflushd-lab-root").write_text(
                "\n".join([*BASE_PACKAGES, *packages]) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.rename(build, final)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return final


def _build_root(build: Path, packages: Sequence[str], log) -> None:
    def run(cmd, **kw):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, **kw)
        if log is not None:
            log.write(proc.stdout)
        if proc.returncode:
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise LabError(f"{' '.join(map(str, cmd[:3]))} ... failed ({proc.returncode}):\n{tail}")

    if not shutil.which("debootstrap"):
        raise LabError("debootstrap is not installed (apt-get install debootstrap)")
    run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
         SUITE, str(build), host_mirror()], timeout=900)
    # The host's sources (updates, security) replace debootstrap's single line.
    sources = [p for p in ["/etc/apt/sources.list", *glob.glob("/etc/apt/sources.list.d/*")]
               if os.path.isfile(p)]
    (build / "etc/apt/sources.list").unlink(missing_ok=True)
    for path in sources:
        shutil.copy(path, build / path.lstrip("/"))
    if packages:
        nspawn = ["systemd-nspawn", "-q", "-D", str(build), "--register=no", "--keep-unit",
                  "--setenv=DEBIAN_FRONTEND=noninteractive", "--setenv=PATH=" + NODE_PATH]
        run([*nspawn, "apt-get", "update", "-q"], timeout=600)
        run([*nspawn, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            timeout=900)
        run([*nspawn, "apt-get", "clean"], timeout=120)
    # A fresh machine-id per boot (the copies would otherwise share one), and
    # the machine name as hostname (debootstrap copied the host's).
    (build / "etc/machine-id").write_text("")
    (build / "etc/hostname").unlink(missing_ok=True)
    hosts = build / "etc/hosts"  # debootstrap writes none: "localhost" would not resolve
    if not hosts.exists():
        hosts.write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")


# --------------------------------------------------------------------------- availability


def unavailable() -> Optional[str]:
    """Why this machine cannot boot a node, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "booting systemd-nspawn containers needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                          ("nsenter", "util-linux")):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian package {package})"
    if not os.path.isdir("/sys/fs/cgroup"):
        return "no cgroup file system at /sys/fs/cgroup"
    return None


# --------------------------------------------------------------------------- network


def _ip(*args: str, netns: Optional[str] = None, check: bool = True):
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Network:
    """A network namespace of our own with a bridge; nodes attach to it.

    ``Network(subnet)`` creates namespace ``xcf-lab-XXXX`` holding bridge
    ``br0`` with the subnet's first address (reachable from the host through
    ``nsenter --net=<Network.netns_path>`` or ``ip netns exec <name>``).
    :meth:`address` hands out the next free host address for a node. Nothing
    is routed anywhere: traffic stays inside the namespace. Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, subnet: str = "10.213.0.0/24", name: Optional[str] = None):
        self.subnet = ipaddress.ip_network(subnet)
        self.name = name or f"xcf-lab-{secrets.token_hex(3)}"
        self.bridge = "br0"
        self.netns_path = f"/run/netns/{self.name}"
        hosts = self.subnet.hosts()
        self.gateway = next(hosts)
        self._free = hosts
        _ip("netns", "add", self.name)
        try:
            _ip("link", "set", "lo", "up", netns=self.name)
            _ip("link", "add", self.bridge, "type", "bridge", netns=self.name)
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge,
                netns=self.name)
            _ip("link", "set", self.bridge, "up", netns=self.name)
        except BaseException:
            self.close()
            raise

    def address(self) -> str:
        """The next unused address, as ``a.b.c.d/prefix``."""
        return f"{next(self._free)}/{self.subnet.prefixlen}"

    def close(self) -> None:
        _ip("netns", "delete", self.name, check=False)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- nodes


def _children(pid: int) -> List[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    kids: List[int] = []
    for tid in tasks:
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


class Node:
    """One booted systemd container.

    ``Node(root, name=None, ephemeral=True, private_network=True, network=None,
    binds=(), binds_ro=(), nspawn_args=())``

    * ``ephemeral``: ``True`` (default) boots the root read-only under a tmpfs
      overlay (``--volatile=overlay``, boots in under a second); ``"copy"``
      boots a throw-away copy (``-x``, a few seconds: it copies the tree);
      ``False`` boots the root itself, keeping what the node writes. Either
      ephemeral way the cached root is never changed, and any number of nodes
      may boot the same root at once.
    * ``private_network`` gives the node only its own loopback (the default:
      ports it opens cannot collide with the host's). ``network=`` a
      :class:`Network` instead puts it on that bridge with the next address
      (interface ``host0``; :attr:`address`).
    * ``binds``/``binds_ro``: ``"HOST:CONTAINER"`` or ``"PATH"`` mounts.

    :meth:`start` boots and waits for ``systemctl is-system-running --wait``;
    :meth:`run` executes a command inside (``nsenter`` into all of PID 1's
    namespaces, a clean environment); :meth:`stop` powers off. The nspawn
    console output goes to :attr:`console_log` (a temporary file removed at
    :meth:`stop` unless ``console_log=`` names one); :meth:`console_tail`
    reads it, and boot failures quote it.
    """

    def __init__(self, root: PathLike, name: Optional[str] = None, *,
                 ephemeral: Union[bool, str] = True,
                 private_network: bool = True, network: Optional[Network] = None,
                 binds: Sequence[str] = (), binds_ro: Sequence[str] = (),
                 nspawn_args: Sequence[str] = (), console_log: Optional[PathLike] = None):
        self.root = Path(root)
        self.name = name or f"xcf-{secrets.token_hex(3)}"
        self.ephemeral = ephemeral
        self.private_network = private_network
        self.network = network
        self.address: Optional[str] = network.address() if network else None
        self.binds = list(binds)
        self.binds_ro = list(binds_ro)
        self.nspawn_args = list(nspawn_args)
        # The console goes to a temporary file, removed at stop(), unless given.
        self._own_console_log = console_log is None
        self.console_log = Path(console_log) if console_log else Path(
            tempfile.gettempdir()) / f"xcflushd-lab-{self.name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.leader: Optional[int] = None  # the container's PID 1, as the host sees it
        self.system_state: Optional[str] = None

    # -- lifecycle

    def command(self) -> List[str]:
        """The systemd-nspawn command line :meth:`start` runs."""
        cmd = ["systemd-nspawn", "-q", "-D", str(self.root), "--register=no", "--keep-unit",
               "-b", "-M", self.name, "--console=passive"]
        if self.ephemeral == "copy":
            cmd.append("-x")
        elif self.ephemeral:
            cmd.append("--volatile=overlay")
        if self.network is not None:
            cmd = ["nsenter", f"--net={self.network.netns_path}", *cmd,
                   f"--network-bridge={self.network.bridge}"]
        elif self.private_network:
            cmd.append("--private-network")
        cmd += [f"--bind={b}" for b in self.binds]
        cmd += [f"--bind-ro={b}" for b in self.binds_ro]
        return cmd + self.nspawn_args

    def start(self, timeout: float = 60) -> str:
        """Boot; return ``systemctl is-system-running`` (``running`` or ``degraded``)."""
        if self.proc is not None:
            raise LabError(f"node {self.name} already started")
        with open(self.console_log, "wb") as console:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=console, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            self.leader = self._find_leader(deadline)
            self.system_state = self._wait_booted(deadline)
            if self.address:
                self.run(["ip", "addr", "add", self.address, "dev", "host0"])
                self.run(["ip", "link", "set", "host0", "up"])
        except BaseException:
            self.stop()
            raise
        return self.system_state

    def _find_leader(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"systemd-nspawn exited ({self.proc.returncode}) while booting "
                               f"{self.name}:\n{self.console_tail()}")
            stack = [self.proc.pid]
            while stack:  # nspawn (maybe under nsenter) -> its child -> systemd
                pid = stack.pop()
                if pid != self.proc.pid and _comm(pid) == "systemd":
                    return pid
                stack += _children(pid)
            time.sleep(0.05)
        raise LabError(f"no systemd PID 1 appeared in {self.name}:\n{self.console_tail()}")

    def _wait_booted(self, deadline: float) -> str:
        last = ""
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            try:
                proc = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                                timeout=left)
            except subprocess.TimeoutExpired:
                break
            last = (proc.stdout + proc.stderr).strip()
            if proc.stdout.strip() in ("running", "degraded"):
                return proc.stdout.strip()
            time.sleep(0.1)  # the bus is not up yet during the first moments
        raise LabError(f"{self.name} did not finish booting: {last!r}\n{self.console_tail()}")

    def stop(self, timeout: float = 30) -> Optional[int]:
        """Power off (SIGTERM to nspawn asks systemd to halt); SIGKILL if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._own_console_log:
            self.console_log.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> "Node":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- inside the node

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: Optional[float] = 60,
            input: Optional[Union[str, bytes]] = None, env: Optional[Mapping[str, str]] = None,
            text: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the node; returns the CompletedProcess (stdout, stderr)."""
        if self.leader is None:
            raise LabError(f"node {self.name} is not running")
        environment: Dict[str, str] = {"PATH": NODE_PATH, "LANG": "C.UTF-8", "TERM": "dumb",
                                       "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        environment.update(env or {})
        full = ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
                *(f"{k}={v}" for k, v in environment.items()), *cmd]
        if text and isinstance(input, bytes):
            input = input.decode()
        proc = subprocess.run(full, input=input, capture_output=True, timeout=timeout, text=text)
        if check and proc.returncode:
            raise LabError(f"in {self.name}: {' '.join(cmd)} -> {proc.returncode}\n"
                           f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        """Run a shell script inside the node."""
        return self.run(["sh", "-ec", script], **kw)

    def systemctl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], **kw)

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: Optional[str] = None, *args: str) -> str:
        cmd = ["journalctl", "--no-pager", "-o", "short-precise", *args]
        if unit:
            cmd += ["-u", unit]
        return self.run(cmd, check=False).stdout

    def write(self, path: str, data: Union[str, bytes], mode: int = 0o644,
              owner: str = "root:root") -> None:
        """Create or replace one file inside the node (parents created)."""
        payload = data.encode() if isinstance(data, str) else data
        self.put_tree({path: (payload, mode)}, owner=owner)

    def put_tree(self, files: Mapping[str, "tuple[bytes, int]"], owner: str = "root:root") -> None:
        """Copy files in: ``{container_path: (bytes, mode)}``, one tar through stdin."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path, (payload, mode) in files.items():
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size, info.mode, info.mtime = len(payload), mode, int(time.time())
                tar.addfile(info, io.BytesIO(payload))
        user, _, group = owner.partition(":")
        self.run(["tar", "-C", "/", "-xf", "-", "--no-same-owner"], input=buf.getvalue(),
                 text=False)
        paths = ["/" + p.lstrip("/") for p in files]
        self.run(["chown", f"{user}:{group or user}", *paths])

    def copy_in(self, host_path: PathLike, container_path: str) -> None:
        """Copy a host file or directory tree into the node."""
        host_path = Path(host_path)
        files = {}
        if host_path.is_dir():
            for p in sorted(host_path.rglob("*")):
                if p.is_file():
                    rel = p.relative_to(host_path).as_posix()
                    files[f"{container_path.rstrip('/')}/{rel}"] = (p.read_bytes(),
                                                                    p.stat().st_mode & 0o7777)
        else:
            files[container_path] = (host_path.read_bytes(), host_path.stat().st_mode & 0o7777)
        self.put_tree(files)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python3 tests/lab/nspawn.py build [PACKAGE...]``: build/find a root, print its path."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="nspawn.py", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find) the cached root holding PACKAGEs")
    build.add_argument("packages", nargs="*", metavar="PACKAGE")
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        parser.error(why)
    print(ensure_root(args.packages, log=sys.stderr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def root_or_skip(packages: Iterable[str] = ()) -> Path:
    """For test fixtures: a cached root holding ``packages`` that boots here,
    or ``pytest.skip`` saying why this machine cannot."""
    import pytest

    why = unavailable()
    if why:
        pytest.skip(f"cannot boot a systemd-nspawn node here: {why}")
    root = ensure_root(packages)
    probe = Node(root)
    try:
        probe.start(timeout=60)
    except LabError as exc:
        pytest.skip(f"systemd-nspawn could not boot a node on this machine: {exc}")
    finally:
        probe.stop()
    return root
