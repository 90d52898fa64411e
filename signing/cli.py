"""Command line: ``python -m signing {sums,sign,verify,image,fingerprints}``.

The only module that parses arguments, prints verdicts or exits. ``verify`` prints one
``PASS`` or ``FAIL`` line per artifact and exits 1 if anything failed (2 when it could not
even start, e.g. no usable public key).
"""

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

from signing import (
    PINNED_FINGERPRINT_FILE,
    detached,
    errors,
    image,
    imagesig,
    keys,
    mirror,
    oci,
    publish,
    repro,
    reproduce,
    sums,
    wheelhouse,
)
from signing.gpghome import open_gpg, private_home, user_home

__all__ = ["main", "build_parser"]

BANNER = "*" * 66


def _read_passphrase(path):
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().rstrip("\r\n")


def _key_id(args):
    return keys.normalize_fingerprint(args.key_id) if args.key_id else keys.read_pinned(
        PINNED_FINGERPRINT_FILE)


def _add_image_args(p):
    p.add_argument("--image-key-id", help="full fingerprint of the image-signing primary key "
                   "(default: --key-id)")
    p.add_argument("--sigstore", help="lookaside signature tree (<repo>@sha256=<hex>/signature-1)")
    p.add_argument("--image-dir", help="OCI image layout directory")
    p.add_argument("--tag", help="tag of the image in the layout (TAG-REL)")
    p.add_argument("--manifest", help="raw image manifest file")
    p.add_argument("--signature", help="image signature file")
    p.add_argument("--reference", help="docker reference the signature binds (TARGET_IMAGE)")


