"""fedslm's client step against a plain PEFT + bitsandbytes + Opacus loop, on one CUDA GPU.

Both sides, side by side in one run, on random-weight models of each family's shape (issue 14's
table), the same batch x tokens, NF4 base, LoRA r=8 on q/v, DP-SGD (noise 0.6, clip 1.0):

- **fedslm**: ``fedslm.model.load_base_model`` + ``fedslm.adapters.attach_lora`` +
  ``fedslm.training.train_local`` (answer-only logits: only the last quarter of each sequence is
  labelled, as an instruction's answer is, and only those positions reach ``lm_head``);
- **plain**: ``AutoModelForCausalLM`` with a ``BitsAndBytesConfig``, ``peft.get_peft_model``, Opacus'
  ``GradSampleModule`` + ``DPOptimizer``, labels on every position (full-vocabulary logits).

Both take the full batch at every step (fedslm's Poisson sampling at rate 1 over ``batch`` records),
so the two time the same work. It prints seconds per step (median, two warm-up steps dropped),
tokens per second and the peak of ``torch.cuda.max_memory_allocated``. Without a CUDA device it says
so and exits 0; on a machine with an NVIDIA GPU that torch cannot use (a CPU build of torch, say) it
says so and exits 1, so that a run there never passes for a measurement.

    .venv/bin/python bench/gpu.py [--steps 6] [--shapes smollm2-135m llama-3.2-1b ...]
    .venv/bin/python bench/gpu.py --write-model llama-3.2-1b DIR   # only write that random model (a federation's)
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import table

# family shape -> (LlamaConfig / Qwen2Config kwargs, batch, tokens)
# fmt: off
_LLAMA = {"model_type": "llama", "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0}
_SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
SHAPES: dict[str, tuple[dict[str, Any], int, int]] = {
    "smollm2-135m-8x128": (
        _SMOLLM2,
        8, 128,
    ),
    "smollm2-135m-32x256": (
        _SMOLLM2,
        32, 256,
    ),
    "llama-3.2-1b": (
        {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
        32, 256,
    ),
    "qwen2.5-1.5b": (
        {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
         "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
        32, 256,
    ),
    "llama-3.2-3b": (
        {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
         "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128},
        32, 256,
    ),
}
# fmt: on
NOISE, CLIP, LR = 0.6, 1.0, 5e-3
DEVICE = "cuda"  # tests/test_bench_gpu.py runs both loops in miniature on "cpu", to catch API drift early


def missing_cuda() -> tuple[str, int] | None:
    """Why nothing can be measured here, and the exit status to give; None where CUDA works."""
    import torch

    if torch.cuda.is_available():
        return None
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if not hidden and (shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists()):
        return (
            f"an NVIDIA GPU is here, but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it;"
            " install a CUDA build of torch (README: Versions). Nothing measured",
            1,
        )
    return "no CUDA device here (torch.cuda.is_available() is False); nothing measured", 0


def write_random_model(shape: dict[str, Any], out: Path) -> Path:
    """A seeded random-weight model of ``shape`` (bf16 safetensors) with SmolLM2's tokenizer and chat template."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedslm.model import bundled_tokenizer_dir

    kwargs = dict(shape)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 3B model initialises in seconds there
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    for f in bundled_tokenizer_dir().iterdir():  # the tokenizer and its chat template (a federation needs it)
        if f.is_file() and ("token" in f.name or f.name == "chat_template.jinja"):
            shutil.copy(f, out / f.name)
    return out


def _examples(batch: int, tokens: int, vocab: int) -> list[dict[str, list[int]]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(vocab, 49152), (batch, tokens), generator=gen).tolist()
    answer = tokens // 4  # the labelled answer: the last quarter of each sequence
    return [{"input_ids": x, "labels": [-100] * (tokens - answer) + x[tokens - answer :]} for x in ids]


