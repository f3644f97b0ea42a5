"""server/report.py: summary.json and metrics.png are written through fedslm.fs (temp, fsync, rename)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedslm.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _row(rnd: int, loss: float, acc: float) -> dict:
    return {
        "round": rnd, "train_loss": None if rnd == 0 else loss + 0.1, "eval_loss": loss, "eval_accuracy": acc,
        "epsilon_max": None, "bytes_up": 100 * rnd, "bytes_down": 200 * rnd, "wall_s": 1.5, "failed": 0,
        "declined": 0, "rejected": 0, "skipped": False, "best_round": 1,
    }  # fmt: skip


def test_write_results_replaces_summary_and_plot_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedslm.server import report

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    rows = [_row(0, 3.0, 0.25), _row(1, 2.0, 0.5), _row(2, 2.5, 0.5)]
    summary = report.write_results(tmp_path, cfg, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png", "summary.json"]  # no temp left
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary and on_disk["best"]["round"] == 1 and on_disk["totals"]["bytes_up"] == 300
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", crash)
    with pytest.raises(OSError, match="disk full"):
        report.plot(rows[:2], tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes() == png  # the old plot is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png", "summary.json"]
