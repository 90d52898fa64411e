"""Interoperability with skopeo (Debian's), the reference reader and writer of the format."""

import os
import shutil
import subprocess

import pytest
from signing_helpers import REFERENCE, run_make

from signing.gpghome import private_home, stop_agent

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None,
                                reason="skopeo is not installed (make deps installs it)")


def _skopeo(home, *args):
    env = dict(os.environ, GNUPGHOME=home)  # skopeo takes its keyring only from GNUPGHOME
    try:
        return subprocess.run(["skopeo", *args], env=env, capture_output=True, text=True)
    finally:
        stop_agent(home)


def test_our_signature_passes_skopeo_standalone_verify(signed):
    with private_home() as home:
        subprocess.run(["gpg", "--homedir", home, "--batch", "-q", "--import",
                        signed.image_key.public_file], check=True)
        proc = _skopeo(home, "standalone-verify", signed.manifest_file, REFERENCE,
                       signed.image_key.primary, signed.signature)
        assert proc.returncode == 0, proc.stderr
        assert "Signature verified" in proc.stdout
        digest = _skopeo(home, "manifest-digest", signed.manifest_file).stdout.strip()
        assert digest in proc.stdout
        # Another reference is refused by skopeo too.
        proc = _skopeo(home, "standalone-verify", signed.manifest_file, REFERENCE + "x",
                       signed.image_key.primary, signed.signature)
        assert proc.returncode != 0


def test_release_key_fingerprints_lists_primary_then_subkeys(signed):
    proc = run_make("release-key-fingerprints", *signed.make_vars())
    assert proc.stdout.split() == [signed.key.primary, signed.key.subkey], proc.stdout + proc.stderr


def test_skopeo_standalone_sign_passes_our_verify(release):
    with open(release.manifest_file, "wb") as fh:
        fh.write(release.manifest)
    proc = _skopeo(release.image_key.home, "standalone-sign", release.manifest_file, REFERENCE,
                   release.image_key.primary, "-o", release.signature)
    assert proc.returncode == 0, proc.stderr
    proc = run_make("verify-image", *release.make_vars())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 1 and release.image_key.primary in proc.stdout
