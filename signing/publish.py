"""What operators need to check the image with their own tools (podman, skopeo, CRI-O).

containers/image looks signatures up in a "lookaside" store next to the registry:
``<lookaside URL>/<repository path>@<algorithm>=<hex>/signature-<n>``, where the repository
path is the reference without its registry (``3scale/xcflushd``), so one tree serves the
image under every registry name with that path. It accepts a signature only if a
``policy.json`` ``signedBy`` rule names the key (by primary fingerprint only, in Debian
12's containers/image) and the signed reference matches the pulled one, literally or
through ``remapIdentity``. This module writes the tree, an example policy and a
``registries.d`` file for a release.
"""

import json
import os
import re

from signing import errors

__all__ = ["split_reference", "lookaside_path", "write_lookaside", "policy", "registries_d",
           "write_examples"]

_REFERENCE_RE = re.compile(r"^([a-z0-9.-]+(?::[0-9]+)?)/([a-z0-9._/-]+?)(?::([A-Za-z0-9_.-]+))?$")


def split_reference(reference):
    """``registry/path:tag`` -> ``(registry, path, tag)``; a digest reference is refused."""
    match = _REFERENCE_RE.match(reference or "")
    if not match or "//" in match.group(2):
        raise errors.SetupError(f"image reference {reference!r} is not registry/repository[:tag]")
    return match.groups()


def lookaside_path(reference, digest, index=1):
    """The path of signature ``index`` of manifest ``digest`` inside a lookaside tree."""
    _registry, path, _tag = split_reference(reference)
    algorithm, _, hexdigest = digest.partition(":")
    return f"{path}@{algorithm}={hexdigest}/signature-{index}"


def write_lookaside(root, reference, digest, signature):
    """Write ``signature`` bytes as the first signature of ``digest`` under ``root``."""
    path = os.path.join(root, lookaside_path(reference, digest))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(signature)
    os.replace(tmp, path)
    return path


def policy(reference, key_path, aliases=()):
    """A reject-by-default ``policy.json`` accepting the image signed by the key at
    ``key_path``, under its signed name and under each of ``aliases`` (other names of the
    same repository: ``docker.io/...``, a mirror) through ``remapIdentity``."""
    registry, path, _tag = split_reference(reference)
    signed = f"{registry}/{path}"
    rule = {"type": "signedBy", "keyType": "GPGKeys", "keyPath": key_path}
    scopes = {signed: [rule]}
    for alias in aliases:
        if alias != signed:
            scopes[alias] = [dict(rule, signedIdentity={
                "type": "remapIdentity", "prefix": alias, "signedPrefix": signed})]
    return {"default": [{"type": "reject"}], "transports": {"docker": scopes}}


def registries_d(reference, lookaside_url, aliases=()):
    """A ``registries.d`` YAML document pointing every name of the image at the store."""
    registry, path, _tag = split_reference(reference)
    names = [f"{registry}/{path}", *[a for a in aliases if a != f"{registry}/{path}"]]
    lines = ["# Where podman, skopeo and CRI-O look up the signatures of the xcflushd image.",
             "docker:"]
    for name in names:
        lines += [f"  {name}:", f"    lookaside: {lookaside_url}"]
    return "\n".join(lines) + "\n"


def write_examples(policy_file, registries_dir, reference, key_path, lookaside_url, aliases=()):
    """Write the example ``policy.json`` and ``registries.d/xcflushd.yaml``."""
    with open(policy_file, "w", encoding="utf-8") as fh:
        json.dump(policy(reference, key_path, aliases), fh, indent=2)
        fh.write("\n")
    os.makedirs(registries_dir, exist_ok=True)
    with open(os.path.join(registries_dir, "xcflushd.yaml"), "w", encoding="utf-8") as fh:
        fh.write(registries_d(reference, lookaside_url, aliases))
