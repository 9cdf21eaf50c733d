# The verbs a user types. Each sets up what it needs on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMPS := build/stamps
# the peers `make bench` times flowworker against (worker/bench/peers.txt), apart from the venv
BENCH_VENV := build/bench-venv
# LAB_TLS=true: the lab with TLS for Redis and PostgreSQL (inventories/lab/group_vars/all/tls.yml);
# LAB_HA=true: two more Redis hosts and three Redis Sentinels (inventories/lab-ha)
LAB := -i inventories/lab $(if $(filter true,$(LAB_HA)),-i inventories/lab-ha) $(if $(LAB_TLS),-e lab_fleet_tls=$(LAB_TLS))
# make bench-deploy: the worker host counts to time (each a throw-away lab of its own beside the
# lab); KEEP=1 leaves them running
BENCH_WORKERS ?= 1 8
# redis-server, postgresql: real servers for the worker tests; chromium: the test that renders the
# monitor's /workers page; podman with runc, netavark, aardvark-dns (containers find each other by
# name) and iptables (published ports), and debootstrap: the systemd test image and the lab fleet;
# openssh-client: Ansible reaches the lab; prometheus: its promtool checks and unit-tests the alert
# rules and the scrape configuration in monitoring/, and the end-to-end tests run its server in a
# lab container (none runs on this machine; on one that boots systemd the package would enable
# its own service); docker.io and docker-compose: compose.yaml's tests and `make compose-demo` (the
# README's "Compose")
APT_PACKAGES := redis-server postgresql chromium podman runc netavark aardvark-dns iptables debootstrap openssh-client prometheus docker.io docker-compose

export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(abspath ansible.cfg)

.PHONY: help bootstrap lock bench-lock image lab deploy demo lab-down compose-images compose-demo compose-down test lint test-worker test-roles test-e2e test-compose bench bench-deploy clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMPS):
	mkdir -p $@

$(STAMPS)/apt: Makefile | $(STAMPS)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "Installing Debian packages: $(APT_PACKAGES)"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	touch $@

# the venv with uv at requirements.txt's pin: `make lock` runs before the worker can install
$(STAMPS)/uv: requirements.txt | $(STAMPS)/apt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$$(grep '^uv==' requirements.txt)"
	touch $@

# the worker's dependencies from its lock file, their hashes checked, as on the hosts; then the
# tooling and the worker itself with the lock's versions as constraints (its hashes cut: pip
# requires a hash of every package once a constraint carries one, and an editable has none)
$(STAMPS)/venv: $(STAMPS)/uv worker/pyproject.toml worker/requirements.lock
	$(BIN)/pip install -q --require-hashes --no-deps -r worker/requirements.lock
	sed -e '/^ *--hash=/d' -e 's/ *\\$$//' worker/requirements.lock > $(STAMPS)/versions.txt
	$(BIN)/pip install -q -r requirements.txt -c $(STAMPS)/versions.txt -e "./worker[monitor]"
	touch $@

bootstrap: $(STAMPS)/venv ## install Debian packages, the venv and the worker (idempotent)

# uv resolves for every platform from Python 3.11 on (markers where they differ) and lists the
# hashes of every file of each version; it keeps the lock's other versions (LOCK_ARGS=--upgrade
# moves them all to the newest)
lock: $(STAMPS)/uv ## resolve the worker's whole dependency tree (with its extras) into worker/requirements.lock, with hashes
	cd worker && uv pip compile pyproject.toml --extra monitor --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet $(LOCK_ARGS) -o requirements.lock
	@echo "worker/requirements.lock: $$(grep -c '==' worker/requirements.lock) packages"

# the same for the peers of `make bench`, on their own (their venv is never the worker's)
bench-lock: $(STAMPS)/uv ## resolve the benchmark's peers (SAQ, Dramatiq, Celery, RQ) into worker/bench/peers.txt, with hashes
	cd worker && uv pip compile bench/peers.in --universal --python-version 3.11 --generate-hashes --custom-compile-command "make bench-lock" --quiet $(LOCK_ARGS) -o bench/peers.txt
	@echo "worker/bench/peers.txt: $$(grep -c '==' worker/bench/peers.txt) packages"

