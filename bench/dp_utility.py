"""Privacy/utility: final eval accuracy and loss of the demo federation at several epsilons.

Every run uses the same config, seed, clients, rounds and steps; only ``privacy`` changes. Runs are
sequential in this one invocation and printed side by side.

    .venv/bin/python bench/dp_utility.py [--config configs/demo.yaml] [--epsilons 1 3 8 none]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "none"])
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = parser.parse_args()

    from simulation.run import simulate
    from slm.config import load_config

    results = []
    for eps in args.epsilons:
        privacy = ["privacy.mode=none"] if eps == "none" else ["privacy.mode=local", f"privacy.target_epsilon={eps}"]
        cfg = load_config(args.config, [*args.set, *privacy, "eval.per_client=false"])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rows = simulate(cfg, Path(tmp) / "run", progress=False)
        first, last = rows[0], rows[-1]
        results.append((eps, first, last, time.perf_counter() - t0))
        print(f"epsilon {eps}: accuracy {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f}", flush=True)

    base_gain = None
    for eps, first, last, _ in results:
        if eps == "none":
            base_gain = last["eval_accuracy"] - first["eval_accuracy"]
    print(f"\n{'epsilon':>8} {'final acc':>10} {'final loss':>11} {'max eps':>8} {'gain kept':>10} {'wall s':>8}")
    for eps, first, last, wall in results:
        gain = last["eval_accuracy"] - first["eval_accuracy"]
        kept = f"{gain / base_gain:.2f}" if base_gain else "-"
        eps_max = "-" if last.get("epsilon_max") is None else f"{last['epsilon_max']:.3f}"
        print(
            f"{eps:>8} {last['eval_accuracy']:>10.3f} {last['eval_loss']:>11.4f} {eps_max:>8} {kept:>10} {wall:>8.0f}"
        )
    print("(gain kept = accuracy gain over the base model relative to the non-private run)")


if __name__ == "__main__":
    main()
