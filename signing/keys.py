"""The pinned release key: reading its fingerprint and bringing it into a GnuPG home.

Keys are only ever identified by their full 40-hex primary fingerprint. Before any key
material is imported into a (private) home, it is scanned and must hold exactly the
pinned primary key; otherwise nothing is imported.
"""

import os
import re

from signing import errors
from signing.gpghome import open_gpg, private_home, user_home

__all__ = [
    "normalize_fingerprint", "read_pinned", "key_fingerprints",
    "import_checked", "public_key_bytes", "load_public", "load_secret", "has_secret",
]

_FPR_RE = re.compile(r"^[0-9A-F]{40}$")
DEFAULT_KEYSERVER = "hkps://keys.openpgp.org"
"""Keyserver used by ``--fetch-key`` when none is named (only ever on request)."""


def normalize_fingerprint(text):
    """Return ``text`` as 40 upper-case hex digits; reject short ids and anything else.

    Accepts an optional ``0x`` prefix and spaces (as gpg prints fingerprints).
    """
    fpr = text.strip().replace(" ", "").upper()
    if fpr.startswith("0X"):
        fpr = fpr[2:]
    if not _FPR_RE.match(fpr):
        raise errors.SetupError(
            f"key id {text.strip()!r} is not a full 40-hex fingerprint (short ids are refused)"
        )
    return fpr


def read_pinned(path):
    """The fingerprint pinned in ``path`` (first non-comment line)."""
    try:
        with open(path, encoding="ascii") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise errors.SetupError(f"cannot read pinned fingerprint file {path}: {exc}") from exc
    if not lines:
        raise errors.SetupError(f"pinned fingerprint file {path} is empty")
    return normalize_fingerprint(lines[0])


def key_fingerprints(gpg, pinned):
    """All fingerprints (primary first, then subkeys) of the pinned key in ``gpg``'s home."""
    for key in gpg.list_keys(keys=[pinned]):
        if key["fingerprint"] == pinned:
            return [pinned] + [sub[2] for sub in key["subkeys"] if sub[2]]
    return []


def import_checked(gpg, data, pinned, source):
    """Import ``data`` into ``gpg``'s home only if it holds exactly the pinned key.

    ``source`` names where the data came from, for the error message.
    """
    if not data or not data.strip():
        raise errors.KeyFileMismatch(f"{source} holds no key (expected {pinned})")
    found = sorted({k["fingerprint"] for k in gpg.scan_keys_mem(data)})
    if found != [pinned]:
        shown = ", ".join(found) or "no readable key"
        raise errors.KeyFileMismatch(
            f"{source} holds {shown}, not exactly the pinned key {pinned}; nothing imported"
        )
    result = gpg.import_keys(data)
    if pinned not in (result.fingerprints or []):
        raise errors.SetupError(f"gpg could not import the key from {source}: {result.stderr}")


def public_key_bytes(pinned, key_file=None, keyring=None, keyserver=None):
    """The pinned public key as OpenPGP bytes, from exactly one source.

    ``key_file`` is a file shipped with the release, ``keyring`` a GnuPG home the operator
    named (only read), ``keyserver`` a URL asked only when the operator said so.
    """
    if key_file:
        if not os.path.isfile(key_file):
            raise errors.SetupError(f"key file {key_file} does not exist")
        with open(key_file, "rb") as fh:
            return fh.read(), f"key file {key_file}"
    if keyring:
        with user_home(keyring):
            data = open_gpg(keyring).export_keys(pinned, armor=False)
        return (data.encode("latin-1") if isinstance(data, str) else data), f"keyring {keyring}"
    if keyserver:
        with private_home() as scratch:
            gpg = open_gpg(scratch)
            fetched = gpg.recv_keys(keyserver, pinned)
            if pinned not in (fetched.fingerprints or []):
                raise errors.SetupError(f"could not fetch {pinned} from keyserver {keyserver}")
            data = gpg.export_keys(pinned, armor=False)
        return (data.encode("latin-1") if isinstance(data, str) else data), f"keyserver {keyserver}"
    raise errors.SetupError(
        "no source for the public key: use TRUST_KEY_FILE=1 (the key file shipped in "
        "signing/, checked against the pinned fingerprint), GNUPGHOME=<your keyring>, "
        "or FETCH_KEY=1 (keyserver)"
    )


def load_public(home, pinned, **source):
    """Import the pinned public key into the private ``home``; return its fingerprints."""
    data, label = public_key_bytes(pinned, **source)
    gpg = open_gpg(home)
    import_checked(gpg, data, pinned, label)
    return key_fingerprints(gpg, pinned)


def has_secret(gpg, pinned):
    """True when ``gpg``'s home holds a secret (sub)key of the pinned key."""
    return any(k["fingerprint"] == pinned for k in gpg.list_keys(secret=True, keys=[pinned]))


def load_secret(home, pinned, secret_key_file):
    """Import the pinned secret key from ``secret_key_file`` into the private ``home``."""
    if not os.path.isfile(secret_key_file):
        raise errors.SetupError(f"secret key file {secret_key_file} does not exist")
    with open(secret_key_file, "rb") as fh:
        data = fh.read()
    gpg = open_gpg(home)
    import_checked(gpg, data, pinned, f"secret key file {secret_key_file}")
    if not has_secret(gpg, pinned):
        raise errors.SigningFailed(
            f"{secret_key_file} holds the public key {pinned} but no secret key"
        )
