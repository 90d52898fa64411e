"""The pure parts: payload format, sums format, signature sniffing, mirror and wheel logic."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signing import atomic, errors, mirror, openpgp, sums, wheelhouse
from signing.keys import normalize_fingerprint

DIGEST = "sha256:" + "ab" * 32
ZERO = "0" * 64
REPO = Path(__file__).resolve().parents[2]


@given(reference=st.text(min_size=1), timestamp=st.integers(0, 2**40),
       creator=st.text(), hexdigest=st.binary(min_size=32, max_size=32))
def test_payload_round_trip(reference, timestamp, creator, hexdigest):
    digest = "sha256:" + hexdigest.hex()
    assert atomic.parse(atomic.build(digest, reference, creator, timestamp)) == (digest, reference)


def _doc():
    return json.loads(atomic.build(DIGEST, "r/x:1", "c", 1))


@pytest.mark.parametrize("mutate, phrase", [
    (lambda d: d.update(extra=1), "expected exactly"),
    (lambda d: d["critical"].update(extra=1), "expected exactly"),
    (lambda d: d["critical"]["image"].update(extra=1), "expected exactly"),
    (lambda d: d["critical"]["identity"].pop("docker-reference"), "expected exactly"),
    (lambda d: d["critical"].update(type="other"), "not supported"),
    (lambda d: d["critical"]["image"].update({"docker-manifest-digest": "md5:00"}), "malformed"),
    (lambda d: d["critical"]["identity"].update({"docker-reference": ""}), "malformed"),
    (lambda d: d["optional"].update(timestamp="now"), "not an integer"),
    (lambda d: d.update(optional=[]), "not a JSON object"),
])
def test_payload_is_parsed_strictly(mutate, phrase):
    doc = _doc()
    mutate(doc)
    with pytest.raises(errors.MalformedPayload, match=phrase):
        atomic.parse(json.dumps(doc).encode())


def test_payload_unknown_optional_members_are_fine():
    doc = _doc()
    doc["optional"]["whatever"] = {"x": 1}
    assert atomic.parse(json.dumps(doc).encode()) == (DIGEST, "r/x:1")


def test_payload_duplicate_members_and_garbage_are_rejected():
    text = atomic.build(DIGEST, "r/x:1", "c", 1).decode()
    with pytest.raises(errors.MalformedPayload):
        atomic.parse(text.replace('{"critical":', '{"optional":{},"critical":', 1).encode())
    with pytest.raises(errors.MalformedPayload, match="not JSON"):
        atomic.parse(b"\xff\x00")


def test_sums_render_parse(tmp_path):
    (tmp_path / "b.whl").write_bytes(b"b")
    (tmp_path / "a.tar.gz").write_bytes(b"a")
    text = sums.render([str(tmp_path / "b.whl"), str(tmp_path / "a.tar.gz")])
    assert text.splitlines()[0].endswith("  a.tar.gz")
    assert sums.parse(text)["b.whl"] == sums.sha256_file(str(tmp_path / "b.whl"))


@pytest.mark.parametrize("text, phrase", [
    ("", "lists no file"),
    ("abc  x\n", "is not '<sha256>  <file>'"),
    (ZERO + "  ../etc/passwd\n", "not a bare file name"),
    (ZERO + "  /etc/passwd\n", "not a bare file name"),
    (ZERO + "  a\n" + ZERO + "  a\n", "twice"),
])
def test_sums_parse_refuses(text, phrase):
    with pytest.raises(errors.MalformedSums, match=phrase):
        sums.parse(text)


@pytest.mark.parametrize("data, kind", [
    (b"", "empty"),
    (b"-----BEGIN PGP SIGNED MESSAGE-----\n", "clearsigned"),
    (b"\n-----BEGIN PGP SIGNATURE-----\n", "armored signature"),
    (b"-----BEGIN PGP MESSAGE-----\n", "armored message"),
    (b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n", "armored"),
    (b"\xa3\x01", "binary"),        # old-format compressed data packet
    (b"\x90\x0d", "binary"),        # old-format one-pass signature packet
    (b"\x89\x01", "binary detached signature"),  # old-format signature packet
    (b"\xc2\x01", "binary detached signature"),  # new-format signature packet
    (b"{}", "not OpenPGP"),
])
def test_sniff(data, kind):
    assert openpgp.sniff(data) == kind


def test_fingerprints_must_be_full():
    fpr = "12426DBDA493E9610FD62F77FD9E4A15BA3C357C"
    assert normalize_fingerprint("0x" + fpr.lower()) == fpr
    assert normalize_fingerprint("1242 6DBD A493 E961 0FD6  2F77 FD9E 4A15 BA3C 357C") == fpr
    for bad in (fpr[-16:], fpr[-8:], fpr + "00", "Z" * 40):
        with pytest.raises(errors.SetupError, match="full 40-hex"):
            normalize_fingerprint(bad)


def test_mirror_from_deb822_and_one_line_sources():
    deb822 = ("Types: deb deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm "
              "bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://sec.invalid/ds\n"
              "Suites: bookworm-security\n\nEnabled: no\nTypes: deb\nURIs: http://off.invalid\n"
              "Suites: trixie\n")
    entries = mirror.parse_deb822(deb822)
    assert mirror.pick(entries, "bookworm") == "http://mirror.invalid/debian"
    with pytest.raises(errors.SetupError, match="trixie"):
        mirror.pick(entries, "trixie")  # the disabled stanza does not count
    one = "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://one.invalid/debian bookworm main\n"
    assert mirror.pick(mirror.parse_one_line(one), "bookworm") == "http://one.invalid/debian"


def test_this_machines_mirror_is_found():
    suite = mirror.codename()
    assert mirror.pick(mirror.read_entries(), suite).startswith(("http://", "https://", "file:"))


def _wheel(path, name, requires):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1\n"
        meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
        zf.writestr(f"{name}-1.dist-info/METADATA", meta)
    (path / f"{name}-1-py3-none-any.whl").write_bytes(buf.getvalue())


def test_wheelhouse_tops_up_what_the_image_interpreter_needs(tmp_path):
    _wheel(tmp_path, "redis", ['async-timeout>=4.0.3; python_full_version < "3.11.3"',
                               "hiredis; extra == 'hiredis'"])
    _wheel(tmp_path, "app", ["redis>=4.5", 'tomli; python_version < "3.11"'])
    env = {"python_full_version": "3.11.2", "python_version": "3.11", "os_name": "posix",
           "sys_platform": "linux", "platform_machine": "x86_64",
           "implementation_name": "cpython"}
    assert wheelhouse.missing(str(tmp_path), env) == ["async-timeout>=4.0.3"]
    env.update(python_full_version="3.11.7")
    assert wheelhouse.missing(str(tmp_path), env) == []


def test_wheelhouse_refuses_another_python_minor(tmp_path):
    with pytest.raises(errors.SetupError, match="Python 3.99"):
        wheelhouse.build("x.whl", str(tmp_path), {"python_version": "3.99"}, run=None)


def _house(tmp_path):
    """xcflushd's shape: redis needs async-timeout below 3.11.3 only (Debian 12 has 3.11.2)."""
    house = tmp_path / "dist"
    house.mkdir()
    _wheel(house, "redis", ['async-timeout>=4.0.3; python_full_version < "3.11.3"'])
    _wheel(house, "app", ["redis>=4.5"])
    return house


