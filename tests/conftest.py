"""Shared fixtures. No network here: telemetry and update checks off; models come from the cache."""

from __future__ import annotations

import logging
import os

for _k, _v in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fedslm.config import RunConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# `make suite` runs three pytest-xdist workers on CI's 2 cores: one torch thread each (two each would
# oversubscribe them further); a plain `pytest` keeps both threads. The processes the tests start (the fedslm
# command, Flower's, Ray's workers, which take OMP_NUM_THREADS where it is set) get one thread too: a
# Ray worker with 2 CPUs reserved ran 2 OpenMP threads beside the other pytest worker and took 343 s
# for a test that takes 90 s alone.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else 2)
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The longest tests of their files run in a group of their own (they use no module fixtures), so that
# xdist can put them on different workers; every other test runs on the worker of its file's group.
# (In Flower 1.42 each SuperLink listens on its own --port only: deployments in two workers at once do
# not collide, nor with the managed local SuperLink of `flwr run`, on 39091 and 39093.)
OWN_GROUP = {
    "test_superlink_and_serverapp_killed_in_round_two_resume_to_the_same_adapter",
    "test_tls_federation_of_three_authenticated_nodes",
    "test_dp_training_on_nf4_smollm2_changes_lora_every_step_and_lowers_loss",
}
# The longest groups first (`make suite` passes --no-loadscope-reorder, which keeps this order; xdist
# would otherwise start the groups with the most tests first, and a long group of few tests ended the
# suite alone). Wall seconds on two workers, AVX2 EPYC, 2026-12-07: real SmolLM2 332 (150 of them
# DP training), deploy resume 236, resume 431 (a Ray worker oversubscribed, see above; 180 expected),
# classification 178, deploy TLS 155, federation 152, export 134, flwr run 87, audit 79, model 76.
SLOWEST_FIRST = [
    "test_superlink_and_serverapp_killed_in_round_two_resume_to_the_same_adapter",
    "test_real_smollm2.py",
    "test_resume.py",
    "test_classification.py",
    "test_tls_federation_of_three_authenticated_nodes",
    "test_dp_training_on_nf4_smollm2_changes_lora_every_step_and_lowers_loss",
    "test_federation.py",
    "test_export.py",
    "test_flwr_run.py",
    "test_audit.py",
    "test_model.py",
    "test_errors.py",
    "test_console.py",
    "test_ray_attach.py",
    "test_plan.py",
    "test_training.py",
]


def _group(item: pytest.Item) -> str:
    name = getattr(item, "originalname", item.name)
    return name if name in OWN_GROUP else item.path.name


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` a file's tests run on one worker (its module and session fixtures are
    built once), each test of :data:`OWN_GROUP` on a worker of its own choosing, and the groups in
    :data:`SLOWEST_FIRST` start first. First among the hooks: xdist's worker reads the ``xdist_group``
    marks in its own hook (into the node ids it schedules by), and without ``tryfirst`` it ran before
    this one: the marks came too late and every file was spread over the workers."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {name: k for k, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: each file keeps its order


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a pytest whose --dist loadgroup silently groups nothing: pytest 9.2 broke xdist 3.8's
    grouping (pytest-dev/pytest-xdist#1386), which would put the two SuperLink files on each other's
    ports and make the suite a third slower. pyproject.toml keeps the dev install below it."""
    from packaging.version import Version  # pytest's own dependency

    if config.getoption("dist", "no") == "loadgroup" and Version(pytest.__version__) >= Version("9.2.dev0"):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} ignores --dist loadgroup's groups (pytest-dev/pytest-xdist#1386):"
            " pip install 'pytest<9.2' (`pip install -e .[dev]` does), or run without -n"
        )


@pytest.fixture
def fedslm_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on the ``fedslm`` logger at WARNING (it does not propagate once a CLI test has set up logging;
    where it still does, a record comes twice)."""
    logger = logging.getLogger("fedslm")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="fedslm")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


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
            "federation.backend=inprocess",  # the clients share this process's SmolLM2
            "train.local_steps=3",
            "train.batch_size=8",
            "data.num_records=1200",
            "data.eval_size=8",
        ],
    )
    out = tmp_path_factory.mktemp("real") / "run"
    rows = simulate(cfg, out, progress=False)
    return out, rows
