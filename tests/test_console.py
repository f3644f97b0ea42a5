"""The console of ``fedslm simulate``: the plan, one progress display and the final table; every
other line (ours, Flower's, the Ray workers', the libraries' warnings) in the run's ``run.log``."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedslm.logs import NOISE, RUN_LOG_ENV, NoiseFilter, run_log

ROOT = Path(__file__).resolve().parent.parent
PLAN_KEYS = ("model ", "device ", "compute float32", "clients  4", "rounds   1", "strategy fedavg", "privacy ")


def _record(name: str, message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_noise_filter_drops_only_the_named_noise() -> None:
    keep = NoiseFilter().filter
    assert len(NOISE) == 6
    assert not keep(_record("py.warnings", "/x/jit/_script.py:365: DeprecationWarning: `torch.jit.script_method`"))
    assert not keep(_record("py.warnings", "/x/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing`"))
    assert not keep(_record("py.warnings", "/x/hooks.py:226: UserWarning: Full backward hook is firing when"))
    assert not keep(_record("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels"))
    assert not keep(_record("flwr", "DEPRECATED FEATURE: The `run_simulation` function is deprecated"))
    assert not keep(_record("flwr", "Manually terminating ClientAppActor"))
    # a warning of another category, the same text from another logger, and Flower's errors stay
    assert keep(_record("py.warnings", "/x/strategy.py:9: RuntimeWarning: overflow encountered in multiply"))
    assert keep(_record("py.warnings", "/x/y.py:1: UserWarning: something else"))
    assert keep(_record("fedslm.model", "Failed to load CPU gemm_4bit_forward from kernels-community"))
    assert keep(_record("flwr", "ClientApp raised an exception", logging.ERROR))


def test_run_log_takes_every_line_at_debug_and_leaves_logging_as_it_was(tmp_path: Path) -> None:
    ours, flwr, root = logging.getLogger("fedslm"), logging.getLogger("flwr"), logging.getLogger()
    before = (list(ours.handlers), list(flwr.handlers), list(root.handlers), ours.level, os.environ.get(RUN_LOG_ENV))
    path = tmp_path / "run.log"
    with run_log(path):
        assert os.environ[RUN_LOG_ENV] == str(path)  # what the Ray workers started here inherit
        logging.getLogger("fedslm.test").debug("our debug line %d", 1)
        logging.getLogger("flwr").info("flower's info line")
        logging.getLogger("somelib").warning("a library's warning")
    logging.getLogger("fedslm.test").warning("after the run")
    lines = path.read_text().splitlines()
    assert len(lines) == 3, lines  # each once, nothing after the block
    assert re.search(rf" {os.getpid()} DEBUG fedslm.test: our debug line 1$", lines[0]), lines[0]
    assert lines[1].endswith("INFO flwr: flower's info line")
    assert lines[2].endswith("WARNING somelib: a library's warning")
    after = (list(ours.handlers), list(flwr.handlers), list(root.handlers), ours.level, os.environ.get(RUN_LOG_ENV))
    assert after == before


def _simulate(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FEDSLM_VERBOSE", None)
    env.pop("FEDSLM_LOG", None)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fedslm.simulation.cli", "simulate", str(ROOT / "configs" / "tiny.yaml")]
    argv += ["--out", str(out), "--set", "federation.num_rounds=1", *extra]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.mark.integration
def test_simulate_console_shows_the_plan_progress_and_table_and_run_log_the_rest(tmp_path: Path) -> None:
    proc, out = _simulate(tmp_path, "--set", "federation.backend=ray")  # run.log takes the Ray workers' lines too
    console = proc.stdout + proc.stderr
    for noise in ("Loading weights", "Warning", "flwr", "Flower", "INFO", "gemm_4bit", "ClientAppActor"):
        assert noise not in console, (noise, console[-3000:])
    plan = proc.stdout.split("\n\n")[0]
    assert all(key in plan for key in PLAN_KEYS), plan
    assert re.search(r"held out for evaluation\), up to \d+ at a time in Ray workers$", plan, re.M), plan
    assert "rounds 0-1" in proc.stderr and " left]" in proc.stderr  # the one progress display
    assert "round  train_loss  eval_loss" in proc.stdout and "run directory:" in proc.stdout
    log = (out / "run.log").read_text()
    assert " INFO flwr: configure_train: Sampled 4 nodes (out of 4)" in log  # Flower's lines
    assert " DEBUG flwr: " in log
    # the driver's model (central evaluation) and each Ray worker's, each process's once
    loads = re.findall(r" (\d+) INFO fedslm.model: Loaded tiny-llama", log)
    assert len(loads) >= 2 and len(set(loads)) == len(loads), loads
    assert len(re.findall(r" INFO fedslm.client.runner: client \d round 1: 3 steps", log)) == 4
    # a library's Python warning in a Ray worker (whichever the installed versions emit) reaches run.log
    driver = re.findall(r" (\d+) INFO fedslm.simulation.run: Simulating", log)
    warned = set(re.findall(r" (\d+) WARNING py.warnings: \S+: \w*Warning: ", log))
    assert len(driver) == 1 and warned & (set(loads) - set(driver)), (driver, loads, warned)


@pytest.mark.integration
def test_simulate_verbose_shows_flower_and_the_libraries(tmp_path: Path) -> None:
    proc, out = _simulate(tmp_path, "--verbose", "--no-progress")
    assert "configure_train: Sampled 4 nodes (out of 4)" in proc.stderr  # Flower's INFO
    assert "Loading weights" in proc.stderr  # transformers' bars, the driver's and the workers'
    assert "INFO fedslm.server.recording: round 1 central eval" in proc.stderr  # one logger for both loops
    assert re.search(r" WARNING py.warnings: \S+: \w*Warning: ", proc.stderr)  # a library's Python warning
    assert "round  train_loss  eval_loss" in proc.stdout
    assert "held out for evaluation), one at a time in this process" in proc.stdout  # tiny.yaml's backend
    assert " INFO flwr: configure_train" in (out / "run.log").read_text()


def test_verbose_goes_before_or_after_simulate_and_defaults_off() -> None:
    from fedslm.simulation.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["--verbose", "simulate", "c.yaml"]).verbose and parse(["simulate", "c.yaml", "--verbose"]).verbose
    assert not parse(["simulate", "c.yaml"]).verbose and not parse(["check", "c.yaml"]).verbose
