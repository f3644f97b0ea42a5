"""Privacy/utility: how much of the non-private accuracy gain DP federations keep, and why.

The curve: each task at each target epsilon (and without DP), with the final and the best round's
central accuracy, each client's accuracy on its own validation records, and the share of the
non-private gain kept, ``(acc_dp - acc_base) / (acc_nodp - acc_base)`` with ``acc_base`` the base
model's (round 0). A run whose final accuracy is more than 2 points below its best round is flagged.
Tasks: ``triage`` (configs/demo.yaml), ``classify`` (configs/classify.yaml) and ``user``, a
user-style tickets file written by ``bench/userdata.py`` and read through the own-data path.

The ablation (``--ablation``): at epsilon 8 on one task, the task's own recipe (configs/demo.yaml for
triage: what issue 17 built), then each lever of ``LEVERS`` changing one thing of it, and then the
levers that raised the private accuracy, together; each also without DP for its gain kept (with
``--none-set`` the runs without DP take the non-private learning rate, and a lever that only moves the
learning rate or the accountant then shares the recipe's run without DP). The PNG of the curve goes to
``--out``. Everything runs sequentially in this one process and prints Markdown tables for
BENCHMARKS.md, under the command line that made them.

    .venv/bin/python bench/dp_utility.py --task all                     # the curve, three tasks
    .venv/bin/python bench/dp_utility.py --task triage --none-set train.learning_rate=0.005  # non-private lr
    .venv/bin/python bench/dp_utility.py --ablation --ablation-task triage --none-set train.learning_rate=0.005
    .venv/bin/python bench/dp_utility.py --quick --task triage --epsilons 8 none   # tiny-model smoke run
    .venv/bin/python bench/dp_utility.py --gpu --task all --none-set train.learning_rate=0.005  # on a CUDA machine
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import userdata
from common import ROOT, Run, run, table

CONFIGS = ROOT / "configs"
# task -> (config of the full bench, config of --quick on the tiny random models)
TASKS: dict[str, tuple[str, str]] = {
    "triage": ("demo.yaml", "tiny.yaml"),
    "classify": ("classify.yaml", "classify-tiny.yaml"),
    "user": ("demo.yaml", "tiny.yaml"),
}
USER_RECORDS = {False: 4000, True: 400}  # tickets written for the user task (full, --quick)
# --gpu: the configuration for a CUDA machine, on top of each task's config (and before --set): hospitals
# of ~9,700 training records and a Poisson logical batch of 256 in micro-batches of 64 (`fedslm privacy
# plan configs/demo.yaml` with these: noise multiplier 0.50 at epsilon 8, noise/signal 0.9 a step against
# the CPU recipe's 21.8). The steps and the learning rate stay each task's; not tuned: no GPU was lent yet.
GPU = [
    "model.device=cuda",
    "data.num_records=48000",
    "train.batch_size=256",
    "train.physical_batch_size=64",
]
FALL_BACK = 0.02  # a final accuracy this far below the best round's is flagged
ABLATION_EPSILON = "8"

# Overrides on top of the task's config for every ablation run (empty: the config's recipe as it is),
# and the levers, each changing one thing of it (applied in order; where two set the same key, the
# later one wins when they are combined). Change the recipe in configs/demo.yaml, the levers here.
BASELINE: list[str] = []
BATCH_32 = ["train.batch_size=32", "train.physical_batch_size=16", "train.local_steps=3"]
LEVERS: list[tuple[str, list[str]]] = [
    # what issue 17 changed, taken back one at a time
    ("RDP accountant (not PLD)", ["privacy.accountant=rdp"]),
    ("a quarter of the records (3,000)", ["data.num_records=3000"]),
    # about the same sequences a round (96 against 80), in 3 quieter steps: the recipe before
    ("logical batch 32, 3 steps a round", BATCH_32),
    ("LoRA on all 30 layers", ["lora.last_layers=0"]),  # twice the parameters, 1.4x the compute
    ("learning rate 0.01", ["train.learning_rate=0.01"]),
    # further than the recipe goes
    ("learning rate 0.04", ["train.learning_rate=0.04"]),
    ("rank 2 (alpha 4: the same scale)", ["lora.r=2", "lora.alpha=4"]),  # a quarter of the noise power
    ("FFA-LoRA (A frozen)", ["strategy.name=ffa-lora"]),
    # one demo client, 15 DP steps, eval loss from 4.40: SGD lr 0.01 -> 2.20, lr 0.1 diverges (14.9)
    ("SGD, momentum 0.9, lr 0.03", ["train.optimizer=sgd", "train.momentum=0.9", "train.learning_rate=0.03"]),
    ("9 rounds x 3 steps", ["federation.num_rounds=9", "train.local_steps=3"]),  # the same 27-30 steps
    ("server momentum 0.9 (FedAvgM)", ["strategy.name=fedavgm"]),
    ("clipping norm 0.1", ["privacy.max_grad_norm=0.1"]),
    ("cosine learning-rate schedule across rounds", ["train.lr_schedule=cosine"]),
]


@dataclass(frozen=True)
class Outcome:
    """What the tables need of one run: round-0, final and best-round accuracy, per-client accuracy."""

    label: str
    base: float
    final: float
    best_round: int
    best: float
    per_client: dict[str, float]
    epsilon: float | None
    wall_s: float

    @classmethod
    def of(cls, result: Run) -> Outcome:
        rows = result.rows
        best_round = rows[-1].get("best_round")
        best_row = next((r for r in rows if r["round"] == best_round), rows[-1])
        return cls(
            label=result.label,
            base=rows[0]["eval_accuracy"],
            final=rows[-1]["eval_accuracy"],
            best_round=best_row["round"],
            best=best_row["eval_accuracy"],
            per_client={c: m["eval_accuracy"] for c, m in sorted(rows[-1].get("per_client", {}).items())},
            epsilon=rows[-1].get("epsilon_max"),
            wall_s=result.wall_s,
        )

    @property
    def fell_back(self) -> bool:
        """The run ended more than :data:`FALL_BACK` below its best round's accuracy."""
        return self.final < self.best - FALL_BACK


