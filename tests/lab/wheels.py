"""Wheels of a Python project and its dependencies, for nodes that have no network.

``build_wheels(project, out)`` puts the project's own wheel in ``out/project``
(rebuilt every call: the version string does not change while the code does)
and its dependencies in ``out/deps``, copied from a cache under
:data:`lab.nspawn.CACHE_DIR` that is filled from the package index only when
something is missing. Inside a node::

    python3 -m venv /opt/app
    /opt/app/bin/pip install --no-index --find-links /wheels/deps /wheels/project/*.whl
"""

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .nspawn import CACHE_DIR, LabError, PathLike

__all__ = ["build_wheels", "VENV_INSTALL"]

#: The shell command that installs the wheels mounted at /wheels into a venv ($1).
VENV_INSTALL = ('python3 -m venv "$1" && "$1/bin/pip" install -q --no-index --no-cache-dir '
                '--find-links /wheels/deps /wheels/project/*.whl')


def _pip(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=600)


def build_wheels(project: PathLike, out: PathLike, python: Optional[str] = None,
                 cache_dir: PathLike = CACHE_DIR / "wheels") -> Path:
    """Build ``out/project/<project>.whl`` and fill ``out/deps``; returns ``out``."""
    python = python or sys.executable
    out, cache = Path(out), Path(cache_dir)
    (out / "project").mkdir(parents=True, exist_ok=True)
    (out / "deps").mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    proc = _pip(python, "wheel", "-q", "--no-deps", "-w", str(out / "project"), str(project))
    if proc.returncode:
        raise LabError(f"building the project wheel failed:\n{proc.stderr[-3000:]}")
    (wheel,) = sorted((out / "project").glob("*.whl"))
    # Dependencies: offline from the cache if it has them all, else from the index.
    for offline in (True, False):
        args = ["wheel", "-q", "-w", str(cache), "--find-links", str(cache), str(wheel)]
        proc = _pip(python, *(["--no-index"] if offline else []), *args)
        if proc.returncode == 0:
            break
    else:
        raise LabError(f"fetching dependency wheels failed:\n{proc.stderr[-3000:]}")
    for dep in cache.glob("*.whl"):
        if dep.name != wheel.name:
            shutil.copy(dep, out / "deps" / dep.name)
    (cache / wheel.name).unlink(missing_ok=True)  # keep only dependencies in the cache
    return out
