"""DP-SGD vs plain local training on the same NF4 SmolLM2 + LoRA: step time and peak RSS ratios.

Each variant runs in its own subprocess (so peak RSS is its own), on the same client data, batch
and sequence length; both are measured in this one invocation and printed side by side.

    .venv/bin/python bench/dp_overhead.py [--steps 12] [--batch 4] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    import torch

    from fedslm import data
    from fedslm.adapters import PEFT_CACHE
    from fedslm.config import load_config
    from fedslm.model import cache_root
    from fedslm.training import DPSettings, LocalTraining, train_local

    torch.set_num_threads(2)
    cfg = load_config(args.config, ["model.device=cpu"])  # a CPU client's RSS, also beside a GPU
    resident = PEFT_CACHE.get(cfg.model, cfg.lora)
    model, tok = resident.model, resident.base.tokenizer
    records = data.client_records(cfg.data, cache_root(cfg.model), 0, cfg.federation.num_clients).records
    examples = data.encode_all(tok, records, cfg.data, cfg.model.max_length)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    q = args.batch / len(examples)
    dp = DPSettings(0.6, 1.0, q) if args.variant == "dp" else None
    stamps: list[float] = []
    spec = LocalTraining(steps=args.steps, batch_size=args.batch, learning_rate=1e-3, seed=0, dp=dp)
    t0 = time.perf_counter()
    result = train_local(model, examples, tok.pad_token_id, spec, on_step=lambda s: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)][2:]  # drop 2 warm-up steps
    print(
        json.dumps(
            {
                "variant": args.variant,
                "step_s": statistics.median(steps),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                "rss_after_load_gb": rss_loaded,
                "samples_per_step": result.samples_seen / args.steps,
                "loss_first": result.loss_first,
                "loss_last": result.loss_last,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variant", choices=["dp", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        worker(args)
        return
    results = {}
    for variant in ("plain", "dp"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--config",
            args.config,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    plain, dp = results["plain"], results["dp"]
    print(f"{'':18}{'plain':>10}{'DP-SGD':>10}{'ratio':>8}  goal")
    print(
        f"{'step time (s)':18}{plain['step_s']:>10.3f}{dp['step_s']:>10.3f}"
        f"{dp['step_s'] / plain['step_s']:>8.2f}  <= 1.3"
    )
    print(
        f"{'peak RSS (GB)':18}{plain['peak_rss_gb']:>10.2f}{dp['peak_rss_gb']:>10.2f}"
        f"{dp['peak_rss_gb'] / plain['peak_rss_gb']:>8.2f}  <= 1.5"
    )
    print(
        f"{'samples per step':18}{plain['samples_per_step']:>10.1f}{dp['samples_per_step']:>10.1f}"
        "          (DP: Poisson sampling, expected = batch)"
    )
    print(
        f"(batch {args.batch}, {args.steps} steps, median step after 2 warm-up steps; config {Path(args.config).name})"
    )


if __name__ == "__main__":
    main()