def gain_kept(acc: float, acc_nodp: float, acc_base: float) -> float | None:
    """Share of the non-private gain over the base model that a private run keeps (None: no gain to keep)."""
    gain = acc_nodp - acc_base
    return (acc - acc_base) / gain if gain > 0 else None


def privacy_overrides(epsilon: str) -> list[str]:
    """The overrides of a target epsilon ("none": no DP)."""
    if epsilon == "none":
        return ["privacy.mode=none"]
    return ["privacy.mode=local", f"privacy.target_epsilon={epsilon}"]


def without_dp(overrides: list[str]) -> list[str]:
    """The same run without DP (privacy keys dropped: the accountant does not matter then)."""
    return [o for o in overrides if not o.startswith("privacy.")] + privacy_overrides("none")


def effective(overrides: list[str]) -> tuple[tuple[str, str], ...]:
    """What a list of KEY=VALUE overrides sets, the later of two on one key winning: two lists that set
    the same are the same run."""
    return tuple(sorted(dict(o.split("=", 1) for o in overrides).items()))


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def curve_table(curves: dict[str, dict[str, Outcome]]) -> str:
    """The curve: one row per task and target epsilon ("none" is the task's non-private run)."""
    lines = []
    for task, outcomes in curves.items():
        nodp = outcomes.get("none")
        for eps, o in outcomes.items():
            kept = gain_kept(o.final, nodp.final, o.base) if nodp is not None else None
            lines.append(
                [
                    task,
                    eps,
                    f"{o.base:.3f}",
                    f"{o.final:.3f}",
                    f"{o.best:.3f} (round {o.best_round})",
                    "**yes**" if o.fell_back else "no",
                    ", ".join(f"{c}: {a:.2f}" for c, a in o.per_client.items()) or "-",
                    _eps(o.epsilon),
                    _pct(kept),
                    f"{o.wall_s:.0f}",
                ]
            )
    header = [
        "task",
        "epsilon (target)",
        "round 0",
        "final accuracy",
        "best round",
        f"final < best - {FALL_BACK:g}",
        "per-client final accuracy",
        "final epsilon",
        "gain kept",
        "wall s",
    ]
    return table(header, lines)


def ablation_table(rows: list[tuple[str, list[str], Outcome, Outcome]]) -> str:
    """(lever, overrides, run at epsilon 8, the same without DP) -> one row each."""
    lines = [
        [
            name,
            " ".join(f"`{o}`" for o in overrides) or "-",
            f"{dp.final:.3f}",
            f"{dp.best:.3f}",
            f"{nodp.final:.3f}",
            _pct(gain_kept(dp.final, nodp.final, dp.base)),
            _eps(dp.epsilon),
            f"{dp.wall_s:.0f}",
        ]
        for name, overrides, dp, nodp in rows
    ]
    header = [
        "lever",
        "overrides",
        f"accuracy, epsilon {ABLATION_EPSILON}",
        "best round",
        "accuracy, no DP",
        "gain kept",
        "final epsilon",
        f"wall s, epsilon {ABLATION_EPSILON}",
    ]
    return table(header, lines)


