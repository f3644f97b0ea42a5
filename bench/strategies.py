"""Every aggregation strategy on the bundled non-IID task with the same budget (clients, rounds,
steps, seed), once without DP and once with DP (epsilon 8 per client): final accuracy and loss,
total bytes, wall time, and the share of non-private FedAvg's accuracy gain each keeps.

    .venv/bin/python bench/strategies.py [--strategies fedavg ffa-lora ...] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse

from common import ROOT, Run, run, table

PRIVACY = {"no DP": ["privacy.mode=none"], "DP eps 8": ["privacy.mode=local", "privacy.target_epsilon=8"]}


def main() -> None:
    from fedslm.strategies.registry import available

    names = [s.name for s in available()]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--strategies", nargs="+", default=names, choices=names)
    parser.add_argument("--privacy", nargs="+", default=list(PRIVACY), choices=list(PRIVACY))
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = parser.parse_args()

    results: dict[tuple[str, str], Run] = {}
    for name in args.strategies:  # both privacy settings of a strategy next to each other
        for privacy in args.privacy:
            label = f"{name} / {privacy}"
            try:
                results[name, privacy] = run(
                    label, args.config, [*args.set, *PRIVACY[privacy], f"strategy.name={name}"]
                )
            except Exception as e:  # noqa: BLE001 - one failing strategy must not lose the others' figures
                print(f"{label}: FAILED ({type(e).__name__}: {e})", flush=True)
    base = results.get(("fedavg", "no DP"))
    lines = []
    for (name, privacy), r in results.items():
        kept = f"{r.gain / base.gain:.2f}" if base is not None and base.gain > 0 else "-"
        eps = "-" if r.last.get("epsilon_max") is None else f"{r.last['epsilon_max']:.2f}"
        mb = (r.total("bytes_up") + r.total("bytes_down")) / 1e6
        lines.append(
            [
                name,
                privacy,
                f"{r.last['eval_accuracy']:.3f}",
                f"{r.last['eval_loss']:.4f}",
                eps,
                kept,
                f"{mb:.1f}",
                f"{r.wall_s:.0f}",
            ]
        )
    print()
    print(
        table(
            ["strategy", "privacy", "final acc", "final loss", "epsilon", "FedAvg gain kept", "MB sent", "wall s"],
            lines,
        )
    )
    print("(FedAvg gain kept = accuracy gain over the base model / non-private FedAvg's gain)")


if __name__ == "__main__":
    main()
