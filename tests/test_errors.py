"""Every user mistake ends in one line on stderr and exit 2 (1: a failed run), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedslm.errors import FedslmError, RunFailedError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def _fedslm(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = "import sys; from fedslm.simulation.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_every_error_class_has_the_one_root() -> None:
    from fedslm.client.resident import ResidentError
    from fedslm.client.secagg import SecAggWeightError
    from fedslm.client.state import ClientStateError
    from fedslm.server.checkpoint import CheckpointError
    from fedslm.simulation.run import RunDirError, SimulationError
    from fedslm.strategies.registry import StrategyConfigError

    from fedslm.adapters import AdapterError
    from fedslm.audit import AuditError
    from fedslm.config import ConfigError
    from fedslm.data import DataError
    from fedslm.deploy import DeployError
    from fedslm.errors import UsageError
    from fedslm.fs import OutDirError
    from fedslm.hardware import HardwareError
    from fedslm.model import ModelLoadError
    from fedslm.privacy import PrivacyBudgetError, PrivacyError, PrivacyStateError
    from fedslm.secagg import SecAggError
    from fedslm.training import TrainingError
    from fedslm.wire import WireError

    user = [
        AuditError,
        AdapterError,
        ConfigError,
        DataError,
        HardwareError,
        ModelLoadError,
        PrivacyError,
        PrivacyStateError,
        PrivacyBudgetError,
        SecAggError,
        TrainingError,
        WireError,
        ResidentError,
        SecAggWeightError,
        ClientStateError,
        CheckpointError,
        StrategyConfigError,
        OutDirError,
        RunDirError,
        UsageError,
    ]
    for cls in user:
        assert issubclass(cls, FedslmError) and cls.exit_code == 2, cls
    for cls in (DeployError, SimulationError):
        assert issubclass(cls, RunFailedError) and cls.exit_code == 1, cls
    assert issubclass(ConfigError, ValueError)  # callers that catch ValueError keep working


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["check", TINY, "--set", "train.no_such_key=3"], "no_such_key"),
        (["check", "missing.yaml"], "missing.yaml: no such config file"),
        (["check", TINY, "--set", "strategy.name=fedavgx"], "fedavgx"),
        (["check", TINY, "--set", "lora.r=0"], "lora.r"),
        # local DP: a budget no noise up to privacy.max_noise_multiplier meets, a batch above a client's data
        (["check", TINY, "--set", "privacy.mode=local", "--set", "privacy.target_epsilon=0.01"], ">= 0.0106"),
        (["check", TINY, "--set", "privacy.mode=local", "--set", "train.batch_size=300"], "the logical batch 300"),
        (["simulate", "--resume", "no-run"], "no such config file"),
        (["generate", "no-run", "hello"], "no-run is not a run directory"),
        (["chat", "no-run"], "no-run is not a run directory"),
    ],
)
def test_user_error_is_one_line_exit_2(argv: list[str], needle: str, tmp_path: Path) -> None:
    r = _fedslm(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    # one error line (library import noise such as bitsandbytes' kernel notice is the quiet-console issue's)
    lines = [line for line in r.stderr.splitlines() if line.startswith("fedslm: ")]
    assert len(lines) == 1 and lines[0].startswith("fedslm: error: "), r.stderr
    assert needle in lines[0]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = _fedslm("--debug", "check", "missing.yaml", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ConfigError: missing.yaml: no such config file" in r.stderr


def test_a_run_that_trained_nothing_fails_with_the_clients_reasons(tmp_path: Path) -> None:
    """Every round skipped (all clients failed): exit 1 with what the clients said, not a results table."""
    from fedslm.simulation.run import check_trained

    from fedslm.errors import RunFailedError

    round0 = {"round": 0, "eval_loss": 3.2, "clients": 0, "failed": 0, "declined": 0, "skipped": False, "errors": []}
    bad = {"clients": 0, "failed": 4, "declined": 0, "skipped": True, "errors": ["DataError: client 3 has no records"]}
    rows = [round0, {"round": 1, **bad}, {"round": 2, **bad, "failed": 3, "declined": 1}]
    with pytest.raises(RunFailedError) as err:
        check_trained(rows, tmp_path)
    message = str(err.value)
    assert "2 of 2 rounds skipped (7 client failures, 1 declines" in message
    assert "clients said: DataError: client 3 has no records" in message and err.value.exit_code == 1
    # one round that trained is a run: no error
    check_trained([round0, {"round": 1, **bad}, {"round": 2, **bad, "clients": 2, "skipped": False}], tmp_path)


def test_a_deployed_run_that_trained_nothing_ends_failed_with_the_reason(tmp_path: Path) -> None:
    """The deployed ServerApp: every node silent, every round skipped -> RunFailedError (Flower marks the
    run failed), said in run.log too; the run's files are kept."""
    from types import SimpleNamespace

    from fedslm.server.app import main as server_main
    from flower_fakes import FakeGrid

    run = tmp_path / "run"
    context = SimpleNamespace(run_id=7, run_config={"config": TINY, "out-dir": str(run)})
    skipped = r"no round trained: 2 of 2 rounds skipped \(0 client failures, 0 declines"
    with pytest.raises(RunFailedError, match=skipped):
        server_main(FakeGrid(4), context)  # type: ignore[arg-type]
    assert "no round trained" in (run / "run.log").read_text()
    assert (run / "metrics.jsonl").is_file() and (run / "summary.json").is_file()