def _check(house, version):
    return subprocess.run([sys.executable, "-m", "signing", "wheelhouse", "--check", "--house", str(house),
                           "--python-version", version], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_wheelhouse_check_names_what_the_nodes_python_lacks(tmp_path):
    # Resolved by a builder's 3.11.7, the house lacks what the nodes' 3.11.2 needs.
    house = _house(tmp_path)
    assert _check(house, "3.11.7").returncode == 0
    proc = _check(house, "3.11.2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  async-timeout>=4.0.3: needed on Python 3.11.2, no wheel for it" in proc.stdout
    assert "Traceback" not in proc.stderr
    _wheel(house, "async_timeout", [])
    assert _check(house, "3.11.2").returncode == 0


def test_wheelhouse_check_refuses_a_wheel_built_for_another_python(tmp_path):
    house = _house(tmp_path)
    _wheel(house, "async_timeout", [])
    _wheel(house, "hiredis", [])
    (house / "hiredis-1-py3-none-any.whl").rename(house / "hiredis-1-cp312-cp312-manylinux_2_17_x86_64.whl")
    proc = _check(house, "3.11.2")
    assert proc.returncode == 1
    assert "hiredis-1-cp312-cp312-manylinux_2_17_x86_64.whl: not installable on Python 3.11.2" in proc.stdout
    (house / "broken-1-py3-none-any.whl").write_bytes(b"not a zip")
    proc = _check(house, "3.11.2")
    assert proc.returncode == 2 and "broken-1-py3-none-any.whl: not a wheel" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sign_dist_checks_the_wheelhouse_before_signing(tmp_path):
    house = _house(tmp_path)
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "-o", ".venv/.signing", "sign-dist",
                           f"DIST_DIR={house}", f"PY={sys.executable}", f"SECRET_KEY_FILE={tmp_path / 'no-key.asc'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "async-timeout>=4.0.3: needed on Python 3.11.2" in proc.stdout, proc.stdout + proc.stderr
    assert not (house / "SHA256SUMS.asc").exists()
