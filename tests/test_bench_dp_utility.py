"""bench/dp_utility.py's arithmetic and plumbing (no training: a fake federation answers), and the
user-style tickets of bench/userdata.py read through fedslm's own-data path."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import dp_utility  # noqa: E402
import userdata  # noqa: E402
from common import Run  # noqa: E402
from dp_utility import Outcome, gain_kept  # noqa: E402

from fedslm import data  # noqa: E402
from fedslm.config import load_config  # noqa: E402


def _rows(accuracies: list[float], best_round: int, per_client: dict[str, float]) -> list[dict]:
    rows = [
        {"round": r, "eval_accuracy": a, "best_round": best_round, "epsilon_max": None}
        for r, a in enumerate(accuracies)
    ]
    rows[-1]["per_client"] = {c: {"eval_accuracy": a, "eval_loss": 1.0} for c, a in per_client.items()}
    rows[-1]["epsilon_max"] = 7.9
    return rows


def test_gain_kept_by_hand() -> None:
    assert gain_kept(0.55, 0.85, 0.10) == pytest.approx(0.45 / 0.75)  # 60%
    assert gain_kept(0.10, 0.85, 0.10) == 0.0
    assert gain_kept(0.30, 0.10, 0.10) is None  # nothing gained without DP: no share to speak of


def test_a_run_ending_more_than_two_points_below_its_best_round_is_flagged() -> None:
    fell = Outcome.of(Run("x", _rows([0.10, 0.60, 0.55], 1, {"1": 0.7, "0": 0.5}), 3.0))
    assert (fell.base, fell.final, fell.best, fell.best_round) == (0.10, 0.55, 0.60, 1)
    assert fell.fell_back and fell.per_client == {"0": 0.5, "1": 0.7} and fell.epsilon == 7.9
    held = Outcome.of(Run("y", _rows([0.10, 0.60, 0.59], 1, {}), 3.0))
    assert not held.fell_back  # 0.59 >= 0.60 - 0.02


def test_curve_table_and_png(tmp_path: Path) -> None:
    dp = Outcome.of(Run("dp", _rows([0.10, 0.60, 0.55], 1, {"0": 0.5, "1": 0.7}), 60.0))
    nodp = Outcome.of(Run("nodp", _rows([0.10, 0.80, 0.85], 2, {"0": 0.9, "1": 0.8}), 40.0))
    text = dp_utility.curve_table({"triage": {"8": dp, "none": nodp}})
    assert "| triage | 8 | 0.100 | 0.550 | 0.600 (round 1) | **yes** | 0: 0.50, 1: 0.70 | 7.90 | 60% | 60 |" in text
    assert "| triage | none | 0.100 | 0.850 | 0.850 (round 2) | no | 0: 0.90, 1: 0.80 | 7.90 | 100% | 40 |" in text
    png = tmp_path / "out" / "curve.png"
    dp_utility.plot({"triage": {"8": dp, "none": nodp}}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_none_set_overrides_only_the_runs_without_dp(tmp_path, monkeypatch) -> None:
    calls: dict[str, list[str]] = {}

    def fake_run(label: str, config: str, overrides: list[str], *, per_client: bool = False) -> Run:
        calls[label] = overrides
        return Run(label, _rows([0.0, 0.5], 1, {"0": 0.5}), 1.0)

    monkeypatch.setattr(dp_utility, "run", fake_run)
    argv = ["--task", "triage", "--epsilons", "8", "none", "--set", "data.num_records=1200"]
    bench = dp_utility.Bench(dp_utility.parse([*argv, "--none-set", "train.learning_rate=0.005"]))
    bench.curve("triage", ["8", "none"])
    assert calls["triage: epsilon 8"][-1] == "data.num_records=1200"  # no lr of its own
    assert "train.learning_rate=0.005" not in calls["triage: epsilon 8"]
    assert calls["triage: epsilon none"][-2:] == ["data.num_records=1200", "train.learning_rate=0.005"]


def test_gpu_configuration_comes_before_set_and_needs_cuda(monkeypatch, capsys) -> None:
    monkeypatch.setattr(dp_utility, "_cuda", lambda: True)
    bench = dp_utility.Bench(dp_utility.parse(["--gpu", "--set", "train.batch_size=512"]))
    assert bench.extra == [*dp_utility.GPU, "train.batch_size=512"]  # a later --set wins
    assert dict(dp_utility.effective(bench.extra))["train.batch_size"] == "512"
    assert "model.device=cuda" in dp_utility.GPU and "train.batch_size=256" in dp_utility.GPU
    assert dp_utility.Bench(dp_utility.parse([])).extra == []  # the CPU configuration by default
    monkeypatch.setattr(dp_utility, "_cuda", lambda: False)
    with pytest.raises(SystemExit):
        dp_utility.parse(["--gpu"])
    assert "--gpu: no CUDA device here" in capsys.readouterr().err


def test_ablation_runs_each_lever_with_and_without_dp_and_combines_those_that_helped(tmp_path, monkeypatch) -> None:
    """A fake federation: lr 0.04 and rank 2 each add 0.1 to the private accuracy, the other levers
    nothing; without DP every run reaches 0.9 from 0.1."""
    calls: list[list[str]] = []

    def fake_run(label: str, config: str, overrides: list[str], *, per_client: bool = False) -> Run:
        assert not per_client and config.endswith("demo.yaml")  # the ablation table has no per-client column
        calls.append(overrides)
        if "privacy.mode=none" in overrides:
            final = 0.9
        else:
            final = 0.3 + 0.1 * ("train.learning_rate=0.04" in overrides) + 0.1 * ("lora.r=2" in overrides)
        return Run(label, _rows([0.1, final], 1, {}), 1.0)

    monkeypatch.setattr(dp_utility, "run", fake_run)
    argv = ["--ablation", "--out", str(tmp_path / "x.png"), "--none-set", "train.learning_rate=0.005"]
    rows = dp_utility.Bench(dp_utility.parse(argv)).ablation("triage")
    names = [r[0] for r in rows]
    together = "together: learning rate 0.04 + rank 2 (alpha 4: the same scale)"
    assert names == ["baseline", *(n for n, _ in dp_utility.LEVERS), together]
    assert rows[-1][1] == ["train.learning_rate=0.04", "lora.r=2", "lora.alpha=4"]
    assert rows[-1][2].final == pytest.approx(0.5) and rows[-1][3].final == 0.9
    assert gain_kept(rows[-1][2].final, rows[-1][3].final, rows[-1][2].base) == pytest.approx(0.5)
    # 15 private runs (the recipe, 13 levers, together). Without DP every run takes lr 0.005 (--none-set
    # comes last and wins), so the levers that only move the accountant, the DP clipping norm or the
    # learning rate share the recipe's run, and the combination shares rank 2's: 10 runs without DP, 25 in
    # all, none twice
    assert len(dp_utility.LEVERS) == 13
    assert len(calls) == 25 and len({dp_utility.effective(c) for c in calls}) == 25
    nodp = [c for c in calls if "privacy.mode=none" in c]
    assert len(nodp) == 10 and all(c[-1] == "train.learning_rate=0.005" for c in nodp)
    assert not any(o.startswith("privacy.accountant") for c in nodp for o in c)
    text = dp_utility.ablation_table(rows)
    assert (
        "| rank 2 (alpha 4: the same scale) | `lora.r=2` `lora.alpha=4` | 0.400 | 0.400 | 0.900 | 38% | 7.90 | 1 |"
        in text
    )


def test_effective_overrides_let_the_later_of_two_win() -> None:
    assert dp_utility.effective(["a=1", "b=2", "a=3"]) == (("a", "3"), ("b", "2"))
    assert dp_utility.effective(["x=1=2"]) == (("x", "1=2"),)


def test_user_tickets_load_through_the_own_data_path_with_their_labels(tmp_path: Path) -> None:
    path = userdata.write(tmp_path / "tickets.jsonl", 600, seed=3)
    assert path.read_bytes() == userdata.write(tmp_path / "again.jsonl", 600, seed=3).read_bytes()
    assert path.read_bytes() != userdata.write(tmp_path / "other.jsonl", 600, seed=4).read_bytes()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", userdata.overrides(path))
    records = data.load_records(cfg.data, tmp_path)
    generated = userdata.generate(600, seed=3)
    assert [r["team"] for r in records] == [g["team"] for g in generated]
    assert data.label_names(cfg.data, records) == sorted(userdata.TEAMS)
    parts = data.client_partitions(cfg.data, tmp_path, 4, records)
    assert sum(len(p) for p in parts) == 540  # 600 less the 10% test split
    # the natural partitioner gives each site its own client, with its own mix of teams (non-IID)
    for part in parts:
        (site,) = {r["site"] for r in part}
        weights = userdata.SITES[site]
        if sorted(weights)[-1] > sorted(weights)[-2]:  # a site with one clear main team
            assert (
                Counter(r["team"] for r in part).most_common(1)[0][0]
                == list(userdata.TEAMS)[weights.index(max(weights))]
            )
