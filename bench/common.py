"""What the federation benchmarks share: one simulated run with overrides, timed, and a table."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Run:
    label: str
    rows: list[dict[str, Any]]
    wall_s: float

    @property
    def first(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1]

    @property
    def gain(self) -> float:
        return self.last["eval_accuracy"] - self.first["eval_accuracy"]

    def total(self, key: str) -> int:
        return sum(int(r.get(key) or 0) for r in self.rows)


def run(label: str, config: str, overrides: list[str], *, per_client: bool = False) -> Run:
    """One federation, sequentially in this process; prints a line when done. ``per_client``: every
    client also scores each round's global adapter on its own validation records (``row["per_client"]``)."""
    from fedslm.simulation.run import simulate

    from fedslm.config import load_config

    cfg = load_config(config, [*overrides, f"eval.per_client={str(per_client).lower()}"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = simulate(cfg, Path(tmp) / "run", progress=False)
    result = Run(label, rows, time.perf_counter() - t0)
    print(
        f"{label}: accuracy {result.first['eval_accuracy']:.3f} -> {result.last['eval_accuracy']:.3f},"
        f" loss {result.last['eval_loss']:.4f}, {result.wall_s:.0f} s",
        flush=True,
    )
    return result


def table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table (right-aligned numbers), ready to paste into BENCHMARKS.md."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)
