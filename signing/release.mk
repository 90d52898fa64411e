# Release artifacts, signing and verification (issue 5). Included by the top-level Makefile.
#
#   make dist                      sdist + wheel + the systemd files + SHA256SUMS in $(DIST_DIR)
#   make wheelhouse                add the dependency wheels (binary, from the index) to them
#   make image                     OCI image layout of the daemon (root; no container engine)
#   make sign SECRET_KEY_FILE=...  SHA256SUMS.asc + the image signature (or GNUPGHOME=<keyring>),
#                                  its lookaside tree, example policy.json and registries.d
#   make verify TRUST_KEY_FILE=1   PASS/FAIL per artifact against the pinned fingerprint
#   make reproduce REF=<tag>       rebuild the tag from a clean clone, compare with RELEASE_DIR
#   make info                      every variable below and its value
#
# Every knob is ?= overridable. Nothing here reads or writes ~/.gnupg unless GNUPGHOME names
# it; all gpg work happens in private temporary homes whose agents are stopped afterwards.

NAME ?= xcflushd
# The package version, read once (not on every expansion); TAG defaults to it, as upstream.
ifeq ($(origin VERSION),undefined)
VERSION := $(shell $(or $(PYTHON),python3) -c 'import xcflushd; print(xcflushd.__version__)' 2>/dev/null)
endif
TAG ?= $(VERSION)
REL ?= 1
DIST_DIR ?= dist
# Named by TAG so that `make verify TAG=x.y.z` checks release x.y.z from any checkout.
SDIST ?= $(DIST_DIR)/$(NAME)-$(TAG).tar.gz
WHEEL ?= $(DIST_DIR)/$(NAME)-$(TAG)-py3-none-any.whl
# The one list of deliverables: it drives SHA256SUMS, its signature and verification.
# The unit, sysusers and tmpfiles files ship with the release, so the signature covers
# what a node installs beside the wheel and a rollback rolls them back too.
# (A release made before they shipped has none: the wildcard keeps it verifiable.)
SYSTEMD_FILES ?= $(wildcard $(addprefix $(DIST_DIR)/,xcflushd.service xcflushd.sysusers xcflushd.tmpfiles))
# Dependency wheels that `make wheelhouse` put in DIST_DIR (evaluated when used).
DEPENDENCY_WHEELS = $(filter-out $(WHEEL),$(wildcard $(DIST_DIR)/*.whl))
ARTIFACTS ?= $(SDIST) $(WHEEL) $(SYSTEMD_FILES) $(DEPENDENCY_WHEELS)
SUMS ?= $(DIST_DIR)/SHA256SUMS
# The nodes' Python (Debian 12's): `make wheelhouse` adds the wheels its environment markers
# need (pip resolves for the builder's), and signing first checks that every dependency wheel
# installs there.
NODE_PYTHON_VERSION ?= 3.11.2
SUMS_SIGNATURE ?= $(SUMS).asc
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null)

IMAGE_TAG ?= $(TAG)-$(REL)
IMAGE_NAME ?= $(NAME)-image-$(IMAGE_TAG)
IMAGE_DIR ?= $(DIST_DIR)/$(IMAGE_NAME)
MANIFEST ?= $(DIST_DIR)/$(IMAGE_NAME).manifest
SIGNATURE ?= $(DIST_DIR)/$(IMAGE_NAME).signature
REGISTRY ?= registry.hub.docker.com
REPOSITORY ?= 3scale
TARGET_IMAGE ?= $(REGISTRY)/$(REPOSITORY)/$(NAME):$(IMAGE_TAG)
# The base image is cached here, outside the repository; SUITE/MIRROR empty = this machine's.
IMAGE_CACHE ?= /var/cache/xcflushd-build
SUITE ?=
MIRROR ?=
# Pin the base by its manifest digest (the image's org.opencontainers.image.base.digest label).
BASE_DIGEST ?=

# The release key, pinned by its full fingerprint (never a short id).
PINNED_FINGERPRINT_FILE ?= signing/RELEASE_KEY_FINGERPRINT
ifeq ($(origin KEY_ID),undefined)
KEY_ID := $(strip $(file <$(PINNED_FINGERPRINT_FILE)))
endif
KEY_FILE ?= signing/$(KEY_ID).asc
# Verify with KEY_FILE (its fingerprint is checked against KEY_ID before import) ...
TRUST_KEY_FILE ?= 0
# ... or with the key from the keyring GNUPGHOME (only read) ... or, only when asked, a keyserver.
GNUPGHOME ?=
FETCH_KEY ?= 0
KEYSERVER ?= hkps://keys.openpgp.org
# Signing: the secret key from SECRET_KEY_FILE (default ./<KEY_ID>.asc if present, imported
# into a private temporary home) or else from the keyring GNUPGHOME; passphrase from
# PASSPHRASE_FILE, or the agent when empty.
SECRET_KEY_FILE ?= $(wildcard $(KEY_ID).asc)
PASSPHRASE_FILE ?=

# The image is signed by a PRIMARY key: podman and skopeo (Debian 12) match signedBy
# against primary fingerprints only, and the release key signs with a subkey. Its
# fingerprint is pinned in IMAGE_KEY_FINGERPRINT_FILE; while that pins none, the release
# key's primary (which must then be able to sign).
IMAGE_KEY_FINGERPRINT_FILE ?= signing/IMAGE_KEY_FINGERPRINT
ifeq ($(origin IMAGE_KEY_ID),undefined)
IMAGE_KEY_ID := $(or $(strip $(shell sed -e '/^[[:space:]]*\#/d' -e '/^[[:space:]]*$$/d' $(IMAGE_KEY_FINGERPRINT_FILE) 2>/dev/null | head -n 1)),$(KEY_ID))
endif
IMAGE_KEY_FILE ?= signing/$(IMAGE_KEY_ID).asc
IMAGE_SECRET_KEY_FILE ?= $(if $(filter $(IMAGE_KEY_ID),$(KEY_ID)),$(SECRET_KEY_FILE),$(wildcard $(IMAGE_KEY_ID).asc))
# What operators get to check the image with podman/skopeo/CRI-O (see docs/releases.md).
SIGSTORE ?= $(DIST_DIR)/sigstore
LOOKASIDE_URL ?= https://sigstore.example.invalid/xcflushd
POLICY ?= $(DIST_DIR)/policy.json
REGISTRIES_D ?= $(DIST_DIR)/registries.d
POLICY_KEY_PATH ?= /etc/pki/containers/xcflushd-image-key.asc
IMAGE_PUBLIC_KEY ?= $(DIST_DIR)/xcflushd-image-key.asc
IMAGE_ALIASES ?= docker.io/$(REPOSITORY)/$(NAME)

SIGNING_TOOL = $(PY) -m signing
VERIFY_KEY_SOURCE = $(if $(filter 1,$(TRUST_KEY_FILE)),--key-file $(KEY_FILE) $(if $(filter-out $(KEY_ID),$(IMAGE_KEY_ID)),--image-key-file $(IMAGE_KEY_FILE)),$(if $(GNUPGHOME),--gnupghome $(GNUPGHOME),$(if $(filter 1,$(FETCH_KEY)),--keyserver $(KEYSERVER))))
SIGN_KEY_SOURCE = $(if $(SECRET_KEY_FILE),--secret-key-file $(SECRET_KEY_FILE),$(if $(GNUPGHOME),--gnupghome $(GNUPGHOME))) \
	$(if $(IMAGE_SECRET_KEY_FILE),--image-secret-key-file $(IMAGE_SECRET_KEY_FILE)) $(if $(PASSPHRASE_FILE),--passphrase-file $(PASSPHRASE_FILE))
SUMS_ARGS = --sums $(SUMS) --sums-signature $(SUMS_SIGNATURE) $(addprefix --artifact ,$(ARTIFACTS))
IMAGE_ARGS = --image-dir $(IMAGE_DIR) --tag $(IMAGE_TAG) --manifest $(MANIFEST) --signature $(SIGNATURE) \
	--reference $(TARGET_IMAGE) --image-key-id $(IMAGE_KEY_ID) --sigstore $(SIGSTORE)
PUBLISH_ARGS = --policy $(POLICY) --registries-d $(REGISTRIES_D) --policy-key-path $(POLICY_KEY_PATH) \
	--lookaside-url $(LOOKASIDE_URL) --image-public-key $(IMAGE_PUBLIC_KEY) $(addprefix --alias ,$(IMAGE_ALIASES))

# make reproduce: rebuild REF from a clean clone of REPO_URL in a private directory and
# compare with the signed release in RELEASE_DIR (verified first).
REF ?= $(TAG)
RELEASE_DIR ?= $(DIST_DIR)
REPO_URL ?= $(shell git rev-parse --show-toplevel 2>/dev/null)
REPRODUCE_IMAGE ?= $(if $(wildcard $(RELEASE_DIR)/$(IMAGE_NAME).manifest),1,0)

.PHONY: info dist sums wheelhouse check-wheelhouse image sign sign-dist sign-image verify verify-dist verify-image \
	release-tools signing-tools release-key-fingerprints clean-image-cache reproduce

info:
	@printf '%s\n' "The following variables _can_ be modified (make VAR=value ...):" "" \
	  "* NAME = $(NAME)" "* VERSION = $(VERSION)" "* TAG = $(TAG)" "* REL = $(REL)" \
	  "* DIST_DIR = $(DIST_DIR)" "* SDIST = $(SDIST)" "* WHEEL = $(WHEEL)" \
	  "* ARTIFACTS = $(ARTIFACTS)" "* SUMS = $(SUMS)" "* SUMS_SIGNATURE = $(SUMS_SIGNATURE)" \
	  "* NODE_PYTHON_VERSION = $(NODE_PYTHON_VERSION)" \
	  "* SOURCE_DATE_EPOCH = $(SOURCE_DATE_EPOCH)" \
	  "* IMAGE_TAG = $(IMAGE_TAG)" "* IMAGE_NAME = $(IMAGE_NAME)" "* IMAGE_DIR = $(IMAGE_DIR)" \
	  "* MANIFEST = $(MANIFEST)" "* SIGNATURE = $(SIGNATURE)" \
	  "* REGISTRY = $(REGISTRY)" "* REPOSITORY = $(REPOSITORY)" "* TARGET_IMAGE = $(TARGET_IMAGE)" \
	  "* IMAGE_CACHE = $(IMAGE_CACHE)" "* SUITE = $(SUITE)" "* MIRROR = $(MIRROR)" \
	  "* BASE_DIGEST = $(BASE_DIGEST)" \
	  "* PINNED_FINGERPRINT_FILE = $(PINNED_FINGERPRINT_FILE)" "* KEY_ID = $(KEY_ID)" \
	  "* KEY_FILE = $(KEY_FILE)" "* TRUST_KEY_FILE = $(TRUST_KEY_FILE)" \
	  "* GNUPGHOME = $(GNUPGHOME)" "* FETCH_KEY = $(FETCH_KEY)" "* KEYSERVER = $(KEYSERVER)" \
	  "* SECRET_KEY_FILE = $(SECRET_KEY_FILE)" "* PASSPHRASE_FILE = $(PASSPHRASE_FILE)" \
	  "* IMAGE_KEY_FINGERPRINT_FILE = $(IMAGE_KEY_FINGERPRINT_FILE)" "* IMAGE_KEY_ID = $(IMAGE_KEY_ID)" \
	  "* IMAGE_KEY_FILE = $(IMAGE_KEY_FILE)" "* IMAGE_SECRET_KEY_FILE = $(IMAGE_SECRET_KEY_FILE)" \
	  "* SIGSTORE = $(SIGSTORE)" "* LOOKASIDE_URL = $(LOOKASIDE_URL)" "* POLICY = $(POLICY)" \
	  "* REGISTRIES_D = $(REGISTRIES_D)" "* POLICY_KEY_PATH = $(POLICY_KEY_PATH)" \
	  "* IMAGE_PUBLIC_KEY = $(IMAGE_PUBLIC_KEY)" "* IMAGE_ALIASES = $(IMAGE_ALIASES)" \
	  "* REF = $(REF)" "* RELEASE_DIR = $(RELEASE_DIR)" "* REPO_URL = $(REPO_URL)" \
	  "* REPRODUCE_IMAGE = $(REPRODUCE_IMAGE)"

# What the signing tool needs (signing/requirements.txt), without the test tools: `make verify`
# on a fresh clone installs only this. Not the project itself: a rebuild in a clone (make
# reproduce) runs with this venv, and an editable install from there would point it at the clone.
$(VENV)/.signing: signing/requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r signing/requirements.txt
	touch $@

signing-tools: $(VENV)/.signing

# `build` runs without isolation on the venv's setuptools, so no build backend is fetched per run.
release-tools: signing-tools
	@$(PY) -c 'import build, wheel' 2>/dev/null || $(PY) -m pip install -q build wheel 'setuptools>=61'

dist: release-tools
	@test -n "$(VERSION)" || { echo "cannot read xcflushd.__version__" >&2; exit 1; }
	@test "$(TAG)" = "$(VERSION)" || { echo "TAG=$(TAG) but the tree is version $(VERSION): dist builds the tree" >&2; exit 1; }
	@git diff --quiet HEAD 2>/dev/null && test -z "$$(git ls-files --others --exclude-standard)" || \
	  echo "warning: the work tree has changes; build releases from a clean checkout of the tag" >&2
	rm -f $(SDIST) $(WHEEL)
	@test -n "$(SOURCE_DATE_EPOCH)" || { echo "SOURCE_DATE_EPOCH is empty: build from a git checkout or set it" >&2; exit 1; }
	@# Built from a private copy: setuptools' sdist hard-links the sources into a
	@# fixed directory of the tree, so two builds at once could truncate a source file.
	@# The copy holds what git would (tracked and not ignored), with the modes and mtimes
	@# of no particular checkout, so any clone of a commit builds the same bytes.
	@mkdir -p $(DIST_DIR) && src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	  { git ls-files -z --cached --others --exclude-standard 2>/dev/null || \
	    find . -path ./.venv -prune -o -path ./.git -prune -o -path './$(DIST_DIR)' -prune -o -type f -print0; } | \
	    xargs -0r sh -c 'for f; do test -e "$$f" && printf "%s\0" "$$f"; done' sh | \
	    tar --null -T - -cf - | tar -xf - -C "$$src" && \
	  chmod -R u=rwX,go=rX "$$src" && find "$$src" -exec touch -h -d @$(SOURCE_DATE_EPOCH) {} + && \
	  SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(PY) -m build --no-isolation --sdist --wheel \
	    --outdir "$$(cd $(DIST_DIR) && pwd)" "$$src" >/dev/null
	$(SIGNING_TOOL) normalize --epoch $(SOURCE_DATE_EPOCH) $(SDIST)
	install -m 0644 systemd/xcflushd.service systemd/xcflushd.sysusers systemd/xcflushd.tmpfiles $(DIST_DIR)/
	@$(MAKE) --no-print-directory -o $(VENV)/.installed -o $(VENV)/.signing sums

# A new make: ARTIFACTS must see the files the recipe before it wrote. The sub-makes get
# -o for the venv's stamps: the caller made them already, and make does not pass -o down (a
# rebuild in a clone, run with -o, reinstalled the caller's venv from the clone).
sums: signing-tools
	$(SIGNING_TOOL) sums --out $(SUMS) $(ARTIFACTS)
	@cat $(SUMS)

# The wheels the release's wheel depends on (built here when the index has only an sdist), for the nodes' `pip install
# --require-hashes` (the Ansible role builds its lock from SHA256SUMS). Run after dist,
# before sign. They are upstream files: `make reproduce` does not rebuild them.
wheelhouse: signing-tools
	@test -f $(WHEEL) || { echo "no $(WHEEL): run make dist first" >&2; exit 1; }
	$(PY) -m pip wheel -q --prefer-binary --wheel-dir $(DIST_DIR) $(WHEEL)
	$(SIGNING_TOOL) wheelhouse --house $(DIST_DIR) --python-version $(NODE_PYTHON_VERSION)
	@$(MAKE) --no-print-directory -o $(VENV)/.installed -o $(VENV)/.signing sums

# Before signing: dependency wheels that the nodes' Python cannot install are never signed.
check-wheelhouse: signing-tools
	@$(if $(DEPENDENCY_WHEELS),$(SIGNING_TOOL) wheelhouse --check --house $(DIST_DIR) --python-version $(NODE_PYTHON_VERSION),:)

image: deps dist
	$(SIGNING_TOOL) image --wheel $(WHEEL) --version $(VERSION) --image-dir $(IMAGE_DIR) \
	  --tag $(IMAGE_TAG) --manifest $(MANIFEST) --cache-dir $(IMAGE_CACHE) --epoch $(SOURCE_DATE_EPOCH) \
	  $(if $(SUITE),--suite $(SUITE)) $(if $(MIRROR),--mirror $(MIRROR)) $(if $(BASE_DIGEST),--base-digest $(BASE_DIGEST))

sign: signing-tools check-wheelhouse
	$(SIGNING_TOOL) sign --key-id $(KEY_ID) $(SIGN_KEY_SOURCE) $(SUMS_ARGS) $(IMAGE_ARGS) $(PUBLISH_ARGS)

sign-dist: signing-tools check-wheelhouse
	$(SIGNING_TOOL) sign --key-id $(KEY_ID) $(SIGN_KEY_SOURCE) $(SUMS_ARGS)

sign-image: signing-tools
	$(SIGNING_TOOL) sign --key-id $(KEY_ID) $(SIGN_KEY_SOURCE) $(IMAGE_ARGS) $(PUBLISH_ARGS)

verify: signing-tools
	@$(SIGNING_TOOL) verify --key-id $(KEY_ID) $(VERIFY_KEY_SOURCE) $(SUMS_ARGS) $(IMAGE_ARGS)

verify-dist: signing-tools
	@$(SIGNING_TOOL) verify --key-id $(KEY_ID) $(VERIFY_KEY_SOURCE) $(SUMS_ARGS)

verify-image: signing-tools
	@$(SIGNING_TOOL) verify --key-id $(KEY_ID) $(VERIFY_KEY_SOURCE) $(IMAGE_ARGS)

# The rebuild uses this checkout's venv for its build tools (-o: never reinstalled there).
reproduce: signing-tools
	@$(MAKE) --no-print-directory -o $(VENV)/.installed -o $(VENV)/.signing $(if $(filter 1,$(REPRODUCE_IMAGE)),verify,verify-dist) DIST_DIR=$(RELEASE_DIR)
	@$(SIGNING_TOOL) reproduce --repo "$(REPO_URL)" --ref "$(REF)" --release-dir $(RELEASE_DIR) \
	  --sums $(notdir $(SUMS)) --image-name $(IMAGE_NAME) --image-tag $(IMAGE_TAG) --image $(REPRODUCE_IMAGE) \
	  --make-var VENV=$(abspath $(VENV)) --make-var PY=$(abspath $(PY)) --make-var=--old-file=$(abspath $(VENV))/.installed \
	  --make-var=--old-file=$(abspath $(VENV))/.signing \
	  --make-var REL=$(REL) --make-var IMAGE_CACHE=$(IMAGE_CACHE) \
	  $(if $(SUITE),--make-var SUITE=$(SUITE)) $(if $(MIRROR),--make-var MIRROR=$(MIRROR))

# Every fingerprint (primary, then subkeys) of the pinned key in KEY_FILE: what skopeo wants.
release-key-fingerprints: signing-tools
	@$(SIGNING_TOOL) fingerprints --key-id $(KEY_ID) --key-file $(KEY_FILE)

clean-image-cache:
	rm -rf $(IMAGE_CACHE)/base-*
