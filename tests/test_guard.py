"""The divergence guard: a blown-up round is rejected, its adapter not kept, the learning rate lowered,
and the best round is what export and generate use by default."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from fedslm.server.guard import all_finite, divergence_reason
from flower_fakes import FakeGrid, reply
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedslm import wire
from fedslm.config import load_config
from fedslm.export import best_round, run_adapter
from fedslm.protocol import LR_SCALE

ROOT = Path(__file__).resolve().parent.parent


def test_divergence_reason() -> None:
    assert divergence_reason(5.0, 2.0, 3.0, True) == ""
    assert "7 > 3 x the best so far 2" in divergence_reason(7.0, 2.0, 3.0, True)
    assert divergence_reason(7.0, 2.0, 0.0, True) == ""  # the loss test off
    assert divergence_reason(math.nan, 2.0, 3.0, True) == "central eval loss nan"
    assert "non-finite" in divergence_reason(None, None, 3.0, False)
    assert divergence_reason(None, 2.0, 3.0, True) == ""  # a round without central evaluation
    ok = ArrayRecord({"a": Array(np.zeros(3, np.float32))})
    bad = ArrayRecord({"a": Array(np.array([0.0, np.inf], np.float32))})
    assert all_finite(ok) and not all_finite(bad)


def _blow_up_in_round_2(msg: Message, rnd: int) -> Message:
    """Round 2 both clients add 5 to every LoRA entry (the adapter blows up); the other rounds they
    move it by 1e-3."""
    node = msg.metadata.dst_node_id
    glob = wire.decode(msg.content["arrays"])
    step = 5.0 if rnd == 2 else 1e-3
    update = {k: v + step for k, v in glob.items()}
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "client-id": node - 1})
    return reply(node, RecordDict({"arrays": wire.encode(update, "float32"), "metrics": metrics}))


def test_a_blown_up_round_is_rejected_and_the_best_round_is_exported_by_default(tmp_path: Path) -> None:
    from fedslm.server.federation import Federation
    from safetensors.torch import load_file

    # the tiny random model's loss stays near log(vocab) = 10.8 whatever LoRA does (measured: 10.770 at
    # round 0, 10.770 after the small step, 10.824 after the +5 one), so the factor is set tight
    overrides = ["federation.num_clients=2", "federation.num_rounds=3", "communication.dtype=float32"]
    overrides.append("federation.divergence_factor=1.002")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    grid = FakeGrid([1, 2], _blow_up_in_round_2)
    rows = Federation(cfg, tmp_path / "run", "guard").run(grid)
    # the learning-rate factor each round's config carried (absent: 1.0)
    lr_scales = [float(sent[1].content["config"].get(LR_SCALE, 1.0)) for sent in grid.sent]
    assert [r["diverged"] is not None for r in rows[1:]] == [False, True, False]
    assert "federation.divergence_factor" in rows[2]["diverged"]
    assert lr_scales == [1.0, 1.0, 0.5]  # halved for the rounds after the rejected one
    assert [r["lr_scale"] for r in rows[1:]] == [1.0, 0.5, 0.5]
    adapters = tmp_path / "run" / "adapters"
    r1, r2 = (load_file(str(adapters / f"round-00{r}" / "adapter_model.safetensors")) for r in (1, 2))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)  # round 2's aggregate was not kept
    assert rows[2]["eval_loss"] == rows[1]["eval_loss"]  # the row describes the adapter that was kept
    losses = {r["round"]: r["eval_loss"] for r in rows if not r["diverged"]}
    best = min(losses, key=losses.__getitem__)
    assert rows[-1]["best_round"] == best_round(tmp_path / "run") == best
    assert run_adapter(tmp_path / "run")[1] == adapters / f"round-{best:03d}"