def fedslm_step(path: Path, batch: int, tokens: int, steps: int) -> tuple[list[float], float]:

    from fedslm.adapters import attach_lora
    from fedslm.config import LoRAConfig, ModelConfig
    from fedslm.model import load_base_model
    from fedslm.training import DPSettings, LocalTraining, train_local

    # auto: bf16 where the GPU computes it natively (compute capability 8.0+), else float16, as a user gets
    cfg = ModelConfig(name=str(path), quantization="nf4", compute_dtype="auto", device=DEVICE, max_length=tokens)
    base = load_base_model(cfg)
    model = attach_lora(base.model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    examples = _examples(batch, tokens, base.model.config.vocab_size)
    # Poisson sampling at rate 1: every step takes all `batch` records, the plain loop's full batch
    spec = LocalTraining(steps=steps, batch_size=batch, learning_rate=LR, dp=DPSettings(NOISE, CLIP, 1.0))
    _reset_peak()
    stamps: list[float] = []
    t0 = time.perf_counter()
    train_local(model, examples, base.tokenizer.pad_token_id, spec, on_step=lambda s: _stamp(stamps))
    return _durations(t0, stamps), _peak_gib()


def plain_step(path: Path, batch: int, tokens: int, steps: int) -> tuple[list[float], float]:
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedslm.hardware import resolve_compute_dtype

    dtype = getattr(torch, resolve_compute_dtype("auto", DEVICE))  # the same compute dtype as fedslm's step
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qc, dtype=dtype, device_map=DEVICE)
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    gsm = GradSampleModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.AdamW(params, lr=LR), noise_multiplier=NOISE, max_grad_norm=CLIP,
                      expected_batch_size=batch)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    _reset_peak()
    stamps: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, min(vocab, 49152), (batch, tokens), generator=gen).to(DEVICE)
        logits = gsm(input_ids=ids).logits.float()  # every position, the full vocabulary
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        _stamp(stamps)
    return _durations(t0, stamps), _peak_gib()


def _stamp(stamps: list[float]) -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())


def _reset_peak() -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    """Peak GPU memory allocated since :func:`_reset_peak`, GiB (0 on a CPU: not measured there)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE != "cpu" else 0.0


def _durations(t0: float, stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)][2:]  # drop 2 warm-up steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per loop, at least 3 (the first 2 are warm-up)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--write-model", nargs=2, metavar=("SHAPE", "DIR"), help="write SHAPE's random model, and stop")
    args = ap.parse_args(argv)
    if args.write_model:
        shape, out = args.write_model
        if shape not in SHAPES:
            ap.error(f"--write-model {shape!r}: not one of {list(SHAPES)}")
        print(write_random_model(SHAPES[shape][0], Path(out)))
        return 0
    if args.steps < 3:
        ap.error(f"--steps {args.steps}: at least 3 (the first 2 steps are warm-up and not timed)")
    missing = missing_cuda()
    if missing is not None:
        print(f"bench/gpu.py: {missing[0]}")
        return missing[1]
    import torch

    lines = []
    for name in args.shapes:
        shape, batch, tokens = SHAPES[name]
        measured: dict[str, tuple[float, float]] = {}
        with tempfile.TemporaryDirectory() as d:
            path = write_random_model(shape, Path(d) / name)
            for side, fn in (("plain", plain_step), ("fedslm", fedslm_step)):
                times, peak = fn(path, batch, tokens, args.steps)
                measured[side] = (statistics.median(times), peak)
                gc.collect()  # Opacus' hooks hold reference cycles: free this side's model before the next
                torch.cuda.empty_cache()
        for side, (s, peak) in measured.items():
            rate = f"{batch * tokens / s:,.0f}"
            time_x, mem_x = s / measured["plain"][0], peak / measured["plain"][1]
            goals = (
                ""
                if side == "plain"
                else f"{'met' if time_x <= 1.1 else 'NOT met'} / {'met' if mem_x <= 0.5 else 'NOT met'}"
            )
            lines.append(
                [
                    name,
                    side,
                    f"{batch} x {tokens}",
                    f"{s:.3f}",
                    rate,
                    f"{peak:.1f}",
                    f"{time_x:.2f}",
                    f"{mem_x:.2f}",
                    goals,
                ]
            )
    print(f"{torch.cuda.get_device_name()}, {args.steps} steps each (median after 2 warm-up steps)")
    head = [
        "model shape",
        "loop",
        "batch x tokens",
        "s/step",
        "tokens/s",
        "peak GiB",
        "time vs plain",
        "memory vs plain",
    ]
    print(table([*head, "goals (time <= 1.1x / memory <= 0.5x)"], lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