$(STAMPS)/bench-venv: worker/bench/peers.txt | $(STAMPS)/apt
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --require-hashes --no-deps -r worker/bench/peers.txt
	touch $@

image: bootstrap ## build the systemd test image (once; again when its recipe changes)
	images/build-test-image.sh

lab: image ## start the local lab fleet (containers, SSH keys, network)
	ansible-playbook $(LAB) playbooks/lab.yml

deploy: lab ## deploy the whole stack (deploy.yml) to the lab fleet
	ansible-playbook $(LAB) deploy.yml

demo: deploy ## lab + deploy + run demo flows and show which host ran them
	ansible-playbook $(LAB) playbooks/demo.yml

lab-down: bootstrap ## remove the lab fleet and everything it made
	ansible-playbook -i inventories/lab -i inventories/lab-ha playbooks/lab.yml -e lab_fleet_state=absent

compose-images: bootstrap ## the images compose.yaml runs here: flowworker's (worker/Containerfile), Debian's Redis and PostgreSQL (images/build-compose-images.sh; starts dockerd)
	images/build-compose-images.sh

compose-demo: compose-images ## compose.yaml up (3 workers, the monitor), demo flows from a plain arq producer, which replica ran how many, the monitor's URL
	python compose/demo.py up

compose-down: bootstrap ## remove the Compose demo: its containers, network and volumes
	python compose/demo.py down

lint: bootstrap ## static checks: ruff, mypy --strict, tests/static (planner, role docs, inventories), yamllint, ansible-lint, syntax, the alert rules and the scrape configuration (promtool)
	cd worker && ruff check . && ruff format --check . && mypy src tests bench
	ruff check tests roles collections molecule bench compose && ruff format --check tests roles collections molecule bench compose
	pytest -q tests/static
	yamllint .
	ansible-lint
	ansible-playbook $(LAB) --syntax-check deploy.yml playbooks/*.yml
	promtool check rules monitoring/alerts.yml
	promtool test rules monitoring/alerts.test.yml
	promtool check config --syntax-only monitoring/prometheus.yml

test-worker: bootstrap ## worker tests against a real redis-server and PostgreSQL
	cd worker && pytest -q

test-roles: image ## molecule scenarios on real systemd containers, side by side (SCENARIO="a b" for some)
	python tests/suite.py roles $(SCENARIO)

test-e2e: image ## end-to-end: ansible-playbook against the lab fleet, made from nothing (K=expr for some)
	python tests/suite.py e2e $(if $(K),-k '$(K)')

test-compose: compose-images ## compose.yaml with Docker: a stack from nothing, 200 flows, scaling, a restart and a SIGKILL under load, non-root, a flow package built in, the healthcheck
	pytest -q tests/test_compose.py

test: image ## everything: lint, worker, molecule, end-to-end and Compose side by side, with a time table
	python tests/suite.py

bench: bootstrap $(STAMPS)/bench-venv ## benchmarks: throughput and CPU per job against bare arq, SAQ, Dramatiq, Celery and RQ, pick-up latency idle and under load, idle CPU, memory; the records at 5 M rows (both run; fails if a target is missed)
	cd worker && python -m bench.bench --peer-python $(abspath $(BENCH_VENV))/bin/python; a=$$?; python -m bench.records; b=$$?; exit $$((a || b))

bench-deploy: image ## no-op deploy time, 1 vs 8 worker hosts (bench/deploy.py; BENCH_WORKERS="1 8", KEEP=1)
	python bench/deploy.py --workers $(BENCH_WORKERS) $(if $(KEEP),--keep)

clean: lab-down ## remove the lab, the venv and build output
	rm -rf $(VENV) build worker/.pytest_cache worker/.mypy_cache worker/.ruff_cache
