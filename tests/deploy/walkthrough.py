"""The deployment walk-through's own commands, read from the docs and run as written.

A fenced block right after a ``<!-- walkthrough: NAME -->`` line in README.md or docs/*.md is
block NAME. ``sh`` blocks run line by line, like a shell session (one working directory kept
across blocks, ``cd`` included), each line with the vault password on stdin for
``--ask-vault-pass`` (no terminal: Ansible reads the prompt's answer from stdin).
``<placeholder>`` words are what the reader fills in; the test says what it fills in.
"""

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]

_BLOCK = re.compile(r"^[ \t]*<!-- walkthrough: (?P<name>[^>]+?) -->\n[ \t]*```(?P<lang>\w*)\n(?P<body>.*?)^[ \t]*```",
                    re.M | re.S)


def blocks() -> Dict[str, str]:
    """Every marked block of the docs, by name, dedented; a name used twice is an error."""
    found: Dict[str, str] = {}
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        if not page.exists():
            continue
        for match in _BLOCK.finditer(page.read_text()):
            name = match["name"].strip()
            assert name not in found, f"walkthrough block {name!r} is marked twice"
            lines = match["body"].splitlines()
            indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
            found[name] = "".join(x[indent:] + "\n" for x in lines)
    return found


def fill(text: str, values: Dict[str, str]) -> str:
    """Replace the ``<placeholder>`` words; every one must be given."""
    return re.sub(r"<([a-z][a-z ]*)>", lambda m: values[m[1]], text)


@dataclass
class Session:
    """A controller shell: HOME, environment and working directory kept across blocks."""

    env: Dict[str, str]
    netns: str
    vault_password: str
    cwd: Path = REPO
    log: List[str] = field(default_factory=list)

    def run(self, name: str, values: Optional[Dict[str, str]] = None, stdin_extra: str = "",
            timeout: float = 600) -> List[subprocess.CompletedProcess]:
        """Run sh block ``name``; returns every line's process; stops at the first failure."""
        done = []
        for line in fill(blocks()[name], values or {}).splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cd = re.fullmatch(r"\s*cd\s+(\S+)\s*", line)
            if cd:
                self.cwd = (self.cwd / cd[1].replace("~", self.env["HOME"], 1)).resolve()
                continue
            answers = f"{self.vault_password}\n" * 2 + stdin_extra
            proc = subprocess.run(["nsenter", f"--net={self.netns}", "bash", "-c", line], cwd=self.cwd,
                                  env=self.env, input=answers, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout, start_new_session=True)
            self.log.append(f"$ {line}\n{proc.stdout}\nexit status {proc.returncode}\n")
            done.append(proc)
            if proc.returncode != 0:
                break
        return done

    def yaml(self, name: str, values: Optional[Dict[str, str]] = None) -> str:
        return fill(blocks()[name], values or {})


def set_var(path: Path, name: str, line: str) -> None:
    """In a group_vars file, replace variable ``name``'s line by ``line`` (a doc block's)."""
    text, count = re.subn(rf"^{name}:.*$", line.strip(), path.read_text(), flags=re.M)
    assert count == 1, f"{path} has no single {name} line"
    path.write_text(text)
