"""Bytes on the wire: the demo federation with adapters in fp32, bf16 (default) and as int8 top-k
deltas with error feedback, same seed; uplink per client per round against the full model and the
fp32 adapter, and the final accuracy of each.

    .venv/bin/python bench/compression.py [--config configs/demo.yaml] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse

from common import ROOT, run, table

VARIANTS = {
    "fp32": ["communication.dtype=float32"],
    "bf16 (default)": ["communication.dtype=bfloat16"],
    "int8 delta": ["communication.quantize_delta=true"],
    "int8 top-25% delta": ["communication.quantize_delta=true", "communication.topk=0.25"],
}


def full_model_bytes(config: str) -> tuple[int, int]:
    """(parameters of the base model, its size in fp32 bytes): what full fine-tuning would send."""
    from fedslm.config import load_config
    from fedslm.model import load_base_model

    cfg = load_config(config, ["model.quantization=none", "model.compute_dtype=float32"])
    n = sum(p.numel() for p in load_base_model(cfg.model).model.parameters())
    return n, 4 * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = parser.parse_args()

    params, full = full_model_bytes(args.config)
    runs = [run(v, args.config, [*args.set, *VARIANTS[v]]) for v in args.variants]
    fp32 = next((r for r in runs if r.label == "fp32"), None)
    lines = []
    for r in runs:
        client_rounds = sum(x["clients"] for x in r.rows[1:])
        per_client = r.total("bytes_up") / max(client_rounds, 1)
        vs_fp32 = (
            f"{per_client / (fp32.total('bytes_up') / max(sum(x['clients'] for x in fp32.rows[1:]), 1)):.3f}"
            if fp32
            else "-"
        )
        lines.append(
            [
                r.label,
                f"{per_client / 1e6:.3f}",
                vs_fp32,
                f"{per_client / full:.5f}",
                f"{r.last['eval_accuracy']:.3f}",
                f"{r.last['eval_loss']:.4f}",
                f"{r.wall_s:.0f}",
            ]
        )
    print()
    print(f"base model: {params:,} parameters, {full / 1e6:.0f} MB in fp32")
    print(
        table(
            ["uplink", "MB / client / round", "vs fp32 adapter", "vs full model", "final acc", "final loss", "wall s"],
            lines,
        )
    )


if __name__ == "__main__":
    main()
