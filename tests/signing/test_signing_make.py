"""``make sign`` then ``make verify``: the happy paths, key sources, and hygiene."""

import os
import subprocess

from signing_helpers import REFERENCE, REPO, run_make

from signing.gpghome import private_home, stop_agent

VARIABLES = ("TAG", "REL", "KEY_ID", "KEY_FILE", "TRUST_KEY_FILE", "GNUPGHOME", "MANIFEST",
             "SIGNATURE", "TARGET_IMAGE", "SUMS", "SUMS_SIGNATURE", "ARTIFACTS", "IMAGE_DIR",
             "SECRET_KEY_FILE", "PASSPHRASE_FILE", "FETCH_KEY", "KEYSERVER", "IMAGE_CACHE")


def _agents():
    """Pids of live gpg-agents (zombies already exited; init reaps them when it will)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,comm="], capture_output=True, text=True).stdout
    return {pid for pid, stat, comm in (ln.split(None, 2) for ln in out.splitlines())
            if comm.strip() == "gpg-agent" and not stat.startswith("Z")}


def _agent_home(pid):
    """The home a gpg-agent serves (its --homedir, else its GNUPGHOME), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
    except OSError:
        return "/"  # exited meanwhile: not an orphan
    if "--homedir" in argv[:-1]:
        return argv[argv.index("--homedir") + 1]
    return environ.get("GNUPGHOME", os.path.join(environ.get("HOME", "/"), ".gnupg"))


def test_info_lists_every_variable_with_its_value():
    proc = run_make("info", "TAG=9.8.7", "REL=5", "TRUST_KEY_FILE=1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in VARIABLES:
        assert any(ln.startswith(f"* {name} = ") for ln in lines), name
    assert "* TAG = 9.8.7" in lines and "* REL = 5" in lines
    assert "* SIGNATURE = dist/xcflushd-image-9.8.7-5.signature" in lines
    with open(os.path.join(REPO, "signing", "RELEASE_KEY_FINGERPRINT")) as fh:
        pinned = fh.read().strip()
    assert f"* KEY_ID = {pinned}" in lines
    assert f"* KEY_FILE = signing/{pinned}.asc" in lines


def test_default_tag_is_the_package_version_and_rel_is_1():
    version = subprocess.run(["python3", "-c", "import xcflushd; print(xcflushd.__version__)"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    lines = run_make("info").stdout.splitlines()
    assert f"* TAG = {version}" in lines and "* REL = 1" in lines


def test_sign_then_verify_passes_with_one_line_per_artifact(signed):
    assert os.path.getsize(signed.sums_sig) > 0 and os.path.getsize(signed.signature) > 0
    with open(signed.manifest_file, "rb") as fh:
        assert fh.read() == signed.manifest  # sign wrote the manifest file from the layout
    proc = run_make("verify", *signed.make_vars())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passes = [ln for ln in proc.stdout.splitlines() if ln.startswith("PASS")]
    assert len(passes) == 5, proc.stdout  # SHA256SUMS.asc, two artifacts, the image, its lookaside copy
    assert any(signed.image_dir in ln and REFERENCE in ln for ln in passes)
    assert signed.key.subkey in passes[0]  # the signing subkey made the sums signature ...
    assert f"signed by the primary key {signed.image_key.primary}" in passes[3]  # ... a primary the image's
    assert "FAIL" not in proc.stdout and "Signature verification OK" in proc.stdout


def test_the_sums_file_is_what_sha256sum_checks(signed):
    proc = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=signed.dir,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.count(": OK") == 2, proc.stdout


def test_the_sums_signature_is_what_gpg_verifies(signed):
    proc = subprocess.run(["gpg", "--homedir", signed.key.home, "--status-fd", "1", "--verify",
                           signed.sums_sig, signed.sums], capture_output=True, text=True)
    assert proc.returncode == 0 and "VALIDSIG" in proc.stdout


def test_verify_with_the_key_from_a_keyring(signed):
    with private_home() as home:  # an operator's keyring: both public keys imported
        for key in (signed.key, signed.image_key):
            subprocess.run(["gpg", "--homedir", home, "--batch", "-q", "--import", key.public_file],
                           check=True, capture_output=True)
        stop_agent(home)
        proc = run_make("verify", *signed.make_vars(TRUST_KEY_FILE="0", GNUPGHOME=home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"keyring {home}" not in proc.stdout  # the keyring is only read


def test_sign_with_the_secret_key_from_a_keyring(release):
    proc = run_make("sign", *release.make_vars(SECRET_KEY_FILE="", GNUPGHOME=release.key.home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_make("verify", *release.make_vars()).returncode == 0


def test_sign_with_a_passphrase_file(release, protected_key, tmp_path):
    release.key = protected_key
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(protected_key.passphrase + "\n")
    bad.write_text("wrong\n")
    proc = run_make("sign", *release.make_vars(PASSPHRASE_FILE=str(bad)))
    assert proc.returncode != 0 and "did not sign" in proc.stderr, proc.stdout + proc.stderr
    proc = run_make("sign", *release.make_vars(PASSPHRASE_FILE=str(good)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_make("verify", *release.make_vars()).returncode == 0


def test_verify_without_a_key_source_says_how_to_get_one(signed):
    proc = run_make("verify", *signed.make_vars(TRUST_KEY_FILE="0"))
    assert proc.returncode != 0
    assert "FAIL  release key  no source for the public key" in proc.stdout
    assert "TRUST_KEY_FILE=1" in proc.stdout


def test_keyserver_only_when_asked_and_its_failure_is_clear(signed):
    # A closed loopback port stands in for an unreachable keyserver.
    proc = run_make("verify", *signed.make_vars(TRUST_KEY_FILE="0", FETCH_KEY="1",
                                                KEYSERVER="hkp://127.0.0.1:9"))
    assert proc.returncode != 0
    assert f"FAIL  release key  could not fetch {signed.key.primary}" in proc.stdout


def test_sign_without_a_secret_key_fails_clearly(release):
    proc = run_make("sign", *release.make_vars(SECRET_KEY_FILE=""))
    assert proc.returncode != 0 and "no secret key" in proc.stderr


def test_sign_refuses_a_key_file_holding_only_the_public_key(release):
    proc = run_make("sign", *release.make_vars(SECRET_KEY_FILE=release.key.public_file))
    assert proc.returncode != 0 and "no secret key" in proc.stderr


def test_short_key_ids_are_refused(signed):
    proc = run_make("verify", *signed.make_vars(KEY_ID=signed.key.primary[-16:]))
    assert proc.returncode != 0 and "not a full 40-hex fingerprint" in proc.stderr


def test_no_agent_left_running_and_home_gnupg_untouched(release):
    before = _agents()
    signed = run_make("sign", *release.make_vars())
    verified = run_make("verify", *release.make_vars())
    assert signed.returncode == 0 and verified.returncode == 0
    # Other test files (in other workers) start agents of their own, with live homes; an
    # agent of ours that outlived make sign/verify serves a private home already removed.
    orphans = {pid for pid in _agents() - before if not os.path.isdir(_agent_home(pid))}
    assert not orphans, "a gpg-agent outlived make sign/verify"
    assert not signed.home_used and not verified.home_used, "~/.gnupg was created"