def test_failure_line_is_the_exception_a_client_raised() -> None:
    from fedslm.server.federation import failure_line

    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m"
        ' (pid=1, ip=192.0.2.2)\n  File "x.py", line 3, in run\n    raise DataError(...)\n    ^^^^^^^^\n'
        "fedslm.data.DataError: client 3 has no training records\n"
    )
    assert failure_line(ray) == "fedslm.data.DataError: client 3 has no training records"
    inprocess = (  # federation.backend=inprocess: the traceback, in Flower's wrapper
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'Traceback (most recent call last):\n"
        '  File "x.py", line 3, in run\n    raise DataError(...)\n'
        "fedslm.data.DataError: client 3 has no training records\n'>"
    )
    assert failure_line(inprocess) == "fedslm.data.DataError: client 3 has no training records"
    assert failure_line("") == "no reason given" and len(failure_line("x" * 500)) == 300


def test_simulate_that_trains_nothing_exits_1_naming_the_cause(tmp_path: Path) -> None:
    """End to end, tiny federation: the preflight passes, then every client fails at train time (its
    state directory cannot be written: a file stands where ``<cache>/client-state`` should be, as a
    full or read-only disk would); `fedslm simulate` exits 1 with the clients' own reason instead of
    printing a results table. (A Dirichlet split that leaves a client empty is refused before the run:
    tests/test_preflight.py.)"""
    from fedslm.model import cache_root

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_root() / "models", target_is_directory=True)  # the built tiny model
    (cache / "client-state").write_text("not a directory\n")
    proc = _fedslm(
        "simulate", TINY, "--no-progress", "--out", str(tmp_path / "run"),
        "--set", "federation.num_rounds=1", "--set", f"model.cache_dir={cache}",
        "--set", "communication.quantize_delta=true",  # each client keeps its error-feedback residual on disk
        cwd=tmp_path,
    )  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith("fedslm: error: no round trained: 1 of 1 rounds skipped"), last
    assert "client-state" in last and "round  train_loss" not in proc.stdout
    assert (cache / "client-state").read_text() == "not a directory\n"  # nothing of the user's was replaced


def _mistake(case: str, tmp: Path) -> tuple[list[str], str]:
    """Set up one user mistake in ``tmp``: (the fedslm argv, what its one error line must say)."""
    victim = tmp / "victim"
    data = ["check", TINY, "--set"]
    if case == "bad key":
        return ["check", TINY, "--set", "train.no_such_key=3"], "no_such_key"
    if case == "missing file":
        return ["check", "missing.yaml"], "missing.yaml: no such config file"
    if case == "bad data line":
        victim = victim.with_suffix(".jsonl")
        victim.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": \n')
        return [*data, f"data.source={victim}"], f"{victim}:2: not a JSON object"
    if case in ("bad encoding (jsonl)", "bad encoding (csv)"):
        victim = victim.with_suffix(".jsonl" if "jsonl" in case else ".csv")
        text = '{"question": "caf\u00e9", "answer": "a"}\n' if "jsonl" in case else "question,answer\ncaf\u00e9,a\n"
        victim.write_bytes(text.encode("latin-1"))
        where = "1: byte 0xe9 at column 18" if "jsonl" in case else "2: byte 0xe9 at column 4"
        return [*data, f"data.source={victim}"], f"{victim}:{where} is not UTF-8"
    if case == "corrupt parquet":
        victim = victim.with_suffix(".parquet")
        victim.write_bytes(b"PAR1" + b"\0" * 64)
        return [*data, f"data.source={victim}"], f"{victim}: not a readable Parquet file"
    if case == "non-empty --out":
        victim.mkdir()
        (victim / "notes.txt").write_text("mine\n")
        needle = f"--out {victim} exists and is not empty (1 entries: notes.txt)"
        return ["simulate", TINY, "--out", str(victim)], needle
    if case == "--out is a file":
        victim.write_text("mine\n")
        return ["simulate", TINY, "--out", str(victim)], "is a file, not a folder"
    if case == "--out holds a run":
        victim.mkdir()
        (victim / "run.json").write_text('{"run_name": "r"}')
        return ["simulate", TINY, "--out", str(victim)], f"`fedslm simulate --resume {victim}` continues it"
    if case == "missing run dir":
        return ["simulate", "--resume", "no-run"], "no-run/config.yaml: no such config file"
    if case == "resume without run.json":
        victim.mkdir()
        (victim / "config.yaml").write_text(Path(TINY).read_text())
        return ["simulate", "--resume", str(victim)], f"--resume {victim}: no run.json"
    if case == "resume with --force":
        return ["simulate", "--resume", str(victim), "--force"], "drop CONFIG/--set/--out/--ray-address/--force"
    if case == "export of no run":
        return ["export", "no-run", "--format", "peft", "--out", str(victim)], "no-run is not a run directory"
    if case == "certs into a non-empty folder":
        victim.mkdir()
        (victim / "notes.txt").write_text("mine\n")
        return ["certs", "--out", str(victim), "--nodes", "1"], "not empty (1 entries: notes.txt)"
    if case == "unknown flag":
        return ["simulate", TINY, "--sett", "x=1"], "unrecognized arguments: --sett x=1 (see `fedslm --help`)"
    if case == "unknown subcommand":
        return ["simulte", TINY], "invalid choice: 'simulte'"
    if case == "missing argument":
        return ["export", "--format", "peft"], "required: run_dir, --out (see `fedslm export --help`)"
    raise AssertionError(case)


