"""Privacy/utility: final eval accuracy and loss of the demo federation at several epsilons.

Every run uses the same config, seed, clients, rounds and steps; only ``privacy`` changes. Runs are
sequential in this one invocation and printed side by side.

    .venv/bin/python bench/dp_utility.py [--config configs/demo.yaml] [--epsilons 1 3 8 none]
"""

from __future__ import annotations

import argparse

from common import ROOT, run, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "none"])
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = parser.parse_args()

    runs = []
    for eps in args.epsilons:
        privacy = ["privacy.mode=none"] if eps == "none" else ["privacy.mode=local", f"privacy.target_epsilon={eps}"]
        runs.append(run(f"epsilon {eps}", args.config, [*args.set, *privacy]))
    base = next((r for r in runs if r.label == "epsilon none"), None)
    lines = []
    for r in runs:
        kept = f"{r.gain / base.gain:.2f}" if base is not None and base.gain > 0 else "-"
        eps_max = "-" if r.last.get("epsilon_max") is None else f"{r.last['epsilon_max']:.3f}"
        lines.append(
            [
                r.label.split()[1],
                f"{r.last['eval_accuracy']:.3f}",
                f"{r.last['eval_loss']:.4f}",
                eps_max,
                kept,
                f"{r.wall_s:.0f}",
            ]
        )
    print()
    print(
        table(["epsilon (target)", "final accuracy", "final eval loss", "final epsilon", "gain kept", "wall s"], lines)
    )
    print("(gain kept = accuracy gain over the base model relative to the non-private run)")


if __name__ == "__main__":
    main()
