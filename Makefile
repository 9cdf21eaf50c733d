# The verbs a user types. `make test` sets up everything on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMPS := build/stamps
# redis-server and postgresql: real servers for the worker tests
APT_PACKAGES := redis-server postgresql

export PATH := $(BIN):$(PATH)

.PHONY: help bootstrap test lint test-worker bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMPS):
	mkdir -p $@

$(STAMPS)/apt: Makefile | $(STAMPS)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "Installing Debian packages: $(APT_PACKAGES)"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	touch $@

$(STAMPS)/venv: requirements.txt worker/pyproject.toml | $(STAMPS)/apt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -e ./worker
	touch $@

bootstrap: $(STAMPS)/venv ## install Debian packages, the venv and the worker (idempotent)

lint: bootstrap ## static checks: ruff, mypy --strict
	cd worker && ruff check . && ruff format --check . && mypy src tests bench

test-worker: bootstrap ## worker tests against a real redis-server and PostgreSQL
	cd worker && pytest -q

test: lint test-worker ## everything: static checks and all test layers

bench: bootstrap ## benchmarks: throughput against bare arq, idle latency and CPU, memory
	cd worker && python -m bench.bench

clean: ## remove the venv and build output
	rm -rf $(VENV) build worker/.pytest_cache worker/.mypy_cache worker/.ruff_cache
