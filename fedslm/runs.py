"""A finished run as the export and the audit read it: its config, its adapters and best round, and
the base model its clients trained on (quantized as in training; or de-quantized, to merge into)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config
from .errors import FedslmError

# torch and the model loader are imported where a base model is built: reading a run (its config,
# adapters, best round) stays light, so `fedslm generate`/`chat` refuse a wrong directory at once


class ExportError(FedslmError):
    """An export could not be written or did not reproduce the model (names the format and the gap)."""


def best_round(run_dir: Path) -> int | None:
    """The best kept round (highest central accuracy, then lowest eval loss) that the server recorded in
    the last row of ``metrics.jsonl`` (``best_round``); None for a run written before the divergence guard."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        return None
    try:
        best = json.loads(lines[-1]).get("best_round")
    except ValueError:
        raise ExportError(f"{path}: the last line is not JSON") from None
    return best if isinstance(best, int) else None


def trained_dtype(run_dir: Path, cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``model.compute_dtype: auto`` replaced by the dtype it resolved to on the machine
    that ran the server (``summary.json``): the base the run's central evaluation scored is rebuilt
    from the same weights on any machine (a GPU run's bfloat16 on an AVX2 CPU that would pick
    float32). In a simulation on one machine the clients trained on that base too; where they
    resolved ``auto`` elsewhere (Ray cluster workers, deployed nodes) and got another dtype, their
    bases were rounded differently, which an explicit ``model.compute_dtype`` avoids."""
    from .hardware import as_dtype  # torch

    path = Path(run_dir) / "summary.json"
    if cfg.model.compute_dtype != "auto" or not path.is_file():
        return cfg
    try:
        dtype = as_dtype(json.loads(path.read_text()).get("compute_dtype"))
    except ValueError:
        raise ExportError(f"{path}: not JSON") from None
    if dtype in (None, "auto"):  # a summary from before the key: this machine's auto
        return cfg
    return replace(cfg, model=replace(cfg.model, compute_dtype=dtype))


def run_adapter(run_dir: Path, round_: int | None = None, as_trained: bool = False) -> tuple[RunConfig, Path]:
    """The run's config and the adapter dir of ``round_`` (default: the run's best round, see :func:`best_round`).

    ``as_trained``: with the compute dtype the run's server resolved (:func:`trained_dtype`), for an
    export's base; generating here keeps this machine's own (``auto``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if as_trained:
        cfg = trained_dtype(run_dir, cfg)
    rounds = sorted((run_dir / "adapters").glob("round-*"))
    if not rounds:
        raise ExportError(f"{run_dir} holds no adapters/round-NNN")
    if round_ is None:
        best = best_round(run_dir)
        if best is None or not (run_dir / "adapters" / f"round-{best:03d}").is_dir():
            return cfg, rounds[-1]
        round_ = best
    path = run_dir / "adapters" / f"round-{round_:03d}"
    if not path.is_dir():
        raise ExportError(f"{run_dir} has no round {round_}; rounds: {[p.name for p in rounds]}")
    return cfg, path


def float_base(cfg: RunConfig) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import resolve_model_dir

    path = resolve_model_dir(cfg.model)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), tok


def trained_base(cfg: RunConfig) -> tuple[Any, Any]:
    """The weights the clients trained on (quantized as configured, from the run's dtype), computed in fp32.

    A run whose compute dtype resolved to bf16 quantizes bf16 weights; those exact weights are kept,
    but the reference computes in float32 so that bf16 rounding noise (about 0.9 in max |logit| on
    SmolLM2-135M) does not hide a wrong merge base.
    """
    import bitsandbytes as bnb
    import torch

    from .model import load_base_model

    loaded = load_base_model(replace(cfg.model, device="cpu"), computes=False)  # a float16 GPU run's too
    model = loaded.model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16) and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.float()
    for module in model.modules():  # rotary inv_freq and the like
        for name, buf in module.named_buffers(recurse=False):
            if buf.dtype in (torch.bfloat16, torch.float16):
                setattr(module, name, buf.float())
    model.config.dtype = torch.float32
    return model.eval(), loaded.tokenizer


def dequantized_base(cfg: RunConfig) -> Any:
    """The weights the adapter was trained against, in float32: the de-quantized quantized base."""
    import bitsandbytes as bnb
    import torch

    model, _ = trained_base(cfg)
    if cfg.model.quantization != "none":
        for module in model.modules():
            # NF4 codes x absmax in float32, as the fp32 kernel computes them: a base quantized from bf16
            # weights would otherwise de-quantize to bf16, 0.176 in max |logit| from the trained model
            state = getattr(module.weight, "quant_state", None) if isinstance(module, bnb.nn.Linear4bit) else None
            if state is not None:
                state.dtype = torch.float32
        model = model.dequantize()  # bitsandbytes' dequantize_4bit / int8 SCB, module by module
        model.config.__dict__.pop("quantization_config", None)
    return model.float().eval()
