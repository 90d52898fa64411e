"""One exception per way a release can fail to sign or verify.

Every verification failure is a :class:`VerificationError`; its message names the file
and the reason, and is what ``make verify`` prints after ``FAIL``. Problems with the
operator's setup (no key, gpg failing) are :class:`SetupError`, which is not a verdict
on an artifact.
"""

__all__ = [
    "SigningError", "SetupError", "SigningFailed",
    "VerificationError", "MissingFile", "EmptyFile", "CorruptSignature", "WrongFormat",
    "BadSignature", "WrongSigner", "UnusableKey", "ChecksumMismatch", "NotListed",
    "MalformedSums", "MalformedPayload", "DigestMismatch", "ReferenceMismatch",
    "ManifestMismatch", "BlobMismatch", "KeyFileMismatch",
]


class SigningError(Exception):
    """Root of everything this package raises on purpose."""


class SetupError(SigningError):
    """The environment cannot do the job: no key source, gpg missing, bad arguments."""


class SigningFailed(SetupError):
    """gpg did not create a signature (no secret key, wrong passphrase, ...)."""


class KeyFileMismatch(SetupError):
    """A key file or keyring does not hold exactly the pinned key; nothing was imported."""


class VerificationError(SigningError):
    """An artifact or signature failed verification."""


class MissingFile(VerificationError):
    """A file that verification needs does not exist."""


class EmptyFile(VerificationError):
    """A signature or sums file is empty."""


class CorruptSignature(VerificationError):
    """gpg found no complete OpenPGP signature (truncated or garbage)."""


class WrongFormat(VerificationError):
    """A signature is of the wrong kind (clearsigned, armored where binary is required, ...)."""


class BadSignature(VerificationError):
    """The signature does not match the signed data (the data was altered)."""


class WrongSigner(VerificationError):
    """The signature was made by a key other than the pinned one."""


class UnusableKey(VerificationError):
    """The pinned key made the signature but is expired or revoked."""


class ChecksumMismatch(VerificationError):
    """An artifact's SHA-256 differs from the one in SHA256SUMS."""


class NotListed(VerificationError):
    """An expected artifact is absent from SHA256SUMS."""


class MalformedSums(VerificationError):
    """SHA256SUMS has a line that is not ``<64 hex>  <file name>``."""


class MalformedPayload(VerificationError):
    """A validly signed image signature whose JSON payload breaks the format."""


class DigestMismatch(VerificationError):
    """The signed manifest digest is not the image's manifest digest."""


class ReferenceMismatch(VerificationError):
    """The signed docker reference is not the expected one."""


class ManifestMismatch(VerificationError):
    """The manifest file and the image layout disagree, or the layout lacks the tag."""


class BlobMismatch(VerificationError):
    """A blob of the image layout does not hash to the digest that names it."""
