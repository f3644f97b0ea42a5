"""The 100-client federation (``configs/scale-100.yaml``: 10 clients sampled per round, DP-SGD):
wall time per round and peak memory of the whole simulation.

Memory is sampled twice a second over this process and all its descendants (Ray's GCS, raylet,
the workers that hold the resident models): the summed PSS (shared pages split between the
processes that map them, so Ray's shared object store is not counted once per worker), the summed
RSS (an upper bound), and the machine's used memory above what it was before the run.

    .venv/bin/python bench/scale.py [--config configs/scale-100.yaml] [--set federation.num_rounds=3 ...]
"""

from __future__ import annotations

import argparse
import statistics
import threading
from dataclasses import dataclass

import psutil
from common import ROOT, run, table


@dataclass
class Peak:
    pss_gb: float = 0.0
    rss_gb: float = 0.0
    used_gb: float = 0.0


def sample_tree(stop: threading.Event, peak: Peak, baseline_used: int, every_s: float = 0.5) -> None:
    me = psutil.Process()
    while not stop.wait(every_s):
        pss = rss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss += info.pss
            rss += info.rss
        used = psutil.virtual_memory().used - baseline_used
        peak.pss_gb = max(peak.pss_gb, pss / 1e9)
        peak.rss_gb = max(peak.rss_gb, rss / 1e9)
        peak.used_gb = max(peak.used_gb, used / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "scale-100.yaml"))
    parser.add_argument("--set", action="append", default=[], help="overrides, e.g. federation.num_rounds=3")
    args = parser.parse_args()

    peak, stop = Peak(), threading.Event()
    sampler = threading.Thread(target=sample_tree, args=(stop, peak, psutil.virtual_memory().used), daemon=True)
    sampler.start()
    try:
        result = run("scale", args.config, args.set)
    finally:
        stop.set()
        sampler.join()
    rounds = [r for r in result.rows if r["round"] > 0]
    per_round = [float(r["wall_s"]) for r in rounds]
    clients = [int(r.get("clients") or 0) for r in rounds]
    print()
    print(
        table(
            [
                "rounds",
                "clients per round",
                "wall s per round (median)",
                "min-max",
                "whole run s",
                "peak PSS GB",
                "peak RSS sum GB",
                "peak used above baseline GB",
                "final acc",
                "epsilon max",
            ],
            [
                [
                    str(len(rounds)),
                    f"{statistics.median(clients):.0f}",
                    f"{statistics.median(per_round):.1f}",
                    f"{min(per_round):.1f}-{max(per_round):.1f}",
                    f"{result.wall_s:.0f}",
                    f"{peak.pss_gb:.2f}",
                    f"{peak.rss_gb:.2f}",
                    f"{peak.used_gb:.2f}",
                    f"{result.last['eval_accuracy']:.3f}",
                    f"{max(float(r.get('epsilon_max') or 0) for r in rounds):.3f}",
                ]
            ],
        )
    )
    print("(goal: peak memory of the whole simulation <= 8 GB; rows with evaluation take longer)")


if __name__ == "__main__":
    main()
