"""One client's memory and speed: NF4 / int8 / fp32 base, gradient checkpointing, the phone profile.

Each variant runs in its own subprocess (so its memory is its own) on the same client data, at the
same batch and sequence length (DP-SGD but for the two plain-training rows), all printed side by
side in this one invocation: RSS once the model is loaded, and the peak RSS (the kernel's high-water
mark, reset before each phase) while loading, while training and while evaluating, the median step
time, and the held-out eval loss of the base model and of the adapter after training.

    .venv/bin/python bench/lean.py [--steps 10] [--batch 4] [--tokens 128] [--no-eval] [--variants nf4 fp32 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, table


@dataclass(frozen=True)
class Variant:
    overrides: list[str]
    what: str
    batch: int = 0  # 0: --batch
    dp: bool = True
    env: dict[str, str] = field(default_factory=dict)  # environment of its subprocess


# What an AVX2-only CPU (the EPYCs CI runs on) computes with, on a newer one: torch's vectorised
# kernels, oneDNN (bf16 matmul) and MKL (fp32 GEMM) each capped at AVX2. bf16 is then emulated as there.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# glibc keeps freed heap memory for reuse; with these, it returns it at once (less RSS, more page faults)
LEAN_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
VARIANTS: dict[str, Variant] = {
    "nf4": Variant(["model.quantization=nf4"], "NF4 base (the default), DP-SGD"),
    "int8": Variant(["model.quantization=int8"], "bitsandbytes 8-bit base, DP-SGD"),
    "fp32": Variant(["model.quantization=none", "model.compute_dtype=float32"], "unquantized fp32 base, DP-SGD"),
    # explicit compute dtypes: what `auto` picks on a CPU without native bf16 (fp32) and with it (bf16)
    "nf4 + fp32 compute": Variant(["model.quantization=nf4", "model.compute_dtype=float32"], "NF4, fp32 compute, DP"),
    "int8 + fp32 compute": Variant(["model.quantization=int8", "model.compute_dtype=float32"], "int8, fp32, DP"),
    "nf4 + bf16 compute": Variant(["model.quantization=nf4", "model.compute_dtype=bfloat16"], "NF4, bf16 compute, DP"),
    # glibc's mmap threshold fixed at 1 MB: per-layer fp32 temporaries (a dequantized 576x1536 weight is
    # 3.5 MB) are mapped and unmapped instead of piling up in the heap once the dynamic threshold rose
    "nf4 + fp32 compute + mmap 1MB": Variant(
        ["model.quantization=nf4", "model.compute_dtype=float32"],
        "NF4, fp32 compute, DP, MALLOC_MMAP_THRESHOLD_=1048576",
        env={"MALLOC_MMAP_THRESHOLD_": "1048576"},
    ),
    "nf4 + lean malloc": Variant(
        ["model.quantization=nf4"], "NF4, DP-SGD, with MALLOC_TRIM_THRESHOLD_=0 MALLOC_TOP_PAD_=0", env=LEAN_MALLOC
    ),
    "phone": Variant(["model.quantization=nf4", "lora.r=4"], "the phone profile: NF4, r=4, batch 2, DP-SGD", batch=2),
    "phone + lean malloc": Variant(
        ["model.quantization=nf4", "lora.r=4"], "the phone profile, lean malloc", batch=2, env=LEAN_MALLOC
    ),
    "nf4 + checkpointing": Variant(
        ["model.quantization=nf4", "model.gradient_checkpointing=true"],
        "NF4, DP-SGD, activations recomputed in backward (gradient checkpointing)",
    ),
    "nf4 + fp32 compute + checkpointing": Variant(
        ["model.quantization=nf4", "model.compute_dtype=float32", "model.gradient_checkpointing=true"],
        "NF4, fp32 compute (auto on a CPU without native bf16), DP, activations recomputed in backward",
    ),
    "nf4 + checkpointing + lean malloc": Variant(
        ["model.quantization=nf4", "model.gradient_checkpointing=true"],
        "NF4, DP-SGD, checkpointing, lean malloc",
        env=LEAN_MALLOC,
    ),
    # the same logical batch (same noise, same accounting) in physical micro-batches: fewer activations alive
    "nf4 + fp32 compute + micro-batches of 2": Variant(
        ["model.quantization=nf4", "model.compute_dtype=float32", "train.physical_batch_size=2"],
        "NF4, fp32 compute, DP, the logical batch in forward/backward passes of 2 sequences",
    ),
    "nf4 + fp32 compute + micro-batches of 1": Variant(
        ["model.quantization=nf4", "model.compute_dtype=float32", "train.physical_batch_size=1"],
        "NF4, fp32 compute, DP, the logical batch in forward/backward passes of 1 sequence",
    ),
    "phone + checkpointing": Variant(
        ["model.quantization=nf4", "lora.r=4", "model.gradient_checkpointing=true"],
        "the phone profile with checkpointing",
        batch=2,
    ),
    "nf4 no DP": Variant(["model.quantization=nf4", "privacy.mode=none"], "NF4, plain training", dp=False),
    "nf4 no DP + checkpointing": Variant(
        ["model.quantization=nf4", "model.gradient_checkpointing=true", "privacy.mode=none"],
        "NF4, plain training, checkpointing",
        dp=False,
    ),
}


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _padded(examples: list[dict[str, list[int]]], tokens: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Every sequence extended to ``tokens`` attended positions (the memory of a full-length batch)."""
    out = []
    for e in examples:
        extra = max(0, tokens - len(e["input_ids"]))
        out.append({"input_ids": e["input_ids"] + [pad_id] * extra, "labels": e["labels"] + [-100] * extra})
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    from fedslm import data, tasks
    from fedslm.adapters import load_adapter_state
    from fedslm.config import load_config
    from fedslm.model import cache_root
    from fedslm.training import DPSettings, LocalTraining, train_local

    torch.set_num_threads(args.threads)
    variant = VARIANTS[args.variant]
    batch = variant.batch or args.batch
    # a CPU client's RSS and step time, also on a machine with a GPU (bench/gpu.py measures that)
    cfg = load_config(args.config, ["model.device=cpu", *variant.overrides, f"model.max_length={args.tokens}"])
    cuda = cfg.model.device.startswith("cuda")  # a variant may still pin one: then its CUDA peak too
    t0 = time.perf_counter()
    resident = tasks.resident_model(cfg)
    load_s = time.perf_counter() - t0
    model, tok = resident.model, resident.base.tokenizer
    rss_loaded = _vm_kb("VmRSS") / 1e6
    load_peak = _vm_kb("VmHWM") / 1e6
    cache = cache_root(cfg.model)
    records = data.client_records(cfg.data, cache, 0, cfg.federation.num_clients).records
    examples = _padded(tasks.encode(cfg, tok, records), args.tokens, tok.pad_token_id)
    _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    dp = DPSettings(0.6, 1.0, batch / len(examples)) if variant.dp else None
    spec = LocalTraining(
        steps=args.steps,
        batch_size=batch,
        learning_rate=5e-3,
        seed=0,
        dp=dp,
        physical_batch_size=cfg.train.physical_batch_size,
    )
    t1 = time.perf_counter()
    result = train_local(model, examples, tok.pad_token_id, spec, on_step=lambda s: stamps.append(time.perf_counter()))
    train_peak = _vm_kb("VmHWM") / 1e6
    train_cuda = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    steps = [b - a for a, b in zip([t1, *stamps[:-1]], stamps, strict=True)][2:]  # drop 2 warm-up steps
    before, after, eval_peak = {"eval_loss": float("nan")}, {"eval_loss": float("nan")}, float("nan")
    if not args.no_eval:
        test = data.test_records(cfg.data, cache)
        test_ex = tasks.encode(cfg, tok, test)
        _reset_peak_rss()
        after = tasks.evaluate_records(cfg, model, tok, test, test_ex)
        load_adapter_state(model, resident.initial)  # B = 0: the base model itself
        before = tasks.evaluate_records(cfg, model, tok, test, test_ex)
        eval_peak = _vm_kb("VmHWM") / 1e6
    print(
        json.dumps(
            {
                "variant": args.variant,
                "batch": batch,
                "load_s": load_s,
                "rss_loaded_gb": rss_loaded,
                "train_peak_gb": train_peak,
                "train_cuda_peak_gb": train_cuda,
                "load_peak_gb": load_peak,
                "eval_peak_gb": eval_peak,
                "step_s": statistics.median(steps),
                "samples_per_step": result.samples_seen / args.steps,
                "eval_loss_base": before["eval_loss"],
                "eval_loss_after": after["eval_loss"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="expected Poisson batch (the phone profile uses 2)")
    parser.add_argument("--tokens", type=int, default=128, help="attended tokens per sequence")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation phase (memory and steps only)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: cap torch, oneDNN and MKL at AVX2, to measure an AVX2-only CPU's paths on a newer one",
    )
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        worker(args)
        return
    results = {}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--config", args.config]
        cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--tokens", str(args.tokens)]
        cmd += ["--threads", str(args.threads)] + (["--no-eval"] if args.no_eval else [])
        env = {**os.environ, **VARIANTS[variant].env, **(AVX2_ONLY if args.isa == "avx2" else {})}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant}: {results[variant]}", flush=True)
    ref = results.get("fp32")
    lines = []
    for name, r in results.items():
        lines.append(
            [
                name,
                str(r["batch"]),
                f"{r['rss_loaded_gb']:.2f}",
                f"{r['load_peak_gb']:.2f}",
                f"{r['train_peak_gb']:.2f}"
                + ("" if r.get("train_cuda_peak_gb") is None else f" (CUDA {r['train_cuda_peak_gb']:.2f})"),
                f"{r['eval_peak_gb']:.2f}",
                f"{r['step_s']:.2f}",
                "-" if ref is None else f"{r['step_s'] / ref['step_s']:.2f}",
                "-" if ref is None else f"{r['train_peak_gb'] / ref['train_peak_gb']:.2f}",
                f"{r['eval_loss_base']:.4f}",
                f"{r['eval_loss_after']:.4f}",
            ]
        )
    print()
    print(
        table(
            [
                "variant",
                "batch",
                "RSS loaded GB",
                "peak RSS loading GB",
                "peak RSS training GB",
                "peak RSS eval GB",
                "step s",
                "step vs fp32",
                "training peak vs fp32",
                "eval loss base",
                f"eval loss after {args.steps} steps",
            ],
            lines,
        )
    )
    isa = "native"
    if args.isa == "avx2":
        isa = "capped at AVX2 (" + " ".join(f"{k}={v}" for k, v in AVX2_ONLY.items()) + ")"
    print(f"({args.tokens} attended tokens per sequence, {args.steps} steps, median step after 2 warm-up; ISA {isa})")
    for name in results:
        print(f"- {name}: {VARIANTS[name].what}")


if __name__ == "__main__":
    main()
