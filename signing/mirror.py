"""The Debian mirror and release of this machine, read from its own apt configuration.

No mirror host is ever written into the repository: the image base is bootstrapped from
whatever mirror the building machine's apt already uses.
"""

import glob
import os

from signing import errors

__all__ = ["SOURCE_FILES", "read_entries", "parse_deb822", "parse_one_line", "pick", "codename"]

SOURCE_FILES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d/*.list",
                "/etc/apt/sources.list.d/*.sources")
"""Where apt reads its sources (files with other suffixes are ignored, as apt does)."""


def parse_deb822(text):
    """Entries ``(types, uris, suites)`` of a deb822 ``.sources`` file, skipping disabled ones."""
    entries = []
    for stanza in text.split("\n\n"):
        fields, last = {}, None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and last:
                fields[last] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            last = key.strip().lower()
            fields[last] = value.strip()
        if not fields or fields.get("enabled", "yes").lower() == "no":
            continue
        entries.append((fields.get("types", "").split(), fields.get("uris", "").split(),
                        fields.get("suites", "").split()))
    return entries


def parse_one_line(text):
    """Entries ``(types, uris, suites)`` of a one-line-style ``sources.list``."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kind, rest = words[0], words[1:]
        if rest and rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            entries.append(([kind], [rest[0]], [rest[1]]))
    return entries


def read_entries(patterns=SOURCE_FILES):
    """Every enabled apt source entry of this machine."""
    entries = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            parse = parse_deb822 if path.endswith(".sources") else parse_one_line
            entries.extend(parse(text))
    return entries


def pick(entries, suite):
    """The first ``deb`` URI that serves exactly ``suite``."""
    for types, uris, suites in entries:
        if "deb" in types and suite in suites and uris:
            return uris[0]
    raise errors.SetupError(f"no apt source of this machine serves {suite!r}; pass MIRROR=")


def codename(os_release="/etc/os-release"):
    """This machine's release code name (``VERSION_CODENAME``), e.g. ``bookworm``."""
    if os.path.exists(os_release):
        with open(os_release, encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.strip().partition("=")
                if key == "VERSION_CODENAME" and value:
                    return value.strip('"')
    raise errors.SetupError(f"no VERSION_CODENAME in {os_release}; pass SUITE=")
