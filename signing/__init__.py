"""Release signing for xcflushd: sums, detached signatures, container image signatures.

Everything here verifies against one pinned full fingerprint (``RELEASE_KEY_FINGERPRINT``)
and works offline, in private temporary GnuPG homes, never in the user's ``~/.gnupg``
unless a keyring is named explicitly. ``python -m signing`` is the command line;
``signing/release.mk`` drives it from make.

Modules, one job each:

- ``errors``    one exception per failure mode, each with its own message
- ``gpghome``   private temporary GnuPG homes and agent shutdown
- ``keys``      the pinned fingerprint, loading a public or secret key into a home
- ``openpgp``   recognising signature formats, checking who signed
- ``sums``      writing, parsing and checking ``SHA256SUMS``
- ``detached``  the detached armored signature over ``SHA256SUMS``
- ``atomic``    the "atomic container signature" JSON payload
- ``oci``       reading manifests and blobs from an OCI image layout
- ``imagesig``  signing and verifying an image signature
- ``mirror``    the Debian mirror of the machine's own apt sources
- ``wheelhouse`` the wheels an image's Python needs, built on the host
- ``image``     building the OCI image of the daemon without a container engine
- ``cli``       the command line (the only module that parses arguments or exits)
"""

__all__ = ["PINNED_FINGERPRINT_FILE"]

import os

PINNED_FINGERPRINT_FILE = os.path.join(os.path.dirname(__file__), "RELEASE_KEY_FINGERPRINT")
"""Path of the file holding the release key's full 40-hex primary fingerprint."""
