"""What the release targets install: the signing tool's own requirements, never the test tools
(`make verify` is what an operator runs on release artifacts, from a fresh clone)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from signing_helpers import REPO

# Imported inside try/except ImportError, each with a fallback: not required.
OPTIONAL = {"packaging", "pip"}


def _dry_run(target, venv):
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-C", REPO, target, f"VENV={venv}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("target", ["verify", "verify-dist", "sign", "sign-dist", "release-key-fingerprints",
                                    "dist"])
def test_a_release_target_on_a_fresh_clone_installs_the_signing_requirements_only(target, tmp_path):
    commands = _dry_run(target, tmp_path / "venv")  # no venv yet: what a fresh clone gets
    installs = [ln for ln in commands.splitlines() if "pip install" in ln]
    assert installs and all("-r signing/requirements.txt" in ln or "build wheel" in ln for ln in installs), installs
    assert "[test]" not in commands and "pip install -q -e" not in commands


def test_the_signing_requirements_are_what_signing_imports():
    imported = set()
    for path in (Path(REPO) / "signing").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"signing"}
    assert third_party - OPTIONAL == {"gnupg"}
    lines = (Path(REPO) / "signing" / "requirements.txt").read_text().splitlines()
    names = [re.split(r"[<>=!~ ;\[]", ln, maxsplit=1)[0] for ln in lines if ln.strip() and not ln.startswith("#")]
    assert names == ["python-gnupg"]  # the distribution that provides `gnupg`
