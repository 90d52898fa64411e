"""Recognising OpenPGP signature formats and deciding whether the pinned key signed.

python-gnupg reports ``valid`` for any good signature by any key it has, trusted or not,
so :func:`check_signer` pins the full primary fingerprint itself and accepts a signature
by the primary key or by any of its subkeys.
"""

import subprocess
import time

from signing import errors

__all__ = ["sniff", "packet_tag", "require_nonempty", "check_signer", "status_lines", "utc",
           "revocation_date", "FUTURE_SKEW"]

_ARMOR = {
    b"-----BEGIN PGP SIGNED MESSAGE-----": "clearsigned",
    b"-----BEGIN PGP SIGNATURE-----": "armored signature",
    b"-----BEGIN PGP MESSAGE-----": "armored message",
}
_SIGNATURE_PACKET = 2


def sniff(data):
    """Name the container format of signature bytes.

    Returns one of ``"empty"``, ``"binary"`` (OpenPGP packets), ``"binary detached
    signature"`` (the first packet is a bare signature), ``"clearsigned"``,
    ``"armored signature"``, ``"armored message"``, ``"armored"`` (another armor block)
    or ``"not OpenPGP"``.
    """
    if not data:
        return "empty"
    head = data.lstrip()
    for marker, name in _ARMOR.items():
        if head.startswith(marker):
            return name
    if head.startswith(b"-----BEGIN PGP"):
        return "armored"
    if data[0] & 0x80:
        return "binary detached signature" if packet_tag(data[0]) == _SIGNATURE_PACKET else "binary"
    return "not OpenPGP"


def packet_tag(first_byte):
    """The OpenPGP packet tag encoded in a packet's first byte (old or new header format)."""
    return first_byte & 0x3F if first_byte & 0x40 else (first_byte >> 2) & 0x0F


def require_nonempty(path, what):
    """Read ``path``; raise :class:`~signing.errors.MissingFile` or ``EmptyFile``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise errors.MissingFile(f"{what} {path} is missing") from None
    except IsADirectoryError:
        raise errors.MissingFile(f"{what} {path} is a directory, not a file") from None
    if not data.strip():
        raise errors.EmptyFile(f"{what} {path} is empty")
    return data


def status_lines(result):
    """The ``[GNUPG:]`` status keywords gpg emitted for ``result``, in order."""
    return [words[0] for words in _status_words(result)]


def _status_words(result):
    out = []
    for line in (result.stderr or "").splitlines():
        if line.startswith("[GNUPG:] "):
            out.append(line[len("[GNUPG:] "):].split())
    return out


FUTURE_SKEW = 300
"""Seconds a signature may be dated ahead of this machine's clock (clock drift)."""


def utc(seconds):
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS UTC`` (``unknown date`` when absent)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(seconds)))
    except (TypeError, ValueError):
        return "unknown date"


def revocation_date(gpg, fpr):
    """When the key or subkey ``fpr`` was revoked, from gpg's colon listing (or None)."""
    if gpg is None:
        return None
    proc = subprocess.run([gpg.gpgbinary, "--homedir", gpg.gnupghome, "--batch", "--with-colons",
                           "--list-sigs", fpr], capture_output=True, text=True)
    block, dates = None, {}
    for fields in (line.split(":") for line in proc.stdout.splitlines()):
        if fields[0] in ("pub", "sub"):
            block = None
        elif fields[0] == "fpr" and block is None:
            block = fields[9]
        elif fields[0] == "rev" and block and len(fields) > 5:
            dates.setdefault(block, fields[5])
    return dates.get(fpr)


def check_signer(result, pinned, name, gpg=None, now=None):
    """Return the signing (sub)key fingerprint if the pinned key made a good signature.

    ``result`` is a python-gnupg verify (or decrypt) result; ``name`` labels the message;
    ``gpg`` (the home the key is in) lets a refusal say when a key was revoked.
    Raises the :mod:`signing.errors` class that says what went wrong: every refusal names
    the key and the signature's date.
    """
    status = result.status
    words = {w[0]: w[1:] for w in reversed(_status_words(result))}
    signer = result.fingerprint or result.key_id
    made = utc(result.sig_timestamp or result.timestamp)
    if status == "signature bad" or "BADSIG" in words:
        raise errors.BadSignature(
            f"{name}: BAD signature by {result.key_id}: the signed data was altered"
        )
    if "REVKEYSIG" in words or "KEYREVOKED" in words or status == "signing key was revoked":
        primary = result.pubkey_fingerprint or pinned
        primary_date = revocation_date(gpg, primary) if signer != primary else None
        which = f"its primary key {primary}" if primary_date else "that key"
        when = primary_date or revocation_date(gpg, signer)
        raise errors.UnusableKey(
            f"{name}: signed on {made} by {signer}, but {which} was revoked on {utc(when)}: refused")
    if "EXPKEYSIG" in words or "KEYEXPIRED" in words or status == "signing key has expired":
        expired = (words.get("KEYEXPIRED") or [None])[0]
        raise errors.UnusableKey(
            f"{name}: signed on {made} by {signer}, a key of {pinned} that expired on"
            f" {utc(expired)}: refused")
    if "EXPSIG" in words or status == "signature expired":
        raise errors.UnusableKey(f"{name}: the signature by {signer} of {made} has expired: refused")
    if result.valid and status == "signature valid":
        if pinned not in (result.pubkey_fingerprint, result.fingerprint):
            raise errors.WrongSigner(
                f"{name}: signed on {made} by {result.pubkey_fingerprint or result.fingerprint}, "
                f"not by the pinned key {pinned}"
            )
        now = time.time() if now is None else now
        if int(result.sig_timestamp or result.timestamp or 0) > now + FUTURE_SKEW:
            raise errors.UnusableKey(
                f"{name}: signature by {signer} (key {pinned}) is dated {made}, in the future"
                f" (now {utc(now)}): refused")
        return result.fingerprint
    if status == "no public key" or "NO_PUBKEY" in words:
        raise errors.WrongSigner(
            f"{name}: signed on {made} by key {result.key_id}, which is neither the pinned key"
            f" {pinned} nor a subkey bound to it: not by the pinned key {pinned}"
        )
    raise errors.CorruptSignature(
        f"{name}: no complete OpenPGP signature found (truncated or not a signature;"
        f" gpg status {status or 'none'})"
    )
