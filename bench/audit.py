"""Privacy audit: what the demo federation leaks with and without DP, and what auditing costs.

Every run is the demo federation (real SmolLM2, 4 hospitals, its LoRA and DP settings) with ``audit:``
on and the same canaries; only ``privacy`` changes: the non-DP control, then local DP at each epsilon.
For each: ROC AUC and TPR at 1% FPR of the canary scores (``audit.score``, the loss by default; the
loss relative to the base model beside it), the one-run empirical epsilon lower bound
next to the accountant's epsilon, and wall time. One more run, the control with
``audit.enabled=false``, gives the audit's overhead (scoring plus the inserted records). Runs are
sequential in this one invocation.

An audit needs a control that memorises. The demo's own recipe (9 steps of 32 from ~2,430 records a
client) draws a canary about once, and the control then shows nothing (AUC 0.51). The bench's recipe
(``MEMORISE``) draws each member canary about 8 times: 2,400 records (~540 a client), 64 canaries with
4 copies of each member (about 32 canary records a client, within the 10% cap), 5 rounds of 30 steps
of 8 (lr 0.005: 1,200 draws a client), and LoRA on all 30 layers (the capacity to memorise).

TPR at 1% FPR needs many canaries: with n non-members, "1% FPR" means above all of them, and a run
that learnt nothing still puts its top k members there with probability about 2^-k. With 32 canaries
(17 members) one such member is 0.059, and the control needs 0.59 to be 10x it; with 64 (about 32
members) it needs about 0.31.

    .venv/bin/python bench/audit.py [--config configs/demo.yaml] [--epsilons none 8 3 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, table

AUDIT = ["audit.enabled=true", "audit.canaries=64", "audit.repeats=4"]
MEMORISE = [
    "data.num_records=2400",
    "train.batch_size=8",
    "train.physical_batch_size=8",
    "train.local_steps=30",
    "train.learning_rate=0.005",
    "federation.num_rounds=5",
    "lora.last_layers=0",
]


def run(label: str, config: str, overrides: list[str]) -> tuple[dict[str, Any] | None, float]:
    """(audit.json or None without the audit, wall seconds) of one simulated federation."""
    from fedslm.simulation.run import simulate

    from fedslm.config import load_config

    cfg = load_config(config, [*overrides, "eval.per_client=false"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        simulate(cfg, Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - t0
        path = Path(tmp) / "run" / "audit.json"
        result = json.loads(path.read_text()) if path.is_file() else None
    print(f"{label}: {wall:.0f} s" + ("" if result is None else f", AUC {result['auc']:.3f}"), flush=True)
    return result, wall


def _shown(config: str) -> str:
    """``config`` as the command line to print: relative to the repository where it lies in it."""
    path = Path(config).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else config


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _privacy(eps: str) -> list[str]:
    return ["privacy.mode=none"] if eps == "none" else ["privacy.mode=local", f"privacy.target_epsilon={eps}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--epsilons", nargs="+", default=["none", "8", "3", "1"])
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every run (after the audit's)")
    args = parser.parse_args()

    # the audit-off control first: the cold start (model conversion, caches) is not charged to the audit
    base = args.epsilons[0]
    off_overrides = [*AUDIT, *MEMORISE, *_privacy(base), *args.set, "audit.enabled=false"]  # same data, no canaries
    _, off = run(f"epsilon {base} (audit off)", args.config, off_overrides)
    lines, walls, scoring = [], {}, {}
    for eps in args.epsilons:
        result, wall = run(f"epsilon {eps} (audit on)", args.config, [*AUDIT, *MEMORISE, *_privacy(eps), *args.set])
        if result is None:
            raise SystemExit(f"epsilon {eps}: the run wrote no audit.json")
        walls[eps], scoring[eps] = wall, result["score_s"]
        accountant = result["epsilon_accountant"]
        lines.append(
            [
                "control (no DP)" if eps == "none" else eps,
                f"{result['auc']:.3f}",
                f"{result['tpr_at_1pct_fpr']:.3f}",
                f"{result['scores']['relative']['auc']:.3f} / {result['scores']['relative']['tpr_at_1pct_fpr']:.3f}",
                f"{result['epsilon_lower_bound']:.3f}",
                "-" if accountant is None else f"{accountant:.3f}",
                " / ".join(_num(result[k]) for k in ("exposure_members_mean", "exposure_nonmembers_mean")),
                f"{wall:.0f}",
            ]
        )
    print()
    header = [
        "epsilon",
        "AUC",
        "TPR@1%FPR",
        "relative to base: AUC / TPR",
        "eps lower bound (95%)",
        "accountant eps",
        "exposure mem / non",
        "wall s",
    ]
    print(table(header, lines))
    overhead, share = walls[base] / off - 1, scoring[base] / off
    print(f"\naudit overhead (epsilon {base}): wall {walls[base]:.0f} s on vs {off:.0f} s off = {overhead:+.1%};")
    print(f"scoring alone {scoring[base]:.0f} s = {share:.1%} of the audit-off run")
    print(
        f"command: .venv/bin/python bench/audit.py --config {_shown(args.config)} --epsilons {' '.join(args.epsilons)}",
        end="",
    )
    print("".join(f" --set {s}" for s in args.set))


if __name__ == "__main__":
    main()
