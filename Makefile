# Everything a fresh machine needs goes through these targets: `make run` and `make test`
# create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: the CPU wheel. An open range would pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

PORT         ?= 50051
METRICS_PORT ?= 9464
DATA_DIR     ?= var

.PHONY: install run test proto proto-check bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
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

test: $(STAMP) proto-check
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m titan_fusion.server.bench

## Mixed load for SOAK_SECONDS (default 600): errors by code and memory growth.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python -m titan_fusion.server.soak --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info