def build_parser():
    """The argument parser (exposed for tests and ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m signing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sign = sub.add_parser("sign", help="write SHA256SUMS(.asc) and/or the image signature")
    sign.add_argument("--key-id", help="full fingerprint of the signing key (default: pinned)")
    sign.add_argument("--gnupghome", help="keyring holding the secret key")
    sign.add_argument("--secret-key-file",
                      help="secret key file, imported into a private temporary home")
    sign.add_argument("--passphrase-file", help="file whose first line is the passphrase")
    sign.add_argument("--sums", help="SHA256SUMS to write and sign")
    sign.add_argument("--sums-signature", help="detached signature to write (SUMS.asc)")
    sign.add_argument("--artifact", action="append", default=[], help="file to list in SUMS")
    _add_image_args(sign)
    sign.add_argument("--image-secret-key-file", help="secret image key file (default: "
                      "--secret-key-file when the image key is the release key)")
    sign.add_argument("--policy", help="write an example policy.json here")
    sign.add_argument("--registries-d", help="write an example registries.d/xcflushd.yaml here")
    sign.add_argument("--policy-key-path", help="where operators keep the image key (keyPath)")
    sign.add_argument("--lookaside-url", help="where the signature tree will be published")
    sign.add_argument("--alias", action="append", default=[],
                      help="another name of the repository (docker.io/..., a mirror)")
    sign.add_argument("--image-public-key", help="export the image public key here")

    verify = sub.add_parser("verify", help="verify SHA256SUMS, artifacts and the image")
    verify.add_argument("--key-id", help="pinned full fingerprint (default: the repo's)")
    src = verify.add_mutually_exclusive_group()
    src.add_argument("--key-file", help="public key file (its fingerprint must be the pinned)")
    src.add_argument("--gnupghome", help="keyring to take the public key from (only read)")
    src.add_argument("--keyserver", help="fetch the key from this keyserver")
    verify.add_argument("--sums", help="SHA256SUMS to verify")
    verify.add_argument("--sums-signature", help="its detached signature")
    verify.add_argument("--artifact", action="append", default=[],
                        help="file that must be listed in SUMS and match it")
    _add_image_args(verify)
    verify.add_argument("--image-key-file", help="public image key file (its fingerprint must "
                        "be the pinned image key's; default: --key-file for the release key)")

    img = sub.add_parser("image", help="build the OCI image layout of the daemon")
    img.add_argument("--wheel", required=True, help="the project's wheel")
    img.add_argument("--version", required=True, help="the project's version")
    img.add_argument("--image-dir", required=True, help="OCI layout to (re)create")
    img.add_argument("--tag", required=True, help="tag in the layout (TAG-REL)")
    img.add_argument("--manifest", help="also write the raw manifest here")
    img.add_argument("--cache-dir", required=True, help="where the base is cached")
    img.add_argument("--suite", help="Debian suite (default: this machine's)")
    img.add_argument("--mirror", help="Debian mirror (default: this machine's apt source)")
    img.add_argument("--epoch", required=True, type=int, help="SOURCE_DATE_EPOCH: every time recorded")
    img.add_argument("--base-digest", help="refuse a cached base whose manifest digest differs")

    sums_p = sub.add_parser("sums", help="write SHA256SUMS for the artifacts")
    sums_p.add_argument("--out", required=True, help="the sums file to write")
    sums_p.add_argument("artifacts", nargs="+", help="files to list (one directory)")

    rep = sub.add_parser("reproduce", help="rebuild a release from a clean checkout and compare")
    rep.add_argument("--repo", required=True, help="git repository to clone")
    rep.add_argument("--ref", required=True, help="tag or commit to rebuild")
    rep.add_argument("--release-dir", required=True, help="the release: SHA256SUMS, manifest, ...")
    rep.add_argument("--sums", default="SHA256SUMS", help="name of the sums file in it")
    rep.add_argument("--image-name", required=True, help="IMAGE_NAME (layout and manifest names)")
    rep.add_argument("--image-tag", required=True, help="tag in the layout (TAG-REL)")
    rep.add_argument("--image", choices=("0", "1"), default="0", help="rebuild and compare the image")
    rep.add_argument("--make-var", action="append", default=[], help="VAR=value for the rebuild")
    rep.add_argument("--keep", action="store_true", help="keep the private build directory")

    norm = sub.add_parser("normalize", help="rewrite .tar.gz archives reproducibly, in place")
    norm.add_argument("--epoch", required=True, type=int, help="SOURCE_DATE_EPOCH: every mtime")
    norm.add_argument("archives", nargs="+", help=".tar.gz files (the sdist)")

    house = sub.add_parser("wheelhouse", help="top up and check the dependency wheels for the nodes' Python")
    house.add_argument("--house", required=True, help="the directory of the wheels (DIST_DIR)")
    house.add_argument("--python-version", required=True, help="the nodes' Python, X.Y.Z (Debian 12: 3.11.2)")
    house.add_argument("--check", action="store_true", help="only check: add nothing")

    fpr = sub.add_parser("fingerprints", help="print the fingerprints of the pinned key")
    fpr.add_argument("--key-id", help="pinned full fingerprint (default: the repo's)")
    fpr.add_argument("--key-file", required=True, help="public key file")
    return parser


def _image_manifest(args, write_file=False):
    """Manifest bytes from the layout and/or the manifest file; they must agree."""
    from_layout = from_file = None
    if args.image_dir and os.path.isdir(args.image_dir):
        from_layout = oci.manifest_bytes(args.image_dir, args.tag)
    if args.manifest and os.path.isfile(args.manifest):
        with open(args.manifest, "rb") as fh:
            from_file = fh.read()
    if from_layout is None and from_file is None:
        raise errors.MissingFile(
            f"neither the image layout {args.image_dir} nor the manifest {args.manifest} exists"
        )
    if from_layout is not None and from_file is not None and from_layout != from_file:
        if not write_file:
            raise errors.ManifestMismatch(
                f"{args.manifest} differs from the manifest of {args.image_dir}:{args.tag}"
            )
        from_file = None
    if write_file and from_layout is not None and from_file is None and args.manifest:
        with open(args.manifest, "wb") as fh:
            fh.write(from_layout)
    return from_layout if from_layout is not None else from_file


def _image_key_id(args, pinned):
    return keys.normalize_fingerprint(args.image_key_id) if args.image_key_id else pinned


@contextlib.contextmanager
def _signing_home(args, fpr, secret_key_file):
    """A GnuPG home with the secret key ``fpr``: imported from ``secret_key_file`` into a
    private home, or else the keyring GNUPGHOME."""
    if secret_key_file:
        with private_home() as home:
            keys.load_secret(home, fpr, secret_key_file)
            yield open_gpg(home)
    elif args.gnupghome:
        with user_home(args.gnupghome) as home:
            gpg = open_gpg(home)
            if not keys.has_secret(gpg, fpr):
                raise errors.SigningFailed(f"keyring {home} has no secret key for {fpr}")
            yield gpg
    else:
        raise errors.SetupError(f"no secret key for {fpr}: set SECRET_KEY_FILE=<file> "
                                "(IMAGE_SECRET_KEY_FILE= for the image key) or GNUPGHOME=<keyring>")


def cmd_sign(args):
    pinned = _key_id(args)
    image_key = _image_key_id(args, pinned)
    passphrase = _read_passphrase(args.passphrase_file)
    if args.sums:
        with _signing_home(args, pinned, args.secret_key_file) as gpg:
            sums.write(args.artifact, args.sums)
            signer = detached.sign(gpg, args.sums, args.sums_signature, pinned, passphrase)
            print(f"signed  {args.sums_signature}  by {signer} (key {pinned})")
    if args.signature:
        secret = args.image_secret_key_file or (args.secret_key_file if image_key == pinned else None)
        with _signing_home(args, image_key, secret) as gpg:
            manifest = _image_manifest(args, write_file=True)
            digest = imagesig.sign(gpg, manifest, args.reference, image_key, args.signature,
                                   passphrase)
            print(f"signed  {args.signature}  {args.reference} {digest} (primary key {image_key})")
            _publish(args, gpg, image_key, digest)
    return 0


def _publish(args, gpg, image_key, digest):
    """The lookaside tree, the image public key and example client configuration."""
    if args.sigstore:
        with open(args.signature, "rb") as fh:
            path = publish.write_lookaside(args.sigstore, args.reference, digest, fh.read())
        print(f"wrote   {path}")
    if args.image_public_key:
        with open(args.image_public_key, "w", encoding="ascii") as fh:
            fh.write(gpg.export_keys(image_key, armor=True))
        print(f"wrote   {args.image_public_key}  (public key {image_key})")
    if args.policy and args.registries_d:
        publish.write_examples(args.policy, args.registries_d, args.reference,
                               args.policy_key_path, args.lookaside_url, args.alias)
        print(f"wrote   {args.policy} and {args.registries_d}/xcflushd.yaml (examples)")


def _verdicts(gpg, args, pinned, image_key):
    """Yield ``(ok, name, message)`` for every artifact to verify."""
    if args.sums:
        try:
            signer = detached.verify(gpg, args.sums, args.sums_signature, pinned)
        except errors.VerificationError as exc:
            yield False, args.sums_signature, str(exc)
            for art in args.artifact:
                yield False, art, "not checked: SHA256SUMS is not trustworthy"
        else:
            yield True, args.sums_signature, f"signed by {signer} (key {pinned})"
            directory = os.path.dirname(os.path.abspath(args.sums))
            try:
                with open(args.sums, encoding="utf-8") as fh:
                    listed = sums.parse(fh.read(), args.sums)
            except errors.VerificationError as exc:
                yield False, args.sums, str(exc)
                listed = {}
            for name, digest in sorted(listed.items()):
                try:
                    sums.check_artifact(directory, name, digest)
                    yield True, os.path.join(os.path.dirname(args.sums), name), "sha256 matches"
                except errors.VerificationError as exc:
                    yield False, os.path.join(os.path.dirname(args.sums), name), str(exc)
            for art in args.artifact:
                if listed and os.path.basename(art) not in listed:
                    yield False, art, str(errors.NotListed(f"{art} is not listed in {args.sums}"))
    if args.signature:
        name = args.image_dir if args.image_dir and os.path.isdir(args.image_dir) else (
            args.manifest or args.signature)
        try:
            manifest = _image_manifest(args)
            signer, digest = imagesig.verify(gpg, args.signature, manifest, args.reference,
                                             image_key)
            blobs = ""
            if args.image_dir and os.path.isdir(args.image_dir):
                blobs = f", {oci.check_blobs(args.image_dir, manifest)} blobs intact"
            yield True, name, (f"{args.reference} manifest {digest}{blobs},"
                               f" signed by the primary key {signer}")
        except errors.VerificationError as exc:
            yield False, name, str(exc)
            return
        if args.sigstore and os.path.isdir(args.sigstore):
            path = os.path.join(args.sigstore, publish.lookaside_path(args.reference, digest))
            with open(args.signature, "rb") as fh:
                expected = fh.read()
            if not os.path.isfile(path):
                yield False, path, "the lookaside tree has no signature for this manifest"
            elif open(path, "rb").read() != expected:
                yield False, path, f"differs from {args.signature}"
            else:
                yield True, path, "lookaside copy of the image signature"


def cmd_verify(args):
    pinned = _key_id(args)
    image_key = _image_key_id(args, pinned)
    if not (args.sums or args.signature):
        raise errors.SetupError("nothing to verify: give --sums and/or --signature")
    failed = 0
    with private_home() as home:
        try:
            source = {"keyring": args.gnupghome, "keyserver": args.keyserver}
            if args.sums or image_key == pinned:
                fprs = keys.load_public(home, pinned, key_file=args.key_file, **source)
                print(f"key   {pinned} (subkeys: {', '.join(fprs[1:]) or 'none'})")
            if args.signature and image_key != pinned:
                keys.load_public(home, image_key, key_file=args.image_key_file, **source)
                print(f"image key {image_key} (primary)")
        except errors.SetupError as exc:
            print(f"FAIL  release key  {exc}")
            _banner(False)
            return 2
        gpg = open_gpg(home)
        for ok, name, message in _verdicts(gpg, args, pinned, image_key):
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {name}  {message}")
    _banner(not failed)
    return 1 if failed else 0


def _banner(ok, what="Signature verification"):
    text = f"{what} OK" if ok else f"{what} FAILED"
    print(f"{BANNER}\n{'[II]' if ok else '[WW]'} {text}\n{BANNER}")


def cmd_image(args):
    if os.geteuid() != 0:
        raise errors.SetupError("building the image needs root (debootstrap, chroot, umoci)")
    suite = args.suite or mirror.codename()
    source = args.mirror or mirror.pick(mirror.read_entries(), suite)
    manifest = image.build(args.wheel, args.image_dir, args.tag, args.cache_dir, suite, source,
                           args.version, args.epoch, base_digest=args.base_digest)
    if args.manifest:
        with open(args.manifest, "wb") as fh:
            fh.write(manifest)
    print(f"image {args.image_dir}:{args.tag} manifest {oci.digest_of(manifest)}")
    return 0


def cmd_sums(args):
    sums.write(args.artifacts, args.out)
    return 0


def cmd_reproduce(args):
    work = tempfile.mkdtemp(prefix="reproduce-")
    log = os.path.join(work, "build.log")
    failed = 0
    try:
        src, dist = os.path.join(work, "src"), os.path.join(work, "dist")
        layout = os.path.join(args.release_dir, args.image_name)
        image = args.image == "1"
        if image and os.geteuid() != 0:
            print("SKIP  image  rebuilding the image needs root (debootstrap, chroot)")
            image = False
        make_vars = list(args.make_var)
        if image and os.path.isdir(layout):
            base = reproduce.base_digest_of(layout, args.image_tag)
            make_vars += [f"BASE_DIGEST={base}"] if base else []
        try:
            commit = reproduce.clone(args.repo, args.ref, src, log)
            print(f"rebuild {args.ref} (commit {commit}) in {work}")
            reproduce.rebuild(src, dist, log, image=image, make_vars=make_vars)
        except errors.SetupError as exc:
            print(f"FAIL  rebuild  {exc}")
            _banner(False, "Reproduction")
            return 1
        verdicts = list(reproduce.compare_sums(args.release_dir, dist, args.sums))
        if image:
            verdicts.append(reproduce.compare_image(
                os.path.join(args.release_dir, args.image_name + ".manifest"),
                os.path.join(dist, args.image_name + ".manifest"),
                layout if os.path.isdir(layout) else None, os.path.join(dist, args.image_name)))
        for ok, name, message, hint in verdicts:
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {name}  {message}")
            for line in hint:
                print(f"      {line}")
    finally:
        if args.keep:
            print(f"kept  {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    _banner(not failed, "Reproduction")
    return 1 if failed else 0


def cmd_normalize(args):
    for path in args.archives:
        repro.normalize_tar_gz(path, args.epoch)
    return 0


def cmd_wheelhouse(args):
    environment = wheelhouse.target_environment(args.python_version)
    if not args.check:
        try:
            wheelhouse.top_up(args.house, environment)
        except subprocess.CalledProcessError as exc:
            raise errors.SetupError(f"pip wheel failed (exit {exc.returncode})") from None
    problems = wheelhouse.unfit(args.house, environment)
    for line in problems:
        print(f"FAIL  {line}")
    if problems:
        print(f"the wheels in {args.house} do not install on the nodes' Python {args.python_version}: "
              f"run make wheelhouse NODE_PYTHON_VERSION=<theirs> with a {environment['python_version']} "
              "PYTHON (then make clean install)", file=sys.stderr)
        return 1
    print(f"PASS  {args.house}: every wheel installs on Python {args.python_version}")
    return 0


def cmd_fingerprints(args):
    pinned = _key_id(args)
    with private_home() as home:
        for fpr in keys.load_public(home, pinned, key_file=args.key_file):
            print(fpr)
    return 0


def main(argv=None):
    """Run the command line; exit with its status."""
    args = build_parser().parse_args(argv)
    handler = {"sign": cmd_sign, "verify": cmd_verify, "image": cmd_image,
               "sums": cmd_sums, "normalize": cmd_normalize, "reproduce": cmd_reproduce,
               "fingerprints": cmd_fingerprints, "wheelhouse": cmd_wheelhouse}[args.command]
    try:
        status = handler(args)
    except errors.SigningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    sys.exit(status)