def plot(curves: dict[str, dict[str, Outcome]], path: Path) -> None:
    """Accuracy against epsilon, one line per task, its non-private accuracy dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, outcomes in curves.items():
        points = sorted((float(e), o.final) for e, o in outcomes.items() if e != "none")
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
        if "none" in outcomes:
            ax.axhline(outcomes["none"].final, color=line.get_color(), linestyle="--", label=f"{task}, no DP")
    ax.set_xscale("log")
    ticks = sorted({float(e) for outcomes in curves.values() for e in outcomes if e != "none"})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("target epsilon (per client, whole run)")
    ax.set_ylabel("final accuracy on the held-out test split")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="small")
    ax.set_title("privacy-utility")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


class Bench:
    """The runs of one invocation: each task's config and overrides, runs cached by their overrides."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.extra = [*(GPU if args.gpu else []), *args.set]
        self.none_extra = args.none_set  # after --set, for the runs without DP only
        # the user task's file, next to --out (bench/out is git-ignored); deterministic, so reused if there
        self.tickets = Path(args.out).parent / f"tickets-n{USER_RECORDS[self.quick]}-s0.jsonl"
        self._done: dict[tuple[str, tuple[tuple[str, str], ...], bool], Outcome] = {}

    def task_overrides(self, task: str) -> list[str]:
        if task != "user":
            return []
        if not self.tickets.is_file():
            userdata.write(self.tickets, USER_RECORDS[self.quick], seed=0)
        return userdata.overrides(self.tickets)

    def outcome(self, task: str, label: str, overrides: list[str], *, per_client: bool = True) -> Outcome:
        full, quick = TASKS[task]
        config = str(CONFIGS / (quick if self.quick else full))
        everything = [*self.task_overrides(task), *overrides, *self.extra]
        if "privacy.mode=none" in overrides:
            everything += self.none_extra
        key = (config, effective(everything), per_client)
        if key not in self._done:
            self._done[key] = Outcome.of(run(f"{task}: {label}", config, everything, per_client=per_client))
        return self._done[key]

    def curve(self, task: str, epsilons: list[str]) -> dict[str, Outcome]:
        return {eps: self.outcome(task, f"epsilon {eps}", privacy_overrides(eps)) for eps in epsilons}

    def lever(self, task: str, name: str, overrides: list[str]) -> tuple[str, list[str], Outcome, Outcome]:
        dp = [*BASELINE, *overrides, *privacy_overrides(ABLATION_EPSILON)]
        # central evaluation only: the table shows no per-client figures
        private = self.outcome(task, name, dp, per_client=False)
        return name, overrides, private, self.outcome(task, f"{name}, no DP", without_dp(dp), per_client=False)

    def ablation(self, task: str) -> list[tuple[str, list[str], Outcome, Outcome]]:
        """The baseline, each lever alone, and the levers that raised the private accuracy, together."""
        base = self.lever(task, "baseline", [])
        alone = [self.lever(task, name, overrides) for name, overrides in LEVERS]
        helped = [row for row in alone if row[2].final > base[2].final]
        rows = [base, *alone]
        if helped:
            names = " + ".join(row[0] for row in helped)
            rows.append(self.lever(task, f"together: {names}", [o for row in helped for o in row[1]]))
        return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all", help="the curve's task(s)")
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "none"])
    parser.add_argument("--ablation", action="store_true", help="the recipe ablation instead of the curve")
    parser.add_argument("--ablation-task", choices=["triage", "classify"], default="triage")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override for every run")
    parser.add_argument(
        "--none-set",
        action="append",
        default=[],
        help="KEY=VALUE override for the runs without DP only, e.g. train.learning_rate=0.005 for the demo"
        " (its lr 0.02 is tuned for DP and overshoots without noise); same records, seeds and token budget",
    )
    parser.add_argument("--quick", action="store_true", help="tiny random models: checks the plumbing only")
    parser.add_argument(
        "--gpu", action="store_true", help="the GPU configuration (GPU: thousands of records, batch 256)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "dp_utility.png"), help="the curve's PNG")
    args = parser.parse_args(argv)
    for eps in args.epsilons:
        if eps != "none" and not _positive(eps):
            parser.error(f"--epsilons: {eps!r} is neither a positive number nor 'none'")
    if args.gpu and args.quick:
        parser.error("--gpu and --quick: the GPU configuration is for the real model")
    if args.gpu and not _cuda():
        parser.error(
            "--gpu: no CUDA device here (torch.cuda.is_available() is False); the CPU configuration is the default"
        )
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    command = shlex.join([".venv/bin/python", "bench/dp_utility.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"```\n{command}\n```", flush=True)
    bench = Bench(args)
    if args.ablation:
        rows = bench.ablation(args.ablation_task)
        print(f"\n{args.ablation_task}, levers on its config's recipe {' '.join(BASELINE)}:\n")
        print(ablation_table(rows))
        return
    tasks = list(TASKS) if args.task == "all" else [args.task]
    curves = {task: bench.curve(task, args.epsilons) for task in tasks}
    print()
    print(curve_table(curves))
    print("(gain kept = (acc - acc round 0) / (acc without DP - acc round 0); per-client: own validation)")
    plot(curves, Path(args.out))
    print(f"privacy-utility curve: {args.out}")


if __name__ == "__main__":
    main()
