"""Reproducible builds and ``make reproduce``.

Two clean clones of the same commit (git clones of this checkout's HEAD into temporary
directories) must build byte-identical sdist, wheel and image (hence the same
SHA256SUMS and the same manifest digest the image signature covers). ``make reproduce``
must pass on an untouched release and fail, naming the artifact and the first differing
member, when one byte of it changed. The image part reuses the base cached in
IMAGE_CACHE (built by test_signing_image.py, or by the first build here); the second
clone's build shows that it does.
"""

import io
import os
import shutil
import subprocess
import tarfile
import tempfile

import pytest
from signing_helpers import REPO, run_make

from signing import repro

pytestmark = pytest.mark.slow
_IMAGE_TOOLS = ("debootstrap", "umoci", "skopeo", "unshare", "chroot")
CAN_BUILD_IMAGE = os.geteuid() == 0 and all(shutil.which(t) for t in _IMAGE_TOOLS)
needs_image = pytest.mark.skipif(not CAN_BUILD_IMAGE,
                                 reason="building the image needs root and debootstrap, umoci, skopeo")
VENV = os.path.join(REPO, ".venv")


def _git(*args, cwd=REPO):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


HEAD = _git("rev-parse", "HEAD")
VERSION = subprocess.run(["python3", "-c", "import xcflushd; print(xcflushd.__version__)"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip()
IMAGE_NAME = f"xcflushd-image-{VERSION}-1"


def build_clone(parent, targets):
    """A fresh clone of HEAD under ``parent``, built with its own make; returns its dist
    (the build's output is kept beside it, in ``build.log``)."""
    src, dist = os.path.join(parent, "src"), os.path.join(parent, "dist")
    _git("clone", "--quiet", "--no-hardlinks", REPO, src)
    _git("checkout", "--quiet", "--detach", HEAD, cwd=src)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "SOURCE_DATE_EPOCH")}
    proc = subprocess.run(["make", "--no-print-directory", "-C", src, *targets, f"DIST_DIR={dist}",
                           f"VENV={VENV}", f"PY={VENV}/bin/python", f"--old-file={VENV}/.installed"],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(parent, "build.log"), "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    return dist


@pytest.fixture(scope="module", autouse=True)
def venv_untouched():
    """The rebuilds borrow this checkout's venv for their tools: they must not reinstall it
    (a reinstall from a clone pointed the editable install at the clone, since deleted)."""
    stamp = os.path.join(VENV, ".installed")
    before = os.stat(stamp).st_mtime_ns
    yield
    assert os.stat(stamp).st_mtime_ns == before, "a rebuild in a clone reinstalled the checkout's venv"


@pytest.fixture(scope="module")
def two_builds():
    targets = ["dist", "image"] if CAN_BUILD_IMAGE else ["dist"]
    parents = [tempfile.mkdtemp(prefix="clone-") for _ in range(2)]
    try:
        yield [build_clone(p, targets) for p in parents]
    finally:
        for p in parents:
            shutil.rmtree(p, ignore_errors=True)


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


def test_two_clean_clones_build_identical_sums(two_builds):
    a, b = two_builds
    assert _read(os.path.join(a, "SHA256SUMS")) == _read(os.path.join(b, "SHA256SUMS"))
    epoch = int(_git("log", "-1", "--format=%ct", HEAD))
    sdist = _read(os.path.join(a, f"xcflushd-{VERSION}.tar.gz"))
    assert sdist[4:8] == b"\0\0\0\0" and not sdist[3] & 0x08  # gzip: mtime 0, no file name
    with tarfile.open(fileobj=io.BytesIO(sdist)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", epoch)}


@needs_image
def test_two_clean_clones_build_the_same_image(two_builds):
    a, b = (os.path.join(d, IMAGE_NAME) for d in two_builds)
    assert _read(a + ".manifest") == _read(b + ".manifest")  # hence the same signed digest
    assert sorted(os.listdir(os.path.join(a, "blobs", "sha256"))) == \
        sorted(os.listdir(os.path.join(b, "blobs", "sha256")))


@needs_image
def test_the_second_build_reuses_the_cached_base(two_builds):
    # The clones share IMAGE_CACHE (outside any tree): whoever built the base first, the
    # second clone's build only reads it.
    with open(os.path.join(os.path.dirname(two_builds[1]), "build.log")) as fh:
        log = fh.read()
    assert "base: cached" in log and "debootstrap" not in log, log[-3000:]


def _signed_release(dist, key, image_key, image):
    args = [f"DIST_DIR={dist}", f"KEY_ID={key.primary}", f"KEY_FILE={key.public_file}",
            f"SECRET_KEY_FILE={key.secret_file}", f"IMAGE_KEY_ID={image_key.primary}",
            f"IMAGE_KEY_FILE={image_key.public_file}", f"IMAGE_SECRET_KEY_FILE={image_key.secret_file}",
            "TRUST_KEY_FILE=1", f"REPRODUCE_IMAGE={1 if image else 0}"]
    proc = run_make("sign" if image else "sign-dist", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return args


@needs_image
def test_reproduce_passes_on_an_untouched_release_with_its_image(two_builds, release_key, image_key):
    args = _signed_release(two_builds[0], release_key, image_key, image=True)
    proc = run_make("reproduce", f"REF={HEAD}", f"RELEASE_DIR={two_builds[0]}", *args, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passes = [ln for ln in proc.stdout.splitlines() if ln.startswith("PASS") and "rebuilt identically" in ln]
    assert len(passes) == 6, proc.stdout  # sdist, wheel, unit, sysusers, tmpfiles, image manifest
    assert any(IMAGE_NAME + ".manifest" in ln and "the digest the signature covers" in ln for ln in passes)
    assert "Reproduction OK" in proc.stdout


def _change_one_byte_of_a_member(sdist, member_suffix, epoch):
    with tarfile.open(sdist) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name.endswith(member_suffix):
                data = data[:-1] + bytes([data[-1] ^ 1])
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    with open(sdist, "wb") as fh:
        fh.write(repro.gzip_bytes(raw.getvalue()))
    repro.normalize_tar_gz(sdist, epoch)


def test_reproduce_fails_naming_the_artifact_when_one_byte_changed(two_builds, release_key, image_key, tmp_path):
    dist = str(tmp_path / "release")
    shutil.copytree(two_builds[1], dist)
    args = _signed_release(dist, release_key, image_key, image=False)
    proc = run_make("reproduce", f"REF={HEAD}", f"RELEASE_DIR={dist}", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # One byte of one source file changes; the release is re-signed (a compromised build
    # machine signs what it built): every signature checks, only the rebuild tells.
    sdist = os.path.join(dist, f"xcflushd-{VERSION}.tar.gz")
    _change_one_byte_of_a_member(sdist, "/xcflushd/cli.py", int(_git("log", "-1", "--format=%ct", HEAD)))
    args = _signed_release(dist, release_key, image_key, image=False)
    proc = run_make("reproduce", f"REF={HEAD}", f"RELEASE_DIR={dist}", *args)
    assert proc.returncode != 0
    assert "Signature verification OK" in proc.stdout  # the signatures were fine
    fails = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1 and f"xcflushd-{VERSION}.tar.gz" in fails[0], proc.stdout
    assert f"first differing member 'xcflushd-{VERSION}/xcflushd/cli.py' (content)" in proc.stdout
    assert any(ln.startswith("PASS") and ".whl" in ln for ln in proc.stdout.splitlines())
    assert "Reproduction FAILED" in proc.stdout


def test_reproduce_of_an_unknown_ref_fails_clearly(two_builds, release_key, image_key, tmp_path):
    dist = str(tmp_path / "release")
    shutil.copytree(two_builds[1], dist)
    args = _signed_release(dist, release_key, image_key, image=False)
    proc = run_make("reproduce", "REF=no-such-tag-x", f"RELEASE_DIR={dist}", *args)
    assert proc.returncode != 0
    assert "FAIL  rebuild" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
