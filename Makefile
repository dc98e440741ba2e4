# Two commands on a fresh machine:  `make up` runs the cluster, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DATA_DIR := /usr/share/datasets/fashion-mnist

.PHONY: up test venv data bench-deps clean help

help:
	@echo "make up      venv + install + Fashion-MNIST + python -m dmlsys.cluster up"
	@echo "make test    venv + install + Fashion-MNIST + the whole test suite"
	@echo "make bench-deps  the peers benchmarks compare against (torch, mpi4py, dask, nginx, ...)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# The Debian package where apt is available (and we may use it); otherwise a checksum-verified
# download from the dataset's official source into ~/.cache/dmlsys.
data: venv
	@if [ ! -d "$(DATA_DIR)" ] && [ -z "$$DMLSYS_DATA" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist) || true; \
	fi
	$(BIN)/python -m dmlsys.train.data ensure --download

up: data
	$(BIN)/python -m dmlsys.cluster up

# `ip` (iproute2) for the two-host network-namespace tests and Chromium for the dashboard's
# browser test; each skips with its reason without them.
test: data
	@if ! command -v ip >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y iproute2 || true; fi
	@if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y chromium chromium-driver || (apt-get update && apt-get install -y chromium chromium-driver) || true; fi
	$(BIN)/python -m pytest -q

bench-deps: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y nginx openmpi-bin libopenmpi-dev wrk || true; fi

clean:
	rm -rf $(VENV) .dmlsys .pytest_cache .hypothesis
