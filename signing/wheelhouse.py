"""The wheels an image's Python needs, built on the host with ``pip wheel``.

``pip wheel`` resolves environment markers for the *host* interpreter. The image's
interpreter may differ in its patch level (``async-timeout; python_full_version <
"3.11.3"``, say), so after the first round the house is topped up with whatever the
image's own marker environment still requires, until nothing is missing.
"""

import glob
import json
import os
import subprocess
import sys
import zipfile
from email.parser import Parser

try:
    from packaging import tags
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pragma: no cover - the copy pip always carries
    from pip._vendor.packaging import tags
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

from signing import errors

__all__ = ["ENV_SCRIPT", "requires", "missing", "build", "pip_wheel_path", "environment_of",
           "target_environment", "unfit", "top_up"]

ENV_SCRIPT = (
    "import json, os, platform, sys\n"
    "v = sys.version_info\n"
    "print(json.dumps({'implementation_name': sys.implementation.name,"
    " 'implementation_version': '%d.%d.%d' % sys.implementation.version[:3],"
    " 'os_name': os.name, 'platform_machine': platform.machine(),"
    " 'platform_release': platform.release(), 'platform_system': platform.system(),"
    " 'platform_version': platform.version(),"
    " 'python_full_version': platform.python_version(),"
    " 'platform_python_implementation': platform.python_implementation(),"
    " 'python_version': '%d.%d' % v[:2], 'sys_platform': sys.platform}))\n"
)
"""Printed by the image's interpreter: its PEP 508 marker environment, as JSON."""

_MAX_ROUNDS = 5


def requires(wheel):
    """The ``Requires-Dist`` strings of ``wheel``'s metadata."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist()
                        if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            headers = Parser().parsestr(zf.read(meta).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, StopIteration, UnicodeDecodeError):
        raise errors.SetupError(f"{wheel}: not a wheel with readable metadata") from None
    return headers.get_all("Requires-Dist") or []


def _names(house):
    return {canonicalize_name(parse_wheel_filename(os.path.basename(w))[0])
            for w in glob.glob(os.path.join(house, "*.whl"))}


def missing(house, environment):
    """Requirements (markers stripped) that hold in ``environment`` but have no wheel in
    ``house``."""
    have = _names(house)
    env = dict(environment, extra="")
    out = []
    for wheel in sorted(glob.glob(os.path.join(house, "*.whl"))):
        for spec in requires(wheel):
            req = Requirement(spec)
            if req.marker is not None and not Marker(str(req.marker)).evaluate(env):
                continue
            # Without its marker: the host's pip would evaluate it for the host and skip it.
            req.marker = None
            if canonicalize_name(req.name) not in have and str(req) not in out:
                out.append(str(req))
    return out


def pip_wheel_path(house):
    """The pip wheel in ``house`` (used to install inside the image without its own pip)."""
    found = glob.glob(os.path.join(house, "pip-*.whl"))
    if not found:
        raise errors.SetupError(f"no pip wheel in {house}")
    return found[0]


def build(project_wheel, house, environment, python=sys.executable, run=subprocess.run):
    """Fill ``house`` with ``project_wheel`` and every wheel it needs in ``environment``.

    ``environment`` is the image interpreter's marker environment; its ``python_version``
    must equal the host's, since compiled wheels are built for the host's ABI.
    """
    host = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if environment["python_version"] != host:
        raise errors.SetupError(
            f"the image has Python {environment['python_version']} but the host pip builds for "
            f"{host}; build with a {environment['python_version']} interpreter (PYTHON=)"
        )
    os.makedirs(house, exist_ok=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(pip + ["wheel", "--wheel-dir", house, project_wheel], check=True)
    run(pip + ["download", "--no-deps", "--only-binary=:all:", "--dest", house, "pip"],
        check=True)
    for _ in range(_MAX_ROUNDS):
        todo = missing(house, environment)
        if not todo:
            return sorted(glob.glob(os.path.join(house, "*.whl")))
        run(pip + ["wheel", "--wheel-dir", house] + todo, check=True)
    raise errors.SetupError(f"wheels still missing after {_MAX_ROUNDS} rounds: {todo}")


def environment_of(command):
    """Marker environment of the interpreter that ``command`` (a list) runs."""
    out = subprocess.run(command + ["-c", ENV_SCRIPT], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def target_environment(python_full_version, python=sys.executable):
    """The marker environment of ``python`` as if it were ``python_full_version`` (the
    nodes' interpreter, e.g. Debian 12's 3.11.2): same platform, another version."""
    env = environment_of([python])
    parts = python_full_version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise errors.SetupError(f"the nodes' Python version must be X.Y.Z, not {python_full_version!r}")
    env.update(python_full_version=python_full_version, python_version=".".join(parts[:2]))
    if env["implementation_name"] == "cpython":
        env["implementation_version"] = python_full_version
    return env


def unfit(house, environment):
    """Wheels in ``house`` that a Python of ``environment`` cannot install (their tags), and
    requirements of the house's wheels that no wheel there satisfies: one line each."""
    major, minor = (int(p) for p in environment["python_version"].split("."))
    accepted = set(tags.cpython_tags(python_version=(major, minor)))
    accepted |= set(tags.compatible_tags(python_version=(major, minor)))
    problems = []
    for wheel in sorted(glob.glob(os.path.join(house, "*.whl"))):
        _, _, _, wheel_tags = parse_wheel_filename(os.path.basename(wheel))
        if not wheel_tags & accepted:
            problems.append(f"{os.path.basename(wheel)}: not installable on Python "
                            f"{environment['python_full_version']} ({environment['platform_machine']})")
    problems += [f"{req}: needed on Python {environment['python_full_version']}, no wheel for it"
                 for req in missing(house, environment)]
    return problems


def top_up(house, environment, python=sys.executable, run=subprocess.run):
    """Add the wheels that ``environment``'s markers want and ``house`` lacks (pip resolved
    for the builder's own interpreter, whose markers may differ)."""
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    for _ in range(_MAX_ROUNDS):
        todo = missing(house, environment)
        if not todo:
            return
        run(pip + ["wheel", "--prefer-binary", "--wheel-dir", house] + todo, check=True)
    raise errors.SetupError(f"wheels still missing after {_MAX_ROUNDS} rounds: {todo}")
