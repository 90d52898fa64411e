"""Image signatures: a binary OpenPGP signed message over an atomic-signature payload.

The same format ``skopeo standalone-sign`` writes and ``skopeo standalone-verify`` reads.
Verification order: the bytes are a binary OpenPGP message → the signature is good and
made by the pinned key's primary itself → only then the payload is parsed, strictly → the
digest matches the manifest → the reference matches.

Primary only, as podman and skopeo check: Debian 12's containers/image matches a
``signedBy`` key against primary fingerprints, so an image signed by a subkey would pass
here and be refused by every operator's pull. Images are therefore signed with
``--local-user FPR!`` (exactly that key, no subkey substituted).
"""

import os
import time

from signing import atomic, errors
from signing.oci import digest_of
from signing.openpgp import check_signer, require_nonempty, sniff, status_lines

__all__ = ["CREATOR", "sign", "verify"]

CREATOR = "xcflushd signing (python-gnupg)"
"""The ``optional.creator`` this tool writes."""


def sign(gpg, manifest, reference, signer, sig_path, passphrase=None, timestamp=None):
    """Sign ``manifest`` bytes as ``reference`` with key ``signer``; write ``sig_path``.

    Returns the manifest digest that was signed.
    """
    digest = digest_of(manifest)
    payload = atomic.build(digest, reference, CREATOR,
                           int(time.time()) if timestamp is None else timestamp)
    result = gpg.sign(payload, binary=True, clearsign=False, passphrase=passphrase,
                      extra_args=["--local-user", signer + "!"])
    if result.status != "signature created" or not result.data:
        raise errors.SigningFailed(
            f"gpg did not sign the image with the primary key {signer}: "
            f"{result.status or 'no signature'} (an image key must be a primary key that can "
            "sign: podman and skopeo accept no subkey)"
        )
    tmp = sig_path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(result.data)
    os.replace(tmp, sig_path)
    return digest


def verify(gpg, sig_path, manifest, reference, pinned):
    """Check the image signature ``sig_path`` for ``manifest`` bytes and ``reference``.

    Returns ``(signing_fingerprint, manifest_digest)``.
    """
    data = require_nonempty(sig_path, "image signature")
    kind = sniff(data)
    if kind != "binary":
        raise errors.WrongFormat(
            f"{sig_path}: format is '{kind}'; an image signature must be a binary OpenPGP signed message"
        )
    result = gpg.decrypt(data)
    statuses = status_lines(result)
    if result.valid and "PLAINTEXT" not in statuses:
        raise errors.WrongFormat(f"{sig_path} carries no signed payload (a detached signature?)")
    signer = check_signer(result, pinned, sig_path, gpg)
    if signer != pinned:
        raise errors.WrongSigner(
            f"{sig_path}: signed by subkey {signer} of {pinned}; podman and skopeo accept only "
            "a signature by the primary key itself (sign with the image key)"
        )
    signed_digest, signed_reference = atomic.parse(result.data)
    algorithm = signed_digest.split(":", 1)[0]
    actual = digest_of(manifest, algorithm)
    if actual != signed_digest:
        raise errors.DigestMismatch(
            f"{sig_path}: signed manifest digest {signed_digest}, but the manifest is {actual}"
        )
    if signed_reference != reference:
        raise errors.ReferenceMismatch(
            f"{sig_path}: signed for {signed_reference!r}, expected {reference!r}"
        )
    return signer, actual
