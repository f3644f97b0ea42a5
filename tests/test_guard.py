"""The divergence guard: a blown-up round is rejected, its adapter not kept, the learning rate lowered,
and the best round is what export and generate use by default."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from fedslm.server.guard import Kept, all_finite, divergence_reason
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
    # the accuracy test: more than `drop` below the best so far; one record of 48 is 0.0208 > 0.02
    why = divergence_reason(1.0, 2.0, 3.0, True, 35 / 48, 36 / 48, 0.02)
    assert why == "central accuracy 0.7292 < the best so far 0.75 - 0.02 (federation.accuracy_drop)"
    assert divergence_reason(1.0, 2.0, 3.0, True, 0.74, 0.75, 0.02) == ""  # 0.01 below
    assert divergence_reason(1.0, 2.0, 3.0, True, 0.0, 0.75, 1.0) == ""  # drop 1: the accuracy test off
    assert divergence_reason(1.0, 2.0, 3.0, True, None, 0.75, 0.02) == ""  # a task without accuracy
    assert "divergence_factor" in divergence_reason(7.0, 2.0, 3.0, True, 0.0, 0.75, 0.02)  # the loss test first
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


def test_kept_rounds_rank_by_accuracy_then_loss_and_restore_old_checkpoints() -> None:
    kept = Kept()
    assert kept.best_round is None and kept.loss is None and kept.accuracy is None
    for rnd, loss, acc in [(0, 2.0, 0.0), (1, 1.5, 0.5), (2, 1.2, 0.5), (3, 1.1, 0.3)]:
        kept.add(rnd, loss, acc)
    assert (kept.loss, kept.accuracy) == (1.1, 0.5)  # each best over the kept rounds
    assert kept.best_round == 2  # 0.5 twice: the lower loss of the two
    assert Kept.restore({"kept": kept.state()}) == kept
    # a task without accuracy: the lowest loss
    assert Kept([(0, 2.0, None), (1, 1.0, None), (2, 1.4, None)]).best_round == 1
    # a checkpoint written before Kept: only the best round's [loss, round]
    assert Kept.restore({"best": [1.25, 4]}) == Kept([(4, 1.25, None)])
    assert Kept.restore({}) == Kept()


# the scripted central evaluation: an adapter moved k rounds away from the start scores (loss, accuracy)
# SCRIPT[k]; the loss falls every round while accuracy overshoots after round 1, as the demo's DP recipe
# (lr 0.02) did without DP: exact match 0.229 -> 0.167 while the eval loss fell 1.44 -> 1.15
SCRIPT = {0: (2.0, 0.0), 1: (1.5, 0.5), 2: (1.2, 0.3), 3: (1.0, 0.25)}


def _one_step(msg: Message, rnd: int) -> Message:
    """Each client adds 1 to every LoRA entry: the aggregate is the global adapter + 1."""
    node = msg.metadata.dst_node_id
    update = {k: v + 1.0 for k, v in wire.decode(msg.content["arrays"]).items()}
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "client-id": node - 1})
    return reply(node, RecordDict({"arrays": wire.encode(update, "float32"), "metrics": metrics}))


def _scripted_run(tmp_path: Path, drop: float) -> tuple[list[dict], FakeGrid, int]:
    """(rows, the grid, how many central evaluations ran)."""
    from fedslm.server.federation import Federation

    class Scripted(Federation):
        start: np.ndarray | None = None
        calls = 0

        def _evaluate(self, rnd: int, arrays: ArrayRecord) -> dict:
            self.calls += 1
            first = next(iter(arrays.values())).numpy()
            if self.start is None:
                self.start = first.copy()
            loss, acc = SCRIPT[round(float(np.mean(first - self.start)))]
            return {"eval_loss": loss, "perplexity": math.exp(loss), "eval_accuracy": acc}

    overrides = ["federation.num_clients=2", "federation.num_rounds=3", "communication.dtype=float32"]
    overrides.append(f"federation.accuracy_drop={drop}")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    grid = FakeGrid([1, 2], _one_step)
    fed = Scripted(cfg, tmp_path / f"run-{drop}", "guard")
    return fed.run(grid), grid, fed.calls


def test_a_round_that_loses_accuracy_is_rejected_though_its_loss_fell(tmp_path: Path) -> None:
    rows, grid, calls = _scripted_run(tmp_path, 0.02)
    assert [r["eval_accuracy"] for r in rows] == [0.0, 0.5, 0.5, 0.5]  # rounds 2 and 3 keep round 1's adapter
    assert [r["diverged"] for r in rows[1:]] == [
        None,
        "central accuracy 0.3 < the best so far 0.5 - 0.02 (federation.accuracy_drop)",
        "central accuracy 0.3 < the best so far 0.5 - 0.02 (federation.accuracy_drop)",
    ]
    assert [float(s[1].content["config"].get(LR_SCALE, 1.0)) for s in grid.sent] == [1.0, 1.0, 0.5]
    assert rows[-1]["lr_scale"] == 0.25 and rows[-1]["best_round"] == 1
    assert best_round(tmp_path / "run-0.02") == 1
    assert calls == 4  # rounds 0-3; a rejected round's row reuses the kept adapter's evaluation

    # the accuracy test off: every round is kept, the loss falls to 1.0, and the best round is still
    # the one with the highest accuracy, not the lowest loss
    rows, _, calls = _scripted_run(tmp_path, 1.0)
    assert [r["eval_accuracy"] for r in rows] == [0.0, 0.5, 0.3, 0.25] and not any(r["diverged"] for r in rows)
    assert [r["eval_loss"] for r in rows] == [2.0, 1.5, 1.2, 1.0] and rows[-1]["best_round"] == 1
