"""Reading an OCI image layout: the raw manifest of a tag, its digest, its blobs.

The manifest digest is ``sha256:`` + sha256 of the raw manifest bytes exactly as stored
under ``blobs/``; any re-serialisation would change it, so bytes are never re-encoded.
"""

import hashlib
import json
import os
import re

from signing import errors

__all__ = ["REF_NAME", "digest_of", "manifest_bytes", "check_blobs", "blob_path"]

REF_NAME = "org.opencontainers.image.ref.name"
_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_DIGEST_RE = re.compile(r"^(sha256|sha384|sha512):([0-9a-f]+)$")
_CHUNK = 1 << 20


def digest_of(data, algorithm="sha256"):
    """``algorithm:hex`` digest of ``data`` bytes."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def blob_path(layout, digest):
    """Path of the blob named ``digest`` in ``layout``; refuse malformed digests."""
    match = _DIGEST_RE.match(digest or "")
    if not match:
        raise errors.ManifestMismatch(f"{layout}: malformed blob digest {digest!r}")
    return os.path.join(layout, "blobs", match.group(1), match.group(2))


def _file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def manifest_bytes(layout, tag):
    """The raw manifest bytes that ``tag`` names in the OCI layout ``layout``."""
    index_path = os.path.join(layout, "index.json")
    if not os.path.isfile(index_path):
        raise errors.MissingFile(f"{layout} is not an OCI image layout (no index.json)")
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    found = [m for m in index.get("manifests", [])
             if (m.get("annotations") or {}).get(REF_NAME) == tag]
    if len(found) != 1:
        raise errors.ManifestMismatch(
            f"{layout}: {len(found)} manifests tagged {tag!r} (expected exactly one)"
        )
    desc = found[0]
    if desc.get("mediaType") not in _MANIFEST_TYPES:
        raise errors.ManifestMismatch(
            f"{layout}:{tag} is a {desc.get('mediaType')}, not a single image manifest"
        )
    path = blob_path(layout, desc["digest"])
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise errors.MissingFile(f"{layout}: manifest blob {desc['digest']} is missing") from None
    algorithm = desc["digest"].split(":", 1)[0]
    if digest_of(data, algorithm) != desc["digest"] or len(data) != desc.get("size"):
        raise errors.BlobMismatch(f"{layout}: manifest blob does not match {desc['digest']}")
    return data


def check_blobs(layout, manifest):
    """Raise unless the config and every layer of ``manifest`` are in ``layout``, intact."""
    try:
        doc = json.loads(manifest)
        descriptors = [doc["config"]] + list(doc["layers"])
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.ManifestMismatch(f"{layout}: manifest is not an image manifest: {exc}") from None
    for desc in descriptors:
        path = blob_path(layout, desc.get("digest"))
        if not os.path.isfile(path):
            raise errors.MissingFile(f"{layout}: blob {desc['digest']} is missing")
        algorithm = desc["digest"].split(":", 1)[0]
        if os.path.getsize(path) != desc.get("size") or _file_digest(path, algorithm) != desc["digest"]:
            raise errors.BlobMismatch(f"{layout}: blob {desc['digest']} was altered")
    return len(descriptors)
