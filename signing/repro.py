"""Byte-identical artifacts: normalising archives, and naming where two builds differ.

A build is reproducible when nothing of the building machine or moment gets into the
bytes: every member's mtime is ``SOURCE_DATE_EPOCH``, members are sorted, owned by 0/0
with no user or group names, modes are 0644/0755, and gzip records neither a file name
nor a time. :func:`normalize_tar_gz` rewrites a ``.tar.gz`` that way (the sdist);
:func:`first_difference` says where two artifacts first differ, for ``make reproduce``.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile

__all__ = ["normalize_tar_gz", "gzip_bytes", "tar_members", "first_difference", "diffoscope"]


def gzip_bytes(data, level=9):
    """``data`` gzip-compressed with no file name and mtime 0 in the header."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=level) as gz:
        gz.write(data)
    return out.getvalue()


def _normal(info, epoch):
    info.mtime = epoch
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.pax_headers = {}
    if info.isdir() or info.mode & 0o111:
        info.mode = 0o755
    elif not info.issym():
        info.mode = 0o644
    return info


def normalize_tar_gz(path, epoch):
    """Rewrite the ``.tar.gz`` at ``path`` reproducibly (see the module doc); in place."""
    with tarfile.open(path, "r:gz") as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for info, data in sorted(members, key=lambda m: m[0].name):
            dst.addfile(_normal(info, epoch), io.BytesIO(data) if data is not None else None)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(gzip_bytes(raw.getvalue()))
    os.replace(tmp, path)


def _sha(data):
    return hashlib.sha256(data).hexdigest()[:16]


def tar_members(data):
    """``{name: (header summary, sha256 prefix)}`` of a (possibly gzipped) tar's bytes."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar.getmembers():
            body = tar.extractfile(m).read() if m.isfile() else m.linkname.encode()
            out[m.name] = (f"mode {m.mode:o} owner {m.uid}/{m.gid} {m.uname}/{m.gname} "
                           f"mtime {m.mtime} type {m.type!r}", _sha(body))
    return out


def _zip_members(data):
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for i in zf.infolist():
            out[i.filename] = (f"date {i.date_time} attrs {i.external_attr:o}", _sha(zf.read(i)))
    return out


def _compare_members(ours, theirs):
    if list(ours) != list(theirs):
        missing = [n for n in theirs if n not in ours]
        extra = [n for n in ours if n not in theirs]
        if missing or extra:
            return (f"member {(missing or extra)[0]!r} is only in the "
                    f"{'release' if missing else 'rebuild'}")
        return "the same members in another order"
    for name in ours:
        if ours[name] != theirs[name]:
            (o_head, o_sum), (t_head, t_sum) = ours[name], theirs[name]
            what = "content" if o_sum != t_sum else f"header: release {t_head}, rebuild {o_head}"
            return f"first differing member {name!r} ({what})"
    return "members identical; the container bytes differ (compression or archive headers)"


def first_difference(ours, theirs):
    """One line saying where the rebuilt bytes ``ours`` first differ from ``theirs``."""
    try:
        if ours[:2] == b"PK" and theirs[:2] == b"PK":
            return _compare_members(_zip_members(ours), _zip_members(theirs))
        if ours[:2] == b"\x1f\x8b" or ours[257:262] == b"ustar":
            return _compare_members(tar_members(ours), tar_members(theirs))
        if ours[:1] == b"{" and theirs[:1] == b"{":
            a, b = json.loads(ours), json.loads(theirs)
            keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else []
            for key in keys:
                if a.get(key) != b.get(key):
                    return f"JSON member {key!r} differs"
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, ValueError, KeyError):
        pass
    offset = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
    return f"first differing byte at offset {offset} (sizes {len(ours)} and {len(theirs)})"


def diffoscope(ours_path, theirs_path, limit=40):
    """The first ``limit`` lines of diffoscope's report, or None when it is not installed."""
    tool = shutil.which("diffoscope")
    if tool is None:
        return None
    try:
        proc = subprocess.run([tool, "--no-progress", "--text", "-", ours_path, theirs_path],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "diffoscope took longer than 300 s"
    return "\n".join(proc.stdout.splitlines()[:limit])
