"""The ``fedslm`` command: one subcommand per job; each lives in the module that does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from slm.config import ConfigError, load_config
from slm.logs import setup_logging

Handler = Callable[[argparse.Namespace], int]


def _simulate(args: argparse.Namespace) -> int:
    from .run import SimulationError, default_out_dir, results_table, simulate

    cfg = load_config(args.config, args.set)  # fails here, before anything heavy starts
    out = Path(args.out) if args.out else default_out_dir(Path(args.config).stem)
    try:
        rows = simulate(cfg, out, progress=not args.no_progress)
    except SimulationError as e:
        print(f"fedslm simulate: {e}", file=sys.stderr)
        return 1
    print()
    print(results_table(rows))
    first, last = rows[0], rows[-1]
    print(
        f"\naccuracy {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f}, "
        f"eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}"
        + (f", epsilon (max client) {last['epsilon_max']:.3f}" if last.get("epsilon_max") is not None else "")
    )
    if last.get("per_client"):
        sites = ", ".join(f"client {k} {v['eval_accuracy']:.3f}" for k, v in sorted(last["per_client"].items()))
        print(f"global adapter on each client's own validation data (accuracy): {sites}")
    print(f"run directory: {out} (metrics.jsonl, summary.json, metrics.png, adapters/)")
    return 0


def _strategies(args: argparse.Namespace) -> int:
    from strategies.registry import available

    specs = available()
    width = max(len(s.name) for s in specs)
    for s in specs:
        params = ", ".join(s.params()) or "-"
        print(f"{s.name.ljust(width)}  {s.description}\n{' ' * width}  params: {params}")
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    print(cfg.to_yaml())
    return 0


def _export(args: argparse.Namespace) -> int:
    from slm.export import ExportError, export

    try:
        result = export(Path(args.run_dir), Path(args.out), args.format, args.round, args.gguf_dtype)
    except ExportError as e:
        print(f"fedslm export: {e}", file=sys.stderr)
        return 1
    print(f"{result.format} export written to {result.path}")
    print(f"verified: max |logit difference| on reload {result.max_abs_logit_diff:.3g} (tolerance {result.tolerance})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from slm.chat import ChatModel

    model = ChatModel(Path(args.run_dir), args.round)
    for piece in model.stream([{"role": "user", "content": args.prompt}], args.max_new_tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from slm.chat import ChatModel

    model = ChatModel(Path(args.run_dir), args.round)
    history: list[dict[str, str]] = []
    print("fedslm chat: empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        answer = ""
        for piece in model.stream(history, args.max_new_tokens):
            print(piece, end="", flush=True)
            answer += piece
        print()
        history.append({"role": "assistant", "content": answer})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedslm", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a simulated federation from a YAML config")
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.local_steps=5")
    p.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("check", help="validate a config and print it resolved")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_check)

    p = sub.add_parser("export", help="export a run's adapter: peft | merged | gguf (verified on reload)")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["peft", "merged", "gguf"])
    p.add_argument("--out", required=True)
    p.add_argument("--round", type=int, default=None, help="default: the last round")
    p.add_argument("--gguf-dtype", default="f16", choices=["f16", "f32"])
    p.set_defaults(func=_export)

    for name, func, helptext in (
        ("generate", _generate, "answer one prompt with a run's fine-tuned model (streams tokens)"),
        ("chat", _chat, "chat with a run's fine-tuned model (streams tokens)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_dir")
        if name == "generate":
            p.add_argument("prompt")
        p.add_argument("--round", type=int, default=None, help="default: the last round")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.set_defaults(func=func)

    p = sub.add_parser("strategies", help="list the aggregation strategies and their parameters")
    p.set_defaults(func=_strategies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"fedslm: invalid config: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
