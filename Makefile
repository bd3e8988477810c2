# The README's two commands are `make site` and `make test`; everything else is a step of theirs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
WHEELHOUSE := $(CACHE)/wheelhouse
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Molecule and pytest workers share one Docker build cache and one set of base images per run.
export NITRO_ANSIBLE_ROOT := $(CURDIR)
export NITRO_ANSIBLE_WHEELHOUSE := $(CURDIR)/$(WHEELHOUSE)

.PHONY: help setup venv docker images prometheus wheelhouse site collection changelog test test-fast test-unit test-integration test-molecule lint sanity bench chaos docs clean

help:
	@echo "make site   - set up if needed, then run site.yml on the default inventory (localhost, emulated)"
	@echo "make test   - the whole suite: lint, unit, integration, molecule"
	@echo "make test-fast - lint + unit tests only (inner loop)"
	@echo "make bench  - benchmarks; prints figures"
	@echo "make lint   - ansible-lint (production profile) and ruff"
	@echo "make sanity - ansible-test sanity over the modules (in a collection tree)"
	@echo "make setup  - only the set-up: .venv, Docker engine, base images, wheelhouse, prometheus"
	@echo "make collection - build the collection tarball nitro_enclaves-fleet-<version>.tar.gz into dist/"

$(BIN)/.installed: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "setup: $(PYTHON) is required (Debian: apt-get install python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@touch $@

venv: $(BIN)/.installed

docker:
	@scripts/docker-engine.sh

images: docker
	@scripts/base-images.sh

# Debian's prometheus: the server and promtool the monitoring tests run.
prometheus:
	@scripts/prometheus.sh

# Hosts never reach PyPI: everything they install comes from this pinned wheelhouse.
$(WHEELHOUSE)/.deps: requirements.txt | $(BIN)/.installed
	@mkdir -p $(WHEELHOUSE)
	$(BIN)/pip download -q -d $(WHEELHOUSE) --only-binary=:all: --python-version 3.11 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  -c requirements.txt cbor2 cryptography asn1crypto pyyaml aiohttp boto3 isal prometheus_client
	@touch $@

# The project wheel: built by the same script the nitro_cli role runs (it rebuilds when the sources'
# checksum changed, reproducibly, with fixed timestamps, so hosts see a changed file only when the code did).
wheelhouse: $(WHEELHOUSE)/.deps
	@sh roles/nitro_cli/files/build-wheelhouse.sh $(CURDIR) $(WHEELHOUSE) $(CURDIR)/$(BIN)/python >/dev/null

setup: venv images wheelhouse prometheus

site: setup
	$(BIN)/ansible-playbook site.yml

# The collection tarball (galaxy.yml's build_ignore keeps caches, the venv and the in-repo symlink out).
collection: venv
	@mkdir -p dist
	$(BIN)/ansible-galaxy collection build --force --output-path dist .

# CHANGELOG.rst from changelogs/fragments (antsibull-changelog); `make changelog VERSION=x.y.z` releases.
changelog: venv
	$(BIN)/antsibull-changelog $(if $(VERSION),release --version $(VERSION),generate)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/ansible-lint --profile production
	$(BIN)/antsibull-changelog lint

# ansible-test sanity (the offline tests) over the modules, module_utils and doc fragments, as a collection.
sanity: venv
	scripts/sanity.sh

test-unit: venv prometheus
	$(BIN)/pytest -n 2 tests/unit

test-fast: lint test-unit

test-integration: setup
	$(BIN)/pytest tests/integration

test-molecule: setup
	$(BIN)/pytest -n 2 tests/molecule

# Unit tests are independent (two workers); integration tests share the emulated localhost and its
# services, so they run one at a time; molecule scenarios each have their own hosts (two at a time).
test: setup lint sanity
	$(BIN)/pytest -n 2 tests/unit
	$(BIN)/pytest tests/integration
	$(BIN)/pytest -n 2 tests/molecule

# wrk (Debian) loads the gateway from C, so the figure is not the Python load generator's.
bench: setup
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } || true
	$(BIN)/python -m tests.bench

# Faults under load (bad variable, bad images, killed enclave, KMS down, gateway restart): figures only.
chaos: setup
	$(BIN)/python -m tests.bench.chaos

# Role READMEs are generated from meta/argument_specs.yml (a unit test checks they are current).
docs: venv
	$(BIN)/python scripts/role_readmes.py

clean:
	rm -rf $(VENV) $(CACHE)
