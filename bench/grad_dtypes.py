"""Do a client's per-sample gradients survive bf16 or fp16 compute, and does fp16 need loss scaling?

The demo's NF4 SmolLM2 + LoRA is loaded once per compute dtype with the same LoRA weights (B drawn
non-zero, so every LoRA tensor has a gradient). Each of ``--batch`` demo records is backpropagated
alone, its loss divided by the batch size as Opacus' mean reduction does, so each row holds the
per-sample gradients DP-SGD clips. Every dtype is compared with float32 compute in this one run:
relative L2 error and cosine of each sample's gradient, the share of entries float32 has and the
dtype flushed to zero (underflow), and the time of the passes. The share of the base's NF4 codes
that differ from a float32 load's says how far apart nodes that resolve different dtypes start (the
weights are rounded to the compute dtype before they are quantized). fp16 is also run with its loss
scaled by 2^10 and 2^16 (the gradients divided back): if scaling changes nothing, underflow is not
what separates fp16 from fp32.

    .venv/bin/python bench/grad_dtypes.py [--batch 8] [--device cpu|cuda] [--quantization nf4]

On a CPU every dtype but float32 is emulated (slow, but the same arithmetic); float16 compute is
refused for CPU training (``fedslm.hardware``), and loaded here only to measure it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import Any

from common import table


@dataclass
class Pass:
    grads: Any  # one row of per-sample gradients (fp32) per record
    loss: float  # their mean loss
    seconds: float
    codes: Any  # the base's 4-bit codes, one per byte (None where nothing is quantized to 4 bits)
    lora: dict[str, Any]  # the LoRA weights the gradients were taken at


def _codes(model: Any) -> Any:
    """Every 4-bit code of ``model``'s packed NF4 weights (two per stored byte), on the CPU."""
    import torch

    packed = [p.data.flatten().cpu() for p in model.parameters() if p.dtype == torch.uint8]
    return torch.cat([torch.cat([b & 15, b >> 4]) for b in packed]) if packed else None


def _gradients(cfg: Any, records: list[dict[str, Any]], dtype: str, scale: float, lora: Any = None) -> Pass:
    """Per-sample gradients of ``records`` with the base computing in ``dtype`` and the loss scaled, at
    the LoRA weights ``lora`` (None: A as PEFT draws it, B small and non-zero, as after a round)."""
    import torch

    from fedslm import tasks
    from fedslm.adapters import adapter_state, attach_lora, load_adapter_state
    from fedslm.model import load_base_model
    from fedslm.training import _keeps_logits, batch_losses, collate_on

    base = load_base_model(replace(cfg.model, compute_dtype=dtype), computes=False)
    codes = _codes(base.model)
    if lora is None:
        torch.manual_seed(1)
        model = attach_lora(base.model, cfg.lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        lora = adapter_state(model)
    else:
        model = attach_lora(base.model, cfg.lora)
        load_adapter_state(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    examples = tasks.encode(cfg, base.tokenizer, records)
    device, keep, n = next(model.parameters()).device, _keeps_logits(model), len(records)
    rows, losses = [], []
    t0 = time.perf_counter()
    for example in examples:
        model.zero_grad(set_to_none=True)
        loss = batch_losses(model, collate_on([example], base.tokenizer.pad_token_id, device), keep)[0]
        (loss * scale / n).backward()
        rows.append(torch.cat([p.grad.float().flatten() for p in params]) * n / scale)
        losses.append(loss.item())
    return Pass(torch.stack(rows).cpu(), sum(losses) / n, time.perf_counter() - t0, codes, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from fedslm import data
    from fedslm.config import load_config
    from fedslm.model import cache_root

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.device={args.device}", f"model.quantization={args.quantization}"])
    records = data.client_records(cfg.data, cache_root(cfg.model), 0, cfg.federation.num_clients).records
    records = records[: args.batch]

    ref = _gradients(cfg, records, "float32", 1.0)
    lines = []
    cases = (("float32", 1.0), ("bfloat16", 1.0), ("float16", 1.0), ("float16", 2.0**10), ("float16", 2.0**16))
    for dtype, scale in cases:
        run = ref if dtype == "float32" else _gradients(cfg, records, dtype, scale, ref.lora)
        got = run.grads
        err = (got - ref.grads).norm(dim=1) / ref.grads.norm(dim=1)
        cos = torch.nn.functional.cosine_similarity(got, ref.grads, dim=1)
        had = ref.grads != 0
        zeroed = ((got == 0) & had).sum().item() / had.sum().item()
        codes = "-" if run.codes is None else f"{(run.codes != ref.codes).float().mean().item():.4%}"
        lines.append(
            [
                dtype,
                f"{scale:g}",
                codes,
                f"{run.loss:.4f}",
                f"{err.median().item():.4f}",
                f"{err.max().item():.4f}",
                f"{cos.min().item():.5f}",
                f"{zeroed:.4%}",
                str(bool(torch.isfinite(got).all())),
                f"{run.seconds / ref.seconds:.1f}x",
            ]
        )
        print(f"{dtype} x{scale:g}: done in {run.seconds:.1f} s", flush=True)
    norms = ref.grads.norm(dim=1)
    print(
        f"\n{args.batch} per-sample gradients of {cfg.model.name} ({args.quantization}, {args.device}),"
        f" LoRA r={cfg.lora.r}, against float32 compute (norms {norms.min():.2f}-{norms.max():.2f}):\n"
    )
    header = ["compute", "loss scale", "NF4 codes differing", "mean loss", "rel. error median", "max"]
    header += ["cosine min", "zeroed", "finite", "time"]
    print(table(header, lines))


if __name__ == "__main__":
    main()
