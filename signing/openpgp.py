"""Recognising OpenPGP signature formats and deciding whether the pinned key signed.

python-gnupg reports ``valid`` for any good signature by any key it has, trusted or not,
so :func:`check_signer` pins the full primary fingerprint itself and accepts a signature
by the primary key or by any of its subkeys.
"""

from signing import errors

__all__ = ["sniff", "packet_tag", "require_nonempty", "check_signer", "status_lines"]

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
    out = []
    for line in (result.stderr or "").splitlines():
        if line.startswith("[GNUPG:] "):
            out.append(line[len("[GNUPG:] "):].split(" ", 1)[0])
    return out


def check_signer(result, pinned, name):
    """Return the signing (sub)key fingerprint if the pinned key made a good signature.

    ``result`` is a python-gnupg verify (or decrypt) result; ``name`` labels the message.
    Raises the :mod:`signing.errors` class that says what went wrong.
    """
    status = result.status
    if result.valid and status == "signature valid":
        if pinned in (result.pubkey_fingerprint, result.fingerprint):
            return result.fingerprint
        raise errors.WrongSigner(
            f"{name}: signed by {result.pubkey_fingerprint or result.fingerprint}, "
            f"not by the pinned key {pinned}"
        )
    if status == "no public key":
        raise errors.WrongSigner(
            f"{name}: signed by key {result.key_id}, not by the pinned key {pinned}"
        )
    if status == "signature bad":
        raise errors.BadSignature(
            f"{name}: BAD signature by {result.key_id}: the signed data was altered"
        )
    if status in ("signing key has expired", "signing key was revoked", "signature expired"):
        raise errors.UnusableKey(f"{name}: {status} (key {result.key_id})")
    raise errors.CorruptSignature(
        f"{name}: no complete OpenPGP signature found (truncated or not a signature;"
        f" gpg status {status or 'none'})"
    )
