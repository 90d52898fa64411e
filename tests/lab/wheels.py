"""Wheels of a Python project and its dependencies, for nodes that have no network.

``build_wheels(project, out, root=ROOT)`` puts the project's own wheel in
``out/project`` (rebuilt every call: the version string does not change while
the code does) and its dependencies in ``out/deps``, copied from a cache under
:data:`lab.nspawn.CACHE_DIR` that is filled from the package index only when
something is missing.

Dependencies are resolved by the node's own interpreter (pip run inside the
root, sharing the host's network for that one command), because environment
markers differ between Pythons: redis needs async-timeout on 3.11.2
(Debian 12) but not on the host's 3.11.7. Without ``root`` the host's
interpreter resolves them. Inside a node::

    python3 -m venv /opt/app
    /opt/app/bin/pip install --no-index --find-links /wheels/deps /wheels/project/*.whl
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .nspawn import CACHE_DIR, NODE_PATH, LabError, PathLike

__all__ = ["build_wheels", "VENV_INSTALL"]

#: The shell command that installs the wheels mounted at /wheels into a venv ($1).
VENV_INSTALL = ('python3 -m venv "$1" && "$1/bin/pip" install -q --no-index --no-cache-dir '
                '--find-links /wheels/deps /wheels/project/*.whl')


#: What a project's wheel is not built from (and what one build leaves for the next).
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".hypothesis", ".pytest_cache", ".ruff_cache")


def _resolve(attempt) -> None:
    for offline in (True, False):
        proc = attempt(offline)
        if proc.returncode == 0:
            return
    raise LabError(f"fetching dependency wheels failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")


def _pip_in_root(root: Path, wheel: Path, host_cache: Path, cache: Path, offline: bool) -> subprocess.CompletedProcess:
    """``pip wheel`` run by the root's python3, on a throw-away overlay of the root."""
    script = ('python3 -m venv /tmp/venv && /tmp/venv/bin/pip wheel -q --disable-pip-version-check '
              f'{"--no-index " if offline else ""}-w /cache --find-links /cache --find-links /host-cache '
              f'/project/{wheel.name}')
    cmd = ["systemd-nspawn", "-q", "-D", str(root), "--volatile=overlay", "--register=no", "--keep-unit",
           f"--bind={cache}:/cache", f"--bind-ro={host_cache}:/host-cache", f"--bind-ro={wheel.parent}:/project",
           "--setenv=PATH=" + NODE_PATH]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")  # the root has no CA bundle of its own
    if ca.exists():
        cmd += [f"--bind-ro={ca}:/run/lab-ca.crt", "--setenv=PIP_CERT=/run/lab-ca.crt"]
    return subprocess.run([*cmd, "sh", "-c", script], capture_output=True, text=True, timeout=600)


def _pip(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=600)


def build_wheels(project: PathLike, out: PathLike, root: Optional[PathLike] = None,
                 python: Optional[str] = None, cache_dir: Optional[PathLike] = None) -> Path:
    """Build ``out/project/<project>.whl`` and fill ``out/deps``; returns ``out``.

    ``root``: a lab root whose python3 resolves the dependencies (recommended).
    """
    python = python or sys.executable
    out = Path(out)
    host_cache = Path(cache_dir) if cache_dir else CACHE_DIR / "wheels"
    (out / "project").mkdir(parents=True, exist_ok=True)
    (out / "deps").mkdir(parents=True, exist_ok=True)
    host_cache.mkdir(parents=True, exist_ok=True)
    # From a private copy: setuptools builds in the tree's build/, and two test workers
    # building the same checkout at once broke each other's wheel ("No such file").
    with tempfile.TemporaryDirectory(prefix="wheel-src-") as src:
        shutil.copytree(project, src, dirs_exist_ok=True, symlinks=True, ignore=_NOT_SOURCE)
        proc = _pip(python, "wheel", "-q", "--no-deps", "-w", str(out / "project"), src)
    if proc.returncode:
        raise LabError(f"building the project wheel failed:\n{proc.stderr[-3000:]}")
    (wheel,) = sorted((out / "project").glob("*.whl"))
    # Offline from the caches when they hold everything, else from the index.
    # The host builds what only comes as an sdist (sdnotify); the root's pip
    # (too old to build without the wheel package) then adds what its markers want.
    caches = [host_cache]
    _resolve(lambda offline: _pip(python, *(["--no-index"] if offline else []), "wheel", "-q", "-w",
                                  str(host_cache), "--find-links", str(host_cache), str(wheel)))
    if root is not None:
        root_cache = host_cache.parent / f"{host_cache.name}-{Path(root).name}"
        root_cache.mkdir(exist_ok=True)
        caches.append(root_cache)
        _resolve(lambda offline: _pip_in_root(Path(root), wheel, host_cache, root_cache, offline))
    for cache in caches:
        for dep in cache.glob("*.whl"):
            if dep.name != wheel.name:
                shutil.copy(dep, out / "deps" / dep.name)
            else:
                dep.unlink()  # keep only dependencies in the caches
    return out