USER_MISTAKES = [
    "bad key",
    "missing file",
    "bad data line",
    "bad encoding (jsonl)",
    "bad encoding (csv)",
    "corrupt parquet",
    "non-empty --out",
    "--out is a file",
    "--out holds a run",
    "missing run dir",
    "resume without run.json",
    "resume with --force",
    "export of no run",
    "certs into a non-empty folder",
    "unknown flag",  # argparse's own errors: one line too, not the usage text
    "unknown subcommand",
    "missing argument",
]


@pytest.mark.parametrize("case", USER_MISTAKES)
def test_each_user_error_class_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    argv, needle = _mistake(case, tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    r = _fedslm(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("fedslm: error:")]
    assert len(errors) == 1 and not [x for x in r.stderr.splitlines() if x.startswith("fedslm") and x not in errors]
    assert needle in errors[0], errors[0]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written


def test_simulate_force_replaces_the_folder_and_says_what(tmp_path: Path) -> None:
    """--force: the old entries are named in one line and removed, then the run writes its own files.
    (An unreachable federation.ray_address stops it right after, before Ray or any model starts.)"""
    victim = tmp_path / "victim"
    (victim / "adapters" / "round-001").mkdir(parents=True)
    (victim / "metrics.jsonl").write_text('{"round": 0}\n')
    r = _fedslm(
        "simulate", TINY, "--out", str(victim), "--force", "--no-progress",
        "--set", "federation.backend=ray", "--set", "federation.ray_address=127.0.0.1:1", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    forced = [line for line in r.stderr.splitlines() if "--force: replacing" in line]
    assert len(forced) == 1 and forced[0].endswith(f"--force: replacing 2 entries of {victim}: adapters, metrics.jsonl")
    assert sorted(p.name for p in victim.iterdir()) == ["run.json", "run.log"]  # the old metrics are gone; the run logs
    assert r.stderr.strip().splitlines()[-1].startswith("fedslm: error: federation.ray_address: nothing answers")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_or_after_the_subcommand(where: str, tmp_path: Path) -> None:
    argv = ["check", "missing.yaml"]
    r = _fedslm(*(["--debug", *argv] if where == "before" else [*argv, "--debug"]), cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ConfigError: missing.yaml: no such config file" in r.stderr


def test_resume_reads_the_run_name_or_says_why_it_cannot(tmp_path: Path) -> None:
    from fedslm.simulation.run import RunDirError, read_run_name

    with pytest.raises(RunDirError, match=r"no run.json, so it is not a run of `fedslm simulate`"):
        read_run_name(tmp_path)
    for damaged in ("{", "[]", '{"run_name": ""}', '{"name": "x"}'):
        (tmp_path / "run.json").write_text(damaged)
        with pytest.raises(RunDirError, match="no run_name in it; it is damaged"):
            read_run_name(tmp_path)
    (tmp_path / "run.json").write_text('{"run_name": "run-20261206000822-28633", "num_clients": 4}')
    assert read_run_name(tmp_path) == "run-20261206000822-28633"
