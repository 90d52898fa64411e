"""Building the daemon's OCI image layout without a container engine or a registry.

1. A base layer: a minimal Debian root made by ``debootstrap`` from this machine's own
   apt mirror, pruned, and packed by ``umoci`` into an OCI layout. It is cached outside
   the repository (``cache_dir``) and reused while its inputs are unchanged.
2. The application layer: the base is unpacked, a virtualenv gets the project's wheel and
   its dependency wheels (built on the host) installed offline, in a chroot with no
   network, and ``umoci repack`` records the difference as a second layer.
3. The image config: entrypoint ``xcflushd`` (so ``<image> run ...`` runs ``xcflushd run
   ...``), an unprivileged user, the tag ``<TAG>-<REL>`` and the base's manifest digest
   (label ``org.opencontainers.image.base.digest``).

Reproducible: given the same cached base, two builds of one commit give the same bytes.
Every time recorded is ``SOURCE_DATE_EPOCH`` (file mtimes of what the install touched,
history and config dates); the install runs with it set, so Python writes hash-checked
``.pyc`` files and ``useradd`` dates the shadow entry with it.
"""

import contextlib
import fcntl
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time

from signing import errors, oci, wheelhouse

__all__ = ["BASE_PACKAGES", "VENV", "UID", "BASE_LABEL", "base_layout", "build", "prune_rootfs",
           "chroot_cmd", "clamp_times", "rfc3339"]

BASE_PACKAGES = ("python3", "ca-certificates")
"""Debian packages added to debootstrap's ``minbase`` variant."""
VENV = "/opt/xcflushd"
"""Where the daemon's virtualenv lives in the image."""
UID = 10001
"""The unprivileged user (and group) id the image runs as."""
BASE_LABEL = "org.opencontainers.image.base.digest"
"""Config label recording the manifest digest of the base the image was built on."""
_BASE_FORMAT = 1  # bump when the base recipe changes, so caches are rebuilt
_PRUNE = ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
          "var/log/*.log", "var/log/apt/*", "dev/*", "tmp/*", "root/.cache")
_BLANK = ("etc/resolv.conf", "etc/hostname", "etc/machine-id")


def _run(cmd, **kwargs):
    try:
        return subprocess.run(cmd, check=True, **kwargs)
    except FileNotFoundError:
        raise errors.SetupError(f"{cmd[0]} is not installed (run make deps)") from None


def chroot_cmd(rootfs, argv, user=None, env=()):
    """A command running ``argv`` in ``rootfs``: own mount namespace with /dev and /proc,
    no network, an environment of only ``env`` (no host ``PIP_*`` settings leak in)."""
    inner = (f'mount --rbind /dev "$0/dev" && mount -t proc proc "$0/proc" && '
             f'exec chroot {"--userspec=" + user + " " if user else ""}"$0" "$@"')
    return ["unshare", "--mount", "--net", "--fork", "sh", "-c", inner, rootfs,
            "env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root", "LANG=C.UTF-8", *env] + list(argv)


