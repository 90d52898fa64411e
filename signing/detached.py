"""The detached ASCII-armored signature ``SHA256SUMS.asc`` over the sums file."""

import os

from signing import errors
from signing.openpgp import check_signer, require_nonempty, sniff, status_lines

__all__ = ["sign", "verify"]


def sign(gpg, sums_path, sig_path, signer, passphrase=None):
    """Write a detached armored signature of ``sums_path`` by key ``signer`` to ``sig_path``.

    ``--local-user`` names the key (python-gnupg's ``keyid=`` would become
    ``--default-key``, with which gpg silently falls back to another secret key).
    """
    tmp = sig_path + ".tmp"
    with open(sums_path, "rb") as fh:
        result = gpg.sign_file(
            fh, detach=True, clearsign=False, binary=False, output=tmp,
            extra_args=["--local-user", signer], passphrase=passphrase,
        )
    if result.status != "signature created":
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise errors.SigningFailed(
            f"gpg did not sign {sums_path} with {signer}: {result.status or 'no signature'}"
        )
    os.replace(tmp, sig_path)
    return result.fingerprint


def verify(gpg, sums_path, sig_path, pinned):
    """Check ``sig_path`` is a detached armored signature of ``sums_path`` by the pinned key.

    Returns the fingerprint of the (sub)key that signed.
    """
    data = require_nonempty(sig_path, "signature")
    if not os.path.isfile(sums_path):
        raise errors.MissingFile(f"sums file {sums_path} is missing")
    kind = sniff(data)
    if kind != "armored signature":
        raise errors.WrongFormat(
            f"{sig_path}: format is '{kind}'; expected a detached ASCII-armored signature"
        )
    with open(sig_path, "rb") as fh:
        result = gpg.verify_file(fh, data_filename=sums_path)
    if "PLAINTEXT" in status_lines(result):
        # gpg --verify SIG DATA with a signed message as SIG checks the embedded text
        # and ignores DATA: never accept that.
        raise errors.WrongFormat(f"{sig_path} embeds its own data; it is not a detached signature")
    return check_signer(result, pinned, sig_path, gpg)
