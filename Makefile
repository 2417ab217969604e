# p4seg — set-up, demo and tests. Every target is idempotent and installs what it needs.
#
#   make demo   the trading floor in Mininet on reference switches: check, compile and apply the
#               example policy, print the segmentation matrix from real packets (needs root)
#   make bench  the benchmarks (figures, printed)
#   make test   create .venv (+ .venv-shell), install Debian/Python packages when missing, run pytest
#   make lint   ruff + mypy (strict, on the code, its tests, topologies and benchmarks)

SHELL       := /bin/bash
PYTHON      ?= python3
VENV        := .venv
VENV_SHELL  := .venv-shell
BIN         := $(VENV)/bin
DEB_PKGS    := mininet iproute2 ethtool iputils-ping net-tools tcpdump openssl rsyslog rsyslog-openssl chromium etcd-server
PYTEST_ARGS ?=

.PHONY: all setup deb venv venv-shell demo test lint bench clean

all: setup

setup: deb venv venv-shell

# Debian packages: only touch apt when something is missing (apt-get update is slow).
deb:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "p4seg: need root to apt-get install:$$missing" >&2; exit 1; fi; \
	  echo "p4seg: installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

# p4runtime-shell pins protobuf<3.21: it lives in its own environment, never in .venv.
venv-shell: $(VENV_SHELL)/.installed

$(VENV_SHELL)/.installed:
	@test -x $(VENV_SHELL)/bin/python || $(PYTHON) -m venv $(VENV_SHELL)
	$(VENV_SHELL)/bin/python -m pip install -q --upgrade pip
	$(VENV_SHELL)/bin/python -m pip install -q p4runtime-shell
	@touch $@

demo: setup
	$(BIN)/p4seg check policies/trading_floor.zt -i topologies/trading_floor.yaml --summary
	$(BIN)/p4seg up policies/trading_floor.zt -i topologies/trading_floor.yaml --build build/trading_floor

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench.bench_check
	$(BIN)/python -m bench.bench_compile

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check compiler p4seg p4src runtime topologies tests bench
	$(BIN)/mypy compiler runtime p4seg p4src topologies tests bench

clean:
	rm -rf $(VENV) $(VENV_SHELL) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
