"""Fixtures for the release signing tests (helpers live in :mod:`signing_helpers`)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # whatever pytest's import mode
from signing_helpers import Release, drop_key, make_key, make_layout, run_make  # noqa: E402


@pytest.fixture(scope="session")
def release_key():
    key = make_key("Release")
    yield key
    drop_key(key)


@pytest.fixture(scope="session")
def other_key():
    key = make_key("Intruder")
    yield key
    drop_key(key)


@pytest.fixture(scope="session")
def image_key():
    key = make_key("Image", image=True)
    yield key
    drop_key(key)


@pytest.fixture(scope="session")
def other_image_key():
    key = make_key("Impostor", image=True)
    yield key
    drop_key(key)


@pytest.fixture(scope="session")
def protected_key():
    key = make_key("Protected", passphrase="correct horse")
    yield key
    drop_key(key)


@pytest.fixture
def release(tmp_path, release_key, image_key):
    """An unsigned fake release in a temporary directory."""
    rel = Release(str(tmp_path / "dist"), release_key, b"", image_key)
    os.makedirs(rel.dir)
    for art in rel.artifacts:
        with open(art, "wb") as fh:
            fh.write(os.urandom(2048))
    rel.manifest = make_layout(rel.image_dir)
    return rel


@pytest.fixture
def signed(release):
    """The fake release signed with ``make sign`` (SHA256SUMS.asc and the image signature)."""
    proc = run_make("sign", *release.make_vars())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return release
