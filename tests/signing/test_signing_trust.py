"""Trust edge cases of ``make verify``, each with real GnuPG keys: a signature that is
cryptographically good but must not be trusted is refused with one FAIL line naming the
key and the date: an expired signing subkey, a revoked subkey, a revoked primary, a
subkey not bound to the pinned primary, a signature dated in the future."""

import os
import shutil
import subprocess
import tempfile
import time

import pytest
from signing_helpers import Key, Release, drop_key, make_key, run_make

from signing import sums

TODAY = time.strftime("%Y-%m-%d", time.gmtime())


def _gpg(home, *args, faked=None, **kwargs):
    extra = ["--faked-system-time", faked] if faked else []
    return subprocess.run(["gpg", "--homedir", home, "--batch", "--yes", "-q", "--pinentry-mode", "loopback",
                           "--passphrase", "", *extra, *args], check=True, capture_output=True, **kwargs)


def _fprs(home):
    out = _gpg(home, "--with-colons", "--list-keys", text=True).stdout
    return [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")]


@pytest.fixture
def key():
    k = make_key("Trust")
    yield k
    drop_key(k)


def _release(tmp_path, key):
    rel = Release(str(tmp_path / "dist"), key, b"")
    os.makedirs(rel.dir)
    for art in rel.artifacts:
        with open(art, "wb") as fh:
            fh.write(os.urandom(512))
    sums.write(rel.artifacts, rel.sums)
    return rel


def _sign_sums(rel, home, signer, faked=None):
    _gpg(home, "--local-user", signer + "!", "--armor", "--detach-sign", "-o", rel.sums_sig, rel.sums,
         faked=faked)


def _export(key):
    with open(key.public_file, "wb") as fh:
        fh.write(_gpg(key.home, "--armor", "--export", key.primary).stdout)


def _fail_line(rel):
    proc = run_make("verify-dist", *rel.make_vars())
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL") and "SHA256SUMS.asc" in ln]
    assert len(lines) == 1, proc.stdout
    assert "Signature verification FAILED" in proc.stdout
    print(lines[0])  # shown with -s: what an operator reads
    return lines[0]


def test_a_good_signature_passes_first(tmp_path, key):
    """The control: the same steps without the twist pass."""
    rel = _release(tmp_path, key)
    _sign_sums(rel, key.home, key.subkey)
    assert run_make("verify-dist", *rel.make_vars()).returncode == 0


def test_expired_signing_subkey(tmp_path, key):
    """A subkey made and used in 2020 that expired a day later: its signature is refused now."""
    home = tempfile.mkdtemp(prefix="g", dir="/tmp")
    os.chmod(home, 0o700)
    try:
        _gpg(home, "--quick-generate-key", "Old <old@example.invalid>", "ed25519", "cert", "never",
             faked="20200101T000000")
        primary = _fprs(home)[0]
        _gpg(home, "--quick-add-key", primary, "ed25519", "sign", "1d", faked="20200101T000000")
        expiring = _fprs(home)[1]
        old = Key(primary, expiring, home, key.public_file, key.secret_file, "")
        rel = _release(tmp_path, old)
        _sign_sums(rel, home, expiring, faked="20200101T120000")
        _export(old)
        line = _fail_line(rel)
        assert expiring in line and "expired on 2020-01-02" in line
        assert "signed on 2020-01-01 12:00:" in line
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_revoked_subkey(tmp_path, key):
    rel = _release(tmp_path, key)
    _sign_sums(rel, key.home, key.subkey)
    _gpg(key.home, "--command-fd", "0", "--edit-key", key.primary,
         input=b"key 1\nrevkey\ny\n0\n\ny\nsave\n")
    _export(key)
    line = _fail_line(rel)
    assert key.subkey in line and f"that key was revoked on {TODAY}" in line
    assert f"signed on {TODAY}" in line


def test_revoked_primary(tmp_path, key):
    rel = _release(tmp_path, key)
    _sign_sums(rel, key.home, key.subkey)
    with open(os.path.join(key.home, "openpgp-revocs.d", f"{key.primary}.rev")) as fh:
        certificate = fh.read().replace(":-----BEGIN", "-----BEGIN")
    _gpg(key.home, "--import", input=certificate.encode())
    _export(key)
    line = _fail_line(rel)
    assert f"its primary key {key.primary} was revoked on {TODAY}" in line and key.subkey in line


def _packets(data):
    """Split binary OpenPGP data into ``(tag, bytes)`` packets (old and new headers)."""
    out, i = [], 0
    while i < len(data):
        ctb = data[i]
        if ctb & 0x40:  # new format
            tag, first = ctb & 0x3F, data[i + 1]
            if first < 192:
                head, length = 2, first
            elif first < 224:
                head, length = 3, ((first - 192) << 8) + data[i + 2] + 192
            else:
                head, length = 6, int.from_bytes(data[i + 2:i + 6], "big")
        else:
            tag, kind = (ctb >> 2) & 0x0F, ctb & 3
            size = {0: 1, 1: 2, 2: 4}[kind]
            head, length = 1 + size, int.from_bytes(data[i + 1:i + 1 + size], "big")
        out.append((tag, data[i:i + head + length]))
        i += head + length
    return out


def test_a_subkey_not_bound_to_the_pinned_primary(tmp_path, key):
    """A key file with the pinned primary and an attacker's subkey (bound by the attacker's
    primary): gpg drops the subkey, and its signature is refused as another key's."""
    attacker = make_key("Mallory")
    try:
        rel = _release(tmp_path, key)
        _sign_sums(rel, attacker.home, attacker.subkey)
        theirs = _packets(_gpg(attacker.home, "--export", attacker.primary).stdout)
        sub = [i for i, (tag, _) in enumerate(theirs) if tag == 14][0]
        grafted = _gpg(key.home, "--export", key.primary).stdout + theirs[sub][1] + theirs[sub + 1][1]
        with open(key.public_file, "wb") as fh:
            fh.write(grafted)
        line = _fail_line(rel)
        assert attacker.subkey[-16:] in line and f"signed on {TODAY}" in line
        assert f"nor a subkey bound to it: not by the pinned key {key.primary}" in line
    finally:
        drop_key(attacker)


def test_a_signature_dated_in_the_future(tmp_path, key):
    rel = _release(tmp_path, key)
    _sign_sums(rel, key.home, key.subkey, faked="20300101T000000!")
    line = _fail_line(rel)
    assert key.subkey in line and "is dated 2030-01-01 00:00:" in line and "in the future" in line
