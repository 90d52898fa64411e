"""``make verify`` fails, with its own message, on every way a release can be wrong.

Each case starts from a release signed by ``make sign`` with the pinned (throw-away) key,
breaks one thing, and checks the exit status, the FAIL line and the FAILED banner.
"""

import json
import os
import subprocess

import pytest
from signing_helpers import REFERENCE, run_make

from signing import atomic, imagesig
from signing.gpghome import open_gpg, stop_agent
from signing.oci import digest_of


def _verify(rel, *targets, **make_vars):
    proc = run_make(*(targets or ("verify",)), *rel.make_vars(**make_vars))
    assert proc.returncode != 0, proc.stdout
    assert "Signature verification FAILED" in proc.stdout
    return proc.stdout


def _fail_line(out, name):
    lines = [ln for ln in out.splitlines() if ln.startswith("FAIL") and name in ln]
    assert lines, out
    return lines[0]


def _write(path, data):
    with open(path, "wb") as fh:
        fh.write(data)


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


def _sign_payload(key, payload, **kwargs):
    """Sign arbitrary bytes with ``key`` (a signed message unless told otherwise)."""
    try:
        result = open_gpg(key.home).sign(payload, extra_args=["--local-user", key.primary],
                                         **kwargs)
        assert result.status == "signature created"
        return result.data
    finally:
        stop_agent(key.home)


# --- SHA256SUMS and its signature -------------------------------------------------------

def test_missing_sums_signature(signed):
    os.unlink(signed.sums_sig)
    line = _fail_line(_verify(signed), "SHA256SUMS.asc")
    assert "is missing" in line


def test_empty_sums_signature(signed):
    _write(signed.sums_sig, b"")
    assert "is empty" in _fail_line(_verify(signed), "SHA256SUMS.asc")


