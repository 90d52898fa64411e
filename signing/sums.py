"""``SHA256SUMS``: one ``<64 hex>  <file name>`` line per artifact, as ``sha256sum -c`` reads.

File names are bare names in the sums file's own directory; anything with a path
separator is refused, so a sums file cannot point verification elsewhere.
"""

import hashlib
import os
import re

from signing import errors

__all__ = ["sha256_file", "render", "write", "parse", "check_artifact"]

_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_CHUNK = 1 << 20


def sha256_file(path):
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name(name):
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\n" in name:
        raise errors.MalformedSums(f"SHA256SUMS names {name!r}, which is not a bare file name")
    return name


def render(paths):
    """The text of a sums file for ``paths`` (all in one directory), sorted by name."""
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(dirs) > 1:
        raise errors.SetupError(f"artifacts must share one directory, got {sorted(dirs)}")
    lines = []
    for path in sorted(paths, key=os.path.basename):
        if not os.path.isfile(path):
            raise errors.SetupError(f"artifact {path} does not exist (run make dist)")
        lines.append(f"{sha256_file(path)}  {_check_name(os.path.basename(path))}\n")
    return "".join(lines)


def write(paths, out):
    """Write the sums file ``out`` for ``paths`` (atomically)."""
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(render(paths))
    os.replace(tmp, out)


def parse(text, name="SHA256SUMS"):
    """Map file name to hex digest; refuse malformed or duplicate lines."""
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE_RE.match(line)
        if not match:
            raise errors.MalformedSums(f"{name} line {number} is not '<sha256>  <file>': {line!r}")
        digest, fname = match.groups()
        _check_name(fname)
        if fname in entries:
            raise errors.MalformedSums(f"{name} lists {fname} twice")
        entries[fname] = digest
    if not entries:
        raise errors.MalformedSums(f"{name} lists no file")
    return entries


def check_artifact(directory, fname, expected):
    """Raise unless ``directory/fname`` exists and hashes to ``expected``."""
    path = os.path.join(directory, fname)
    if not os.path.isfile(path):
        raise errors.MissingFile(f"{path} is listed in SHA256SUMS but missing")
    actual = sha256_file(path)
    if actual != expected:
        raise errors.ChecksumMismatch(
            f"{path}: sha256 {actual} differs from SHA256SUMS ({expected}): tampered or corrupt"
        )
