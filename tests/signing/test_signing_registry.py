"""The release as operators consume it: pushed to a registry (Debian's docker-registry on
loopback), pulled by Debian's skopeo and podman under the release's own example
``policy.json`` (reject by default, signedBy the image key) and ``registries.d`` (the
lookaside tree ``make sign`` wrote). A good signature is accepted; a tampered one, one by
another key, one by the release subkey, one over another digest, and none are refused."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest
from signing_helpers import IMAGE_TAG, REFERENCE, make_layout, run_make
from xcftest import free_port

from signing import atomic
from signing.gpghome import open_gpg, stop_agent
from signing.oci import digest_of

_TOOLS = ("docker-registry", "skopeo")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(shutil.which(t) is None and not os.path.exists(f"/usr/bin/{t}") for t in _TOOLS),
                       reason=f"needs {', '.join(_TOOLS)} (make deps installs them)"),
]


@pytest.fixture(scope="module")
def registry():
    """docker-registry serving a temporary filesystem store on a free loopback port."""
    root = tempfile.mkdtemp(prefix="registry-")
    port = free_port()
    config = os.path.join(root, "config.yml")
    with open(config, "w") as fh:
        fh.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                 f"    rootdirectory: {root}/data\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("docker-registry did not come up")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)


class Published:
    """A fake release signed by ``make sign`` and pushed to the loopback registry."""

    def __init__(self, rel, registry, tmp):
        self.rel, self.tmp, self.cleanup = rel, tmp, []
        self.name = f"{registry}/3scale/xcflushd"
        self.pulled = f"{self.name}:{IMAGE_TAG}"
        self.key_path = os.path.join(tmp, "image-key.asc")
        proc = run_make("sign", *rel.make_vars(
            LOOKASIDE_URL=f"file://{rel.sigstore}", POLICY_KEY_PATH=self.key_path,
            IMAGE_PUBLIC_KEY=self.key_path, IMAGE_ALIASES=f"docker.io/3scale/xcflushd {self.name}"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self.policy, self.registries_d = rel.path("policy.json"), rel.path("registries.d")
        (self.lookaside,) = [os.path.join(d, f) for d, _, fs in os.walk(rel.sigstore) for f in fs]
        self.push(rel.image_dir)

    def push(self, layout):
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{IMAGE_TAG}",
                        f"docker://{self.pulled}"], check=True, capture_output=True)

    def skopeo_pull(self):
        out = tempfile.mkdtemp(dir=self.tmp)
        return subprocess.run(["skopeo", "copy", "--policy", self.policy, "--registries.d", self.registries_d,
                               "--src-tls-verify=false", f"docker://{self.pulled}", f"dir:{out}"],
                              capture_output=True, text=True, timeout=120)

    def podman_pull(self):
        home = tempfile.mkdtemp(dir=self.tmp)  # podman reads registries.d from $HOME/.config
        shutil.copytree(self.registries_d, os.path.join(home, ".config", "containers", "registries.d"))
        store = tempfile.mkdtemp(prefix="p", dir="/tmp")  # podman wants a short runroot
        self.cleanup.append(store)
        return subprocess.run(["podman", "--root", f"{store}/root", "--runroot", f"{store}/run",
                               "--storage-driver", "vfs", "--events-backend", "none", "pull",
                               "--tls-verify=false", "--signature-policy", self.policy, f"docker://{self.pulled}"],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, HOME=home))


@pytest.fixture
def published(release, registry, tmp_path):
    pub = Published(release, registry, str(tmp_path))
    yield pub
    for path in pub.cleanup:  # vfs layers are read-only directories: shutil copes, as root
        shutil.rmtree(path, ignore_errors=True)


def _refused(proc):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "rejected" in proc.stderr or "not accepted" in proc.stderr or "Invalid" in proc.stderr, proc.stderr
    return proc.stderr


def _sign(key, digest, fpr):
    payload = atomic.build(digest, REFERENCE, "test", int(time.time()))
    try:
        result = open_gpg(key.home).sign(payload, binary=True, clearsign=False,
                                         extra_args=["--local-user", fpr + "!"])
        assert result.status == "signature created"
        return result.data
    finally:
        stop_agent(key.home)


def test_the_examples_say_what_the_readme_says(published):
    with open(published.policy) as fh:
        policy = json.load(fh)
    assert policy["default"] == [{"type": "reject"}]
    rules = policy["transports"]["docker"]
    signed_name = REFERENCE.rsplit(":", 1)[0]
    assert rules[signed_name] == [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": published.key_path}]
    assert rules["docker.io/3scale/xcflushd"][0]["signedIdentity"] == {
        "type": "remapIdentity", "prefix": "docker.io/3scale/xcflushd", "signedPrefix": signed_name}
    digest = digest_of(published.rel.manifest)
    assert published.lookaside.endswith(f"3scale/xcflushd@sha256={digest.split(':')[1]}/signature-1")


def test_a_policy_checked_skopeo_pull_accepts_the_release(published):
    proc = published.skopeo_pull()
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("podman") is None or os.geteuid() != 0,
                    reason="podman with vfs storage in a temporary root needs root here")
def test_a_policy_checked_podman_pull_accepts_the_release_and_refuses_a_tampered_one(published):
    proc = published.podman_pull()
    assert proc.returncode == 0, proc.stderr
    with open(published.lookaside, "r+b") as fh:
        data = bytearray(fh.read())
        data[-8] ^= 1
        fh.seek(0)
        fh.write(data)
    _refused(published.podman_pull())


def test_a_tampered_signature_is_refused(published):
    with open(published.lookaside, "r+b") as fh:
        data = bytearray(fh.read())
        data[-8] ^= 1
        fh.seek(0)
        fh.write(data)
    _refused(published.skopeo_pull())


def test_a_signature_by_another_key_is_refused(published, other_image_key):
    with open(published.lookaside, "wb") as fh:
        fh.write(_sign(other_image_key, digest_of(published.rel.manifest), other_image_key.primary))
    _refused(published.skopeo_pull())


def test_a_signature_by_a_subkey_is_refused_as_the_issue_measured(published):
    """Why images are signed by a primary: even a policy naming the release key refuses its
    subkey's signature (containers/image before 5.36 matches primary fingerprints only)."""
    with open(published.policy) as fh:
        text = fh.read()
    with open(published.policy, "w") as fh:
        fh.write(text.replace(json.dumps(published.key_path), json.dumps(published.rel.key.public_file)))
    with open(published.lookaside, "wb") as fh:
        fh.write(_sign(published.rel.key, digest_of(published.rel.manifest), published.rel.key.subkey))
    assert f"Signature by key {published.rel.key.subkey} is not accepted" in _refused(published.skopeo_pull())


def test_a_signature_over_another_digest_is_refused(published, tmp_path):
    """Another image under the tag, with the good signature of the first moved to its path."""
    other = str(tmp_path / "other-layout")
    manifest = make_layout(other, content=b"evil\n")
    published.push(other)
    new_path = published.lookaside.replace(digest_of(published.rel.manifest).split(":")[1],
                                           digest_of(manifest).split(":")[1])
    os.makedirs(os.path.dirname(new_path))
    shutil.copy(published.lookaside, new_path)
    _refused(published.skopeo_pull())


def test_an_unsigned_image_is_refused(published):
    os.unlink(published.lookaside)
    _refused(published.skopeo_pull())