def prune_rootfs(rootfs):
    """Drop caches, logs, device nodes and host-specific files from a bootstrapped root."""
    for pattern in _PRUNE:
        for path in glob.glob(os.path.join(rootfs, pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    for name in _BLANK:
        path = os.path.join(rootfs, name)
        if os.path.lexists(path):
            os.unlink(path)
            open(path, "w").close()
    # The building machine's mirror is not the user's business: leave apt unconfigured.
    for path in [os.path.join(rootfs, "etc/apt/sources.list")] + glob.glob(
            os.path.join(rootfs, "etc/apt/sources.list.d/*")):
        if os.path.isfile(path):
            with open(path, "w") as fh:
                fh.write("# Add your apt sources here; the image was built offline.\n")


def rfc3339(epoch):
    """``epoch`` seconds as the UTC time stamp OCI configs use."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def clamp_times(rootfs, since, epoch):
    """Set to ``epoch`` the mtime of every path changed (ctime) at or after ``since``.

    Only what the install touched: untouched base files keep their times, so they stay
    out of the application layer. Returns how many paths were set.
    """
    count = 0
    for top, dirs, files in os.walk(rootfs):
        for name in dirs + files:
            path = os.path.join(top, name)
            if os.lstat(path).st_ctime >= since:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
                count += 1
    if os.lstat(rootfs).st_ctime >= since:
        os.utime(rootfs, (epoch, epoch))
    return count


def _base_key(suite, packages):
    text = f"{_BASE_FORMAT}|{suite}|{platform.machine()}|{','.join(sorted(packages))}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(cache_dir):
    """Serialise base builds of concurrent runs sharing ``cache_dir``."""
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def base_layout(cache_dir, suite, mirror, packages=BASE_PACKAGES, log=print):
    """Path of the cached base OCI layout (tag ``base``), bootstrapping it if needed.

    The mirror is not part of the cache key: any mirror of ``suite`` gives the same base.
    """
    with _locked(cache_dir):
        return _base_layout(cache_dir, suite, mirror, packages, log)


def _base_layout(cache_dir, suite, mirror, packages, log):
    final = os.path.join(cache_dir, f"base-{suite}-{_base_key(suite, packages)}")
    if os.path.isfile(os.path.join(final, "complete")):
        log(f"base: cached {final}")
        return os.path.join(final, "layout")
    work = tempfile.mkdtemp(prefix="base-", dir=cache_dir)
    try:
        rootfs = os.path.join(work, "rootfs")
        log(f"base: debootstrap {suite} from {mirror} (about a minute)")
        _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages),
              suite, rootfs, mirror], stdout=subprocess.DEVNULL)
        prune_rootfs(rootfs)
        layout, bundle = os.path.join(work, "layout"), os.path.join(work, "bundle")
        _run(["umoci", "init", "--layout", layout])
        _run(["umoci", "new", "--image", layout + ":base"])
        _run(["umoci", "unpack", "--image", layout + ":base", bundle])
        os.rmdir(os.path.join(bundle, "rootfs"))
        os.rename(rootfs, os.path.join(bundle, "rootfs"))
        _run(["umoci", "repack", "--history.created_by", f"debootstrap --variant=minbase {suite}",
              "--image", layout + ":base", bundle])
        shutil.rmtree(bundle)
        open(os.path.join(work, "complete"), "w").close()
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(work, final)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work)
    return os.path.join(final, "layout")


def _install_script(requirement):
    return (
        "set -e\n"
        f"python3 -m venv --without-pip {VENV}\n"
        f'{VENV}/bin/python "$(ls /tmp/wheels/pip-*.whl)/pip" install --no-index --no-cache-dir '
        f"--disable-pip-version-check -q --find-links /tmp/wheels '{requirement}'\n"
        f"groupadd --gid {UID} xcflushd\n"
        f"useradd --no-log-init --uid {UID} --gid {UID} --home-dir /nonexistent --no-create-home "
        "--shell /usr/sbin/nologin xcflushd\n"
        "rm -rf /tmp/wheels /root/.cache\n"
    )


def build(project_wheel, layout, tag, cache_dir, suite, mirror, version, epoch,
          base_digest=None, log=print):
    """Build the OCI layout ``layout`` holding the image ``tag``; return its manifest bytes.

    ``epoch`` is SOURCE_DATE_EPOCH; ``base_digest``, when given, pins the base: a cached
    base with another manifest digest is refused rather than silently built on.
    """
    base = base_layout(cache_dir, suite, mirror, log=log)
    have = oci.digest_of(oci.manifest_bytes(base, "base"))
    if base_digest and have != base_digest:
        raise errors.SetupError(
            f"the base is pinned to {base_digest}, but the cached base {base} is {have}: "
            "bring that base into IMAGE_CACHE (or drop BASE_DIGEST to build on this one)")
    log(f"base: {have}")
    created = rfc3339(epoch)
    work = tempfile.mkdtemp(prefix="image-", dir=cache_dir)
    try:
        if os.path.exists(layout):
            shutil.rmtree(layout)
        shutil.copytree(base, layout)
        bundle = os.path.join(work, "bundle")
        _run(["umoci", "unpack", "--image", layout + ":base", bundle])
        rootfs = os.path.join(bundle, "rootfs")
        since = time.time()
        env = [f"SOURCE_DATE_EPOCH={epoch}"]
        environment = wheelhouse.environment_of(chroot_cmd(rootfs, ["python3"], env=env))
        house = os.path.join(rootfs, "tmp", "wheels")
        log(f"image: wheels for Python {environment['python_full_version']} into the image")
        wheelhouse.build(project_wheel, house, environment)
        log("image: installing offline into " + VENV)
        _run(chroot_cmd(rootfs, ["sh", "-c", _install_script(f"xcflushd=={version}")], env=env))
        clamp_times(rootfs, since, epoch)
        _run(["umoci", "repack", "--history.created_by", f"pip install xcflushd=={version}",
              "--history.created", created, "--image", f"{layout}:{tag}", bundle])
        _run(["umoci", "config", "--image", f"{layout}:{tag}", "--created", created,
              "--config.entrypoint", f"{VENV}/bin/xcflushd",
              "--config.user", f"{UID}:{UID}", "--config.workingdir", "/",
              "--config.env", f"PATH={VENV}/bin:/usr/local/bin:/usr/bin:/bin",
              "--config.env", "LANG=C.UTF-8", "--config.env", "PYTHONUNBUFFERED=1",
              "--config.label", "org.opencontainers.image.title=xcflushd",
              "--config.label", f"org.opencontainers.image.version={version}",
              "--config.label", f"{BASE_LABEL}={have}",
              "--history.created_by", "entrypoint xcflushd", "--history.created", created])
        _run(["umoci", "rm", "--image", layout + ":base"])
        _run(["umoci", "gc", "--layout", layout])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return oci.manifest_bytes(layout, tag)
