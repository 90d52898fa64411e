"""The "atomic container signature" payload (what ``skopeo standalone-sign`` signs).

``{"critical": {"identity": {"docker-reference": REF}, "image": {"docker-manifest-digest":
DIGEST}, "type": "atomic container signature"}, "optional": {"creator": ..., "timestamp": N}}``

Parsing is strict, as the format requires: exactly those members in ``critical``
(an unknown one means reject), only ``critical`` and ``optional`` at the top.
Parse only after the signature was found valid and made by the pinned key.
"""

import json
import re

from signing import errors

__all__ = ["SIGNATURE_TYPE", "build", "parse"]

SIGNATURE_TYPE = "atomic container signature"
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})$")


def build(manifest_digest, reference, creator, timestamp):
    """Compact JSON bytes of a payload binding ``manifest_digest`` to ``reference``."""
    doc = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": SIGNATURE_TYPE,
        },
        "optional": {"creator": creator, "timestamp": int(timestamp)},
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate member {key!r}")
        obj[key] = value
    return obj


def _exact(obj, members, where):
    if not isinstance(obj, dict):
        raise errors.MalformedPayload(f"{where} is not a JSON object")
    if set(obj) != set(members):
        raise errors.MalformedPayload(
            f"{where} has members {sorted(obj)}, expected exactly {sorted(members)}"
        )
    return obj


def parse(payload):
    """Return ``(manifest_digest, docker_reference)`` from signed payload bytes."""
    try:
        doc = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise errors.MalformedPayload(f"signed payload is not JSON: {exc}") from None
    _exact(doc, ("critical", "optional"), "payload")
    critical = _exact(doc["critical"], ("type", "image", "identity"), "critical")
    if critical["type"] != SIGNATURE_TYPE:
        raise errors.MalformedPayload(f"signature type {critical['type']!r} is not supported")
    image = _exact(critical["image"], ("docker-manifest-digest",), "critical.image")
    identity = _exact(critical["identity"], ("docker-reference",), "critical.identity")
    digest, reference = image["docker-manifest-digest"], identity["docker-reference"]
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise errors.MalformedPayload(f"manifest digest {digest!r} is malformed")
    if not isinstance(reference, str) or not reference:
        raise errors.MalformedPayload(f"docker reference {reference!r} is malformed")
    optional = doc["optional"]
    if not isinstance(optional, dict):
        raise errors.MalformedPayload("optional is not a JSON object")
    if "creator" in optional and not isinstance(optional["creator"], str):
        raise errors.MalformedPayload("optional.creator is not a string")
    if "timestamp" in optional and (
        not isinstance(optional["timestamp"], int) or isinstance(optional["timestamp"], bool)
    ):
        raise errors.MalformedPayload("optional.timestamp is not an integer")
    return digest, reference
