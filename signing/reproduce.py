"""``make reproduce``: rebuild a release from a clean checkout and compare it byte for byte.

The rebuild runs the tag's own ``make dist`` (and ``make image``) in a fresh clone in a
private directory, so it uses that commit's recipe and ``SOURCE_DATE_EPOCH``. The
comparison is against what the release's signatures cover: the files listed in the
signed ``SHA256SUMS`` and the raw image manifest (whose digest the image signature binds).
"""

import json
import os
import subprocess

from signing import errors, oci, repro, sums

__all__ = ["clone", "rebuild", "base_digest_of", "compare_sums", "compare_image"]


def _run(cmd, log, **kwargs):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise errors.SetupError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); last lines:\n{tail}")
    return proc.stdout


def clone(repo, ref, dest, log):
    """A clean checkout of ``ref`` from ``repo`` at ``dest``; returns the commit id."""
    _run(["git", "clone", "--quiet", "--no-checkout", "--no-hardlinks", repo, dest], log)
    _run(["git", "-C", dest, "checkout", "--quiet", "--detach", ref], log)
    return _run(["git", "-C", dest, "rev-parse", "HEAD"], log).strip()


def rebuild(src, dist, log, image=False, make_vars=()):
    """Run the checkout's own ``make dist`` (and ``make image``) with ``DIST_DIR=dist``."""
    targets = ["dist", "image"] if image else ["dist"]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS",
                                                              "SOURCE_DATE_EPOCH")}
    _run(["make", "--no-print-directory", "-C", src, *targets, f"DIST_DIR={dist}", *make_vars], log, env=env)


def base_digest_of(layout, tag):
    """The base manifest digest an image records in its config label, or None."""
    from signing.image import BASE_LABEL

    manifest = json.loads(oci.manifest_bytes(layout, tag))
    with open(oci.blob_path(layout, manifest["config"]["digest"]), "rb") as fh:
        config = json.load(fh)
    return ((config.get("config") or {}).get("Labels") or {}).get(BASE_LABEL)


def _hint(ours_path, theirs_path, ours, theirs):
    lines = [repro.first_difference(ours, theirs)]
    report = repro.diffoscope(ours_path, theirs_path)
    if report:
        lines += ["diffoscope (rebuild vs release):", *("    " + ln for ln in report.splitlines())]
    return lines


def compare_sums(release_dir, rebuilt_dir, sums_name="SHA256SUMS"):
    """Yield ``(ok, name, message, hint lines)`` for every file the release's sums list."""
    with open(os.path.join(release_dir, sums_name), encoding="utf-8") as fh:
        listed = sums.parse(fh.read(), sums_name)
    for name, digest in sorted(listed.items()):
        ours = os.path.join(rebuilt_dir, name)
        if not os.path.isfile(ours) and name.endswith(".whl") and not name.startswith("xcflushd-"):
            yield True, name, "dependency wheel from the index: not rebuilt, pinned by its sha256", []
            continue
        if not os.path.isfile(ours):
            yield False, name, "the rebuild did not produce it", []
            continue
        actual = sums.sha256_file(ours)
        if actual == digest:
            yield True, name, f"sha256 {digest} rebuilt identically", []
            continue
        theirs = os.path.join(release_dir, name)
        hint = []
        if os.path.isfile(theirs):
            with open(ours, "rb") as a, open(theirs, "rb") as b:
                hint = _hint(ours, theirs, a.read(), b.read())
        yield False, name, f"rebuilt sha256 {actual}, the signed SHA256SUMS says {digest}", hint


def compare_image(release_manifest, rebuilt_manifest, release_layout=None, rebuilt_layout=None):
    """``(ok, name, message, hint lines)`` for the image: the raw manifests must be equal."""
    name = os.path.basename(release_manifest)
    with open(release_manifest, "rb") as fh:
        theirs = fh.read()
    if not os.path.isfile(rebuilt_manifest):
        return False, name, "the rebuild produced no image manifest", []
    with open(rebuilt_manifest, "rb") as fh:
        ours = fh.read()
    if ours == theirs:
        return True, name, f"manifest {oci.digest_of(ours)} (the digest the signature covers) rebuilt identically", []
    message = f"rebuilt manifest {oci.digest_of(ours)}, the release's is {oci.digest_of(theirs)}"
    try:
        a, b = json.loads(ours), json.loads(theirs)
        pairs = [("config", a["config"], b["config"])] + [
            (f"layer {i + 1}", x, y) for i, (x, y) in enumerate(zip(a["layers"], b["layers"]))]
    except (ValueError, KeyError, TypeError):
        return False, name, message, [repro.first_difference(ours, theirs)]
    if len(a["layers"]) != len(b["layers"]):
        return False, name, message, [f"{len(a['layers'])} layers rebuilt, {len(b['layers'])} released"]
    for label, x, y in pairs:
        if x.get("digest") == y.get("digest"):
            continue
        hint = [f"first differing blob: the {label} ({x.get('digest')} rebuilt, {y.get('digest')} released)"]
        if release_layout and rebuilt_layout:
            try:
                ours_path = oci.blob_path(rebuilt_layout, x["digest"])
                theirs_path = oci.blob_path(release_layout, y["digest"])
                with open(ours_path, "rb") as fa, open(theirs_path, "rb") as fb:
                    hint += _hint(ours_path, theirs_path, fa.read(), fb.read())
            except (OSError, errors.VerificationError):
                pass
        return False, name, message, hint
    return False, name, message, ["config and layers identical: the manifest itself differs"]
