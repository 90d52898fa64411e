"""Helpers for the release signing tests: throw-away keys, fake releases, running make.

Imported by name (``from signing_helpers import ...``) rather than from ``conftest``,
whose module name other test directories share. Keys are made fresh per session in
private homes under /tmp (short paths for the agent socket): a certify-only ed25519
primary with an ed25519 signing subkey, like the real release key. Nothing here reads
or writes ~/.gnupg.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

IMAGE_TAG = "1.2.3-4"
REFERENCE = "registry.example.invalid/3scale/xcflushd:1.2.3-4"


def _gpg(home, *args, **kwargs):
    return subprocess.run(["gpg", "--homedir", home, "--batch", "-q", "--pinentry-mode",
                           "loopback", *args], check=True, capture_output=True, **kwargs)


@dataclass
class Key:
    """A throw-away release key: fingerprints, its home, exported public and secret files."""

    primary: str
    subkey: str
    home: str
    public_file: str
    secret_file: str
    passphrase: str


def make_key(name, passphrase="", image=False):
    """Generate a certify-only primary with a signing subkey in a new private home, or with
    ``image``, an image key: a primary that signs itself and has no subkey."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed (make deps installs gnupg)")
    home = tempfile.mkdtemp(prefix="g", dir="/tmp")
    os.chmod(home, 0o700)
    _gpg(home, "--passphrase", passphrase, "--quick-generate-key",
         f"{name} <{name.lower()}@example.invalid>", "ed25519", "sign,cert" if image else "cert",
         "never")
    out = _gpg(home, "--with-colons", "--list-keys", text=True).stdout
    primary = [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")][0]
    if not image:
        _gpg(home, "--passphrase", passphrase, "--quick-add-key", primary, "ed25519", "sign", "never")
    out = _gpg(home, "--with-colons", "--list-keys", text=True).stdout
    fprs = [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")] + [""]
    files = tempfile.mkdtemp(prefix="k", dir="/tmp")
    public_file, secret_file = os.path.join(files, f"{primary}.asc"), os.path.join(files, "sec.asc")
    with open(public_file, "wb") as fh:
        fh.write(_gpg(home, "--armor", "--export", primary).stdout)
    with open(secret_file, "wb") as fh:
        fh.write(_gpg(home, "--armor", "--passphrase", passphrase,
                      "--export-secret-keys", primary).stdout)
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)
    return Key(primary, fprs[1], home, public_file, secret_file, passphrase)


def drop_key(key):
    subprocess.run(["gpgconf", "--homedir", key.home, "--kill", "all"], check=False)
    shutil.rmtree(key.home, ignore_errors=True)
    shutil.rmtree(os.path.dirname(key.public_file), ignore_errors=True)


def _tar_gz(files):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue(), gzip.compress(raw.getvalue(), mtime=0)


def _blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as fh:
        fh.write(data)
    return f"sha256:{digest}", len(data)


def make_layout(layout, tag=IMAGE_TAG, content=b"hello\n"):
    """A small but valid one-layer OCI image layout; returns the raw manifest bytes."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    with open(os.path.join(layout, "oci-layout"), "w") as fh:
        json.dump({"imageLayoutVersion": "1.0.0"}, fh)
    tar, tgz = _tar_gz({"etc/greeting": content})
    layer_digest, layer_size = _blob(layout, tgz)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }).encode()
    config_digest, config_size = _blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_size}],
    }).encode()
    manifest_digest, manifest_size = _blob(layout, manifest)
    with open(os.path.join(layout, "index.json"), "w") as fh:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag}}]}, fh)
    return manifest


@dataclass
class Release:
    """A fake release directory: two artifacts and an image layout, with make variables."""

    dir: str
    key: Key
    manifest: bytes
    image_key: Key = None

    @property
    def artifacts(self):
        return [os.path.join(self.dir, "xcflushd-1.2.3.tar.gz"),
                os.path.join(self.dir, "xcflushd-1.2.3-py3-none-any.whl")]

    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def sums(self):
        return self.path("SHA256SUMS")

    @property
    def sums_sig(self):
        return self.path("SHA256SUMS.asc")

    @property
    def image_dir(self):
        return self.path(f"xcflushd-image-{IMAGE_TAG}")

    @property
    def manifest_file(self):
        return self.path(f"xcflushd-image-{IMAGE_TAG}.manifest")

    @property
    def sigstore(self):
        return self.path("sigstore")

    @property
    def signature(self):
        return self.path(f"xcflushd-image-{IMAGE_TAG}.signature")

    def make_vars(self, **extra):
        """make command-line variables that point every knob at this release."""
        values = {
            "DIST_DIR": self.dir, "VERSION": "1.2.3", "TAG": "1.2.3", "REL": "4",
            "TARGET_IMAGE": REFERENCE, "KEY_ID": self.key.primary,
            "KEY_FILE": self.key.public_file, "SECRET_KEY_FILE": self.key.secret_file,
            "GNUPGHOME": "", "TRUST_KEY_FILE": "1",
        }
        if self.image_key:
            values.update(IMAGE_KEY_ID=self.image_key.primary, IMAGE_KEY_FILE=self.image_key.public_file,
                          IMAGE_SECRET_KEY_FILE=self.image_key.secret_file)
        values.update(extra)
        return [f"{k}={v}" for k, v in values.items()]


def run_make(*args, env=None, timeout=600):
    """Run ``make -C <repo> ARGS`` with HOME pointed at an empty directory."""
    home = tempfile.mkdtemp(prefix="h", dir="/tmp")
    full_env = dict(os.environ, HOME=home)
    full_env.pop("GNUPGHOME", None)
    full_env.pop("MAKEFLAGS", None)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(["make", "--no-print-directory", "-C", REPO, *args],
                              env=full_env, capture_output=True, text=True, timeout=timeout)
        proc.home_used = os.path.exists(os.path.join(home, ".gnupg"))
        return proc
    finally:
        shutil.rmtree(home, ignore_errors=True)
