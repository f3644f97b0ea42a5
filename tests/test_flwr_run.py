"""`flwr run .` runs the same ServerApp/ClientApp as `fedslm simulate` and gets the same numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedslm.config import load_config
from fedslm.deploy import stage_app

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration

FLWR_CONFIG = """[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = 4
options.backend.client-resources.num-cpus = 1
"""


def _stop_local_superlink(flwr_home: Path) -> None:
    """The managed local SuperLink is detached; stop the one that belongs to this FLWR_HOME."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in args and str(flwr_home) in args:
            os.kill(int(proc.name), signal.SIGTERM)
            for _ in range(100):  # up to 10 s for a graceful stop
                if not proc.exists():
                    break
                time.sleep(0.1)
            else:
                os.kill(int(proc.name), signal.SIGKILL)


def test_flwr_run_matches_fedslm_simulate(tmp_path: Path) -> None:
    from fedslm.simulation.run import simulate

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(FLWR_CONFIG)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else the SuperLink pip-installs the app's deps
        # flwr spawns `flower-superlink` by name: the venv's bin must be on PATH even when not activated
        "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = tmp_path / "flwr-run"
    flwr = Path(os.sys.executable).with_name("flwr")
    # the app's FAB files, as `fedslm run` hands them over: flwr would walk the venvs under ROOT for ~30 s
    app = stage_app(ROOT, tmp_path / "app")
    cmd = [
        str(flwr),
        "run",
        str(app),
        "local",
        "--stream",
        "--run-config",
        f'config="configs/tiny.yaml" out-dir="{out}"',
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    finally:
        _stop_local_superlink(home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert (out / "summary.json").is_file() and (out / "adapters" / "round-002" / "adapter_config.json").is_file()

    same = simulate(load_config(ROOT / "configs" / "tiny.yaml"), tmp_path / "sim", progress=False)
    for a, b in zip(rows, same, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-6)
        assert a["bytes_up"] == pytest.approx(b["bytes_up"], abs=64)  # metrics carry timings (float repr)
