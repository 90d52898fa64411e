# The Ansible collection threescale.xcflushd (ansible/). Included by the top-level Makefile.
#
#   make collection    build/threescale-xcflushd-<version>.tar.gz
#
# ansible/roles/xcflushd/files links into the checkout (signing/, systemd/); ansible-galaxy
# skips links that leave the collection, so the collection is staged with them resolved.
COLLECTION_STAGE ?= build/collection
COLLECTION_OUT ?= build
ANSIBLE_GALAXY ?= $(or $(wildcard $(VENV)/bin/ansible-galaxy),ansible-galaxy)

.PHONY: collection
collection:
	rm -rf $(COLLECTION_STAGE) && mkdir -p $(COLLECTION_STAGE) $(COLLECTION_OUT)
	tar -C ansible -chf - --exclude=__pycache__ --exclude='*.pyc' --exclude=./.cache \
	  --exclude=./inventory --exclude='*.tar.gz' . | tar -C $(COLLECTION_STAGE) -xf -
	$(ANSIBLE_GALAXY) collection build --force --output-path $(COLLECTION_OUT) $(COLLECTION_STAGE)