def test_truncated_sums_signature(signed):
    data = _read(signed.sums_sig)
    _write(signed.sums_sig, data[: len(data) // 2])
    assert "no complete OpenPGP signature" in _fail_line(_verify(signed), "SHA256SUMS.asc")


def test_sums_signed_by_another_key(signed, other_key):
    proc = run_make("sign-dist", *signed.make_vars(KEY_ID=other_key.primary,
                                                    SECRET_KEY_FILE=other_key.secret_file))
    assert proc.returncode == 0, proc.stderr
    line = _fail_line(_verify(signed), "SHA256SUMS.asc")
    assert f"not by the pinned key {signed.key.primary}" in line
    assert other_key.subkey[-16:] in line


def test_clearsigned_sums(signed):
    _write(signed.sums_sig, _sign_payload(signed.key, _read(signed.sums), clearsign=True))
    assert "format is 'clearsigned'" in _fail_line(_verify(signed), "SHA256SUMS.asc")


def test_altered_sums_file(signed):
    text = _read(signed.sums).decode()
    _write(signed.sums, text.replace(text[0], "0" if text[0] != "0" else "1", 1).encode())
    assert "BAD signature" in _fail_line(_verify(signed), "SHA256SUMS.asc")


def test_tampered_artifact_fails_alone(signed):
    wheel = signed.artifacts[1]
    with open(wheel, "ab") as fh:
        fh.write(b"evil")
    out = _verify(signed)
    assert "differs from SHA256SUMS" in _fail_line(out, os.path.basename(wheel))
    assert any(ln.startswith("PASS") and os.path.basename(signed.artifacts[0]) in ln
               for ln in out.splitlines())


def test_missing_artifact(signed):
    os.unlink(signed.artifacts[0])
    assert "listed in SHA256SUMS but missing" in _fail_line(_verify(signed), "tar.gz")


def test_artifact_not_listed_in_sums(signed):
    extra = os.path.join(signed.dir, "xcflushd-extra.zip")
    _write(extra, b"x")
    arts = " ".join(signed.artifacts + [extra])
    out = _verify(signed, "verify-dist", ARTIFACTS=arts)
    assert "is not listed in" in _fail_line(out, "xcflushd-extra.zip")


# --- the image signature ----------------------------------------------------------------

def test_missing_image_signature(signed):
    os.unlink(signed.signature)
    assert "image signature" in _fail_line(_verify(signed, "verify-image"), signed.image_dir)


def test_empty_image_signature(signed):
    _write(signed.signature, b"")
    assert "is empty" in _fail_line(_verify(signed, "verify-image"), signed.image_dir)


def test_truncated_image_signature(signed):
    data = _read(signed.signature)
    _write(signed.signature, data[: len(data) - 20])
    line = _fail_line(_verify(signed, "verify-image"), signed.image_dir)
    assert "no complete OpenPGP signature" in line


def test_image_signed_by_another_key(signed, other_image_key):
    proc = run_make("sign-image", *signed.make_vars(IMAGE_KEY_ID=other_image_key.primary,
                                                     IMAGE_SECRET_KEY_FILE=other_image_key.secret_file))
    assert proc.returncode == 0, proc.stderr
    line = _fail_line(_verify(signed, "verify-image"), signed.image_dir)
    assert f"not by the pinned key {signed.image_key.primary}" in line


def test_image_signed_by_a_subkey_is_refused_as_podman_does(signed):
    """A subkey signature is cryptographically fine, but no Debian 12 podman accepts it."""
    payload = atomic.build(digest_of(signed.manifest), REFERENCE, "test", 0)
    _write(signed.signature, _sign_payload(signed.key, payload, binary=True, clearsign=False))
    out = _verify(signed, "verify-image", IMAGE_KEY_ID=signed.key.primary, IMAGE_KEY_FILE=signed.key.public_file)
    line = _fail_line(out, signed.image_dir)
    assert f"signed by subkey {signed.key.subkey} of {signed.key.primary}" in line


def test_signing_the_image_with_a_certify_only_primary_fails_clearly(release):
    proc = run_make("sign-image", *release.make_vars(IMAGE_KEY_ID=release.key.primary,
                                                      IMAGE_SECRET_KEY_FILE=release.key.secret_file))
    assert proc.returncode != 0
    assert f"did not sign the image with the primary key {release.key.primary}" in proc.stderr


def test_lookaside_copy_that_differs_is_refused(signed):
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(signed.sigstore) for f in fs]
    _write(path, _read(path) + b"x")
    assert "differs from" in _fail_line(_verify(signed, "verify-image"), "signature-1")


@pytest.mark.parametrize("kind, options", [
    ("armored message", {"binary": False, "clearsign": False}),
    ("clearsigned", {"clearsign": True}),
])
def test_armored_or_clearsigned_image_signature(signed, kind, options):
    payload = atomic.build(digest_of(signed.manifest), REFERENCE, "test", 0)
    _write(signed.signature, _sign_payload(signed.image_key, payload, **options))
    line = _fail_line(_verify(signed, "verify-image"), signed.image_dir)
    assert f"format is '{kind}'" in line


def test_detached_image_signature(signed):
    payload = atomic.build(digest_of(signed.manifest), REFERENCE, "test", 0)
    _write(signed.signature, _sign_payload(signed.image_key, payload, binary=True, detach=True))
    line = _fail_line(_verify(signed, "verify-image"), signed.image_dir)
    assert "format is 'binary detached signature'" in line


def test_signature_over_another_manifest(signed):
    try:
        imagesig.sign(open_gpg(signed.image_key.home), b'{"schemaVersion":2}', REFERENCE,
                      signed.image_key.primary, signed.signature)
    finally:
        stop_agent(signed.image_key.home)
    line = _fail_line(_verify(signed, "verify-image"), signed.image_dir)
    assert "signed manifest digest" in line


def test_manifest_file_differs_from_the_layout(signed):
    _write(signed.manifest_file, signed.manifest + b" ")
    line = _fail_line(_verify(signed, "verify-image"), signed.image_dir)
    assert "differs from the manifest of" in line


def test_manifest_file_alone_that_does_not_match(signed):
    subprocess.run(["rm", "-rf", signed.image_dir], check=True)
    _write(signed.manifest_file, signed.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":2'))
    line = _fail_line(_verify(signed, "verify-image"), signed.manifest_file)
    assert "signed manifest digest" in line


def test_other_docker_reference(signed):
    out = _verify(signed, "verify-image", TARGET_IMAGE="registry.example.invalid/evil/x:1")
    assert "signed for" in _fail_line(out, signed.image_dir)


def test_tampered_layer_blob(signed):
    layer = json.loads(signed.manifest)["layers"][0]["digest"].split(":")[1]
    path = os.path.join(signed.image_dir, "blobs", "sha256", layer)
    data = bytearray(_read(path))
    data[-1] ^= 1
    _write(path, bytes(data))
    assert "was altered" in _fail_line(_verify(signed, "verify-image"), signed.image_dir)


def test_unknown_critical_member_is_rejected(signed):
    doc = json.loads(atomic.build(digest_of(signed.manifest), REFERENCE, "test", 0))
    doc["critical"]["surprise"] = True
    _write(signed.signature,
           _sign_payload(signed.image_key, json.dumps(doc).encode(), binary=True, clearsign=False))
    line = _fail_line(_verify(signed, "verify-image"), signed.image_dir)
    assert "expected exactly" in line


# --- the key ------------------------------------------------------------------------------

def test_key_file_of_another_key_is_not_imported(signed, other_key):
    proc = run_make("verify", *signed.make_vars(KEY_FILE=other_key.public_file))
    assert proc.returncode != 0
    assert f"not exactly the pinned key {signed.key.primary}" in proc.stdout
    assert "PASS" not in proc.stdout
