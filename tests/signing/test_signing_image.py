"""``make image``: a real OCI layout of the daemon, readable by skopeo, signable, runnable.

Builds once per module into a temporary DIST_DIR. The debootstrapped base is cached under
IMAGE_CACHE (outside the repository), so only the first run on a machine pays for it
(test_signing_repro.py checks that a second build reuses it).
"""

import json
import os
import shutil
import subprocess

import pytest
from signing_helpers import REPO, run_make

from signing import oci
from signing.gpghome import open_gpg, stop_agent
from signing.image import UID, chroot_cmd

_TOOLS = ("debootstrap", "umoci", "skopeo", "unshare", "chroot")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="building an image needs root (debootstrap, chroot)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in _TOOLS),
                       reason=f"needs {', '.join(_TOOLS)} (make deps installs them)"),
]


def _version():
    return subprocess.run(["python3", "-c", "import xcflushd; print(xcflushd.__version__)"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


class Built:
    def __init__(self, dist):
        self.dist, self.version = dist, _version()
        self.tag = f"{self.version}-1"
        self.layout = os.path.join(dist, f"xcflushd-image-{self.tag}")
        self.manifest_file = self.layout + ".manifest"
        self.signature = self.layout + ".signature"

    def build(self):
        proc = run_make("image", f"DIST_DIR={self.dist}", timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return self


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return Built(str(tmp_path_factory.mktemp("image") / "dist")).build()


def test_layout_is_readable_by_skopeo_with_the_manifest_written_beside_it(built):
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{built.layout}:{built.tag}"],
                         capture_output=True, check=True).stdout
    with open(built.manifest_file, "rb") as fh:
        assert fh.read() == raw == oci.manifest_bytes(built.layout, built.tag)
    assert len(json.loads(raw)["layers"]) == 2  # the cached base, then the application
    config = json.loads(subprocess.run(
        ["skopeo", "inspect", "--config", f"oci:{built.layout}:{built.tag}"],
        capture_output=True, check=True).stdout)["config"]
    assert config["Entrypoint"] == ["/opt/xcflushd/bin/xcflushd"]
    assert config["User"] == f"{UID}:{UID}"


def test_signed_digest_is_the_layout_manifest_digest(built, release_key, image_key):
    args = [f"DIST_DIR={built.dist}", f"KEY_ID={release_key.primary}",
            f"KEY_FILE={release_key.public_file}", f"SECRET_KEY_FILE={release_key.secret_file}",
            f"IMAGE_KEY_ID={image_key.primary}", f"IMAGE_KEY_FILE={image_key.public_file}",
            f"IMAGE_SECRET_KEY_FILE={image_key.secret_file}", "TRUST_KEY_FILE=1"]
    proc = run_make("sign-image", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skopeo_digest = subprocess.run(["skopeo", "manifest-digest", built.manifest_file],
                                   capture_output=True, text=True, check=True).stdout.strip()
    with open(built.signature, "rb") as fh:
        try:
            payload = json.loads(open_gpg(image_key.home).decrypt(fh.read()).data)
        finally:
            stop_agent(image_key.home)
    assert payload["critical"]["image"]["docker-manifest-digest"] == skopeo_digest
    proc = run_make("verify-image", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert skopeo_digest in proc.stdout and "blobs intact" in proc.stdout


def _run_entrypoint(built, bundle, *args):
    subprocess.run(["umoci", "unpack", "--image", f"{built.layout}:{built.tag}", bundle],
                   check=True, capture_output=True)
    with open(os.path.join(bundle, "config.json")) as fh:
        process = json.load(fh)["process"]  # the runtime spec umoci derived from the image
    user = f"{process['user']['uid']}:{process['user']['gid']}"
    return subprocess.run(chroot_cmd(os.path.join(bundle, "rootfs"), process["args"] + list(args),
                                     user=user), capture_output=True, text=True)


def test_the_image_runs_xcflushd_version_as_its_entrypoint(built, tmp_path):
    proc = _run_entrypoint(built, str(tmp_path / "bundle"), "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"xcflushd {built.version}"


def test_the_image_takes_xcflushd_run_arguments(built, tmp_path):
    proc = _run_entrypoint(built, str(tmp_path / "bundle"), "run", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "{run,flush," in proc.stdout

