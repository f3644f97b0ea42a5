"""Shared fixtures. No network here: telemetry and update checks off; models come from the cache."""

from __future__ import annotations

import os

for _k, _v in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fedslm.config import RunConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# `make suite` runs two pytest-xdist workers on CI's 2 cores: one torch thread each (two each would
# oversubscribe them); a plain `pytest` keeps both threads
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else 2)
# Files whose tests start a Flower SuperLink: its ServerAppIo and Control APIs listen on fixed ports
# (9091 and 9093; 39091 and 39093 for `flwr run`'s local one), so two SuperLinks at once on one machine
# collide; these files share one worker.
FLOWER_PORTS = {"test_deploy.py", "test_flwr_run.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` a file's tests run on one worker (its module and session fixtures are
    built once), and the files in :data:`FLOWER_PORTS` on the same one."""
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("flower" if name in FLOWER_PORTS else name))


@pytest.fixture
def tiny_cfg() -> RunConfig:
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def _tiny_resident():
    """The resident tiny Llama with LoRA (r=4, float32); ``.initial`` is its seeded adapter."""
    from fedslm.adapters import PEFT_CACHE

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    return PEFT_CACHE.get(cfg.model, cfg.lora)


@pytest.fixture
def tiny_peft(_tiny_resident):
    """The shared tiny LoRA model, set to its initial adapter before and after each test."""
    from fedslm.adapters import load_adapter_state

    resident = _tiny_resident
    load_adapter_state(resident.model, resident.initial)
    yield resident
    load_adapter_state(resident.model, resident.initial)


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Flower 1.41 needs a task identity to build a Message outside a run (unit tests do)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    if TaskIdentity._run_id is None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session")
def real_run_dir(tmp_path_factory):
    """A short DP federation on the real SmolLM2 (2 clients, 1 round, 3 steps): a run directory."""
    from fedslm.simulation.run import simulate

    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        # batches of 8 on the old 1,200 records: a quarter of the demo recipe's compute per step
        [
            "federation.num_clients=2",
            "federation.num_rounds=1",
            "train.local_steps=3",
            "train.batch_size=8",
            "data.num_records=1200",
            "data.eval_size=8",
        ],
    )
    out = tmp_path_factory.mktemp("real") / "run"
    rows = simulate(cfg, out, progress=False)
    return out, rows
