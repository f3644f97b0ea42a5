"""Export a run's global adapter to where models are deployed, and verify every export.

- ``peft``: the adapter dir (``PeftModel.from_pretrained(base, out)`` loads it);
- ``merged``: the adapter merged into the weights it was trained against, a plain safetensors model
  (``AutoModelForCausalLM.from_pretrained(out)`` loads it). For an nf4 / int8 run these are the
  de-quantized *quantized* weights (bitsandbytes' dequantize), not the original full-precision ones:
  the adapter learnt to correct the quantized model, and merging it into the original base gives a
  different model (``ExportResult.original_base_diff`` measures how different);
- ``gguf``: the merged model as a GGUF file for llama.cpp / Ollama (Llama architecture, base
  loaded from a GGUF: its tokenizer is carried over), f16 / f32 / q8_0 / q4_k_m, plus an Ollama
  ``Modelfile`` (fedslm/export_gguf.py);
- ``onnx``: the merged model for ONNX Runtime (GenAI) on CPU and phones, int8 / int4 / fp32, built by
  onnxruntime-genai's model builder (fedslm/export_onnx.py).

Each export is reloaded and its logits compared with the *trained* model (the run's base, quantized
as in training, with the adapter) on a few prompts; the largest absolute difference is returned and
must be within the stated tolerance. fedslm/export_runtime.py then scores the export by task in the
runtime it was made for (``fedslm export`` does, unless ``--no-task-check``).

The output folder is never merged into: one that exists and is not empty is refused unless
``force`` (then its entries are replaced, and named), and one inside the run directory is refused
(the run is never written to). The export is built in a temporary sibling folder and moved into place
once verified, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .fs import atomic_dir, check_out_dir
from .logs import get_logger
from .runs import ExportError, best_round, dequantized_base, float_base, run_adapter, trained_base

__all__ = ["ExportError", "ExportResult", "best_round", "export", "run_adapter"]

log = get_logger(__name__)

FORMATS = ("peft", "merged", "gguf", "onnx")
# --quant per format, the default first
QUANTS = {
    "peft": ("none",),
    "merged": ("none",),
    "gguf": ("f16", "f32", "q8_0", "q4_k_m"),
    # int8 first: the builder's int4 (RTN) lost 50 points of exact match on SmolLM2 (5/48 vs 29/48), int8
    # none; int4 is now a 4/8-bit mix (export_onnx.int4_mix: 149 MB against int8's 270 MB, at most 1.5
    # points lost on 480 unseen records, BENCHMARKS.md "Export parity"); the task check refuses any export
    # losing more than max(2 points, one record)
    "onnx": ("int8", "int4", "fp32"),
}
# max |logit difference| from the trained model accepted, per format-quant (logits of SmolLM2 are O(10)).
# For the quantized ones this only bounds gross errors (measured on SmolLM2-135M, BENCHMARKS.md "Export
# parity": q8_0 1.14, q4_k_m 5.92 and 5.4, onnx int4 19.3; max |logit| over the whole vocabulary is harsh on
# quantized weights): their gate is the task check in the runtime (fedslm/export_runtime.py).
TOLERANCE = {
    "peft-none": 1e-4,
    "merged-none": 1e-3,
    "gguf-f32": 1e-3,
    "gguf-f16": 0.1,
    "gguf-q8_0": 2.0,
    "gguf-q4_k_m": 8.0,
    "onnx-fp32": 1e-3,
    "onnx-int8": 8.0,
    "onnx-int4": 25.0,
}
# the most the de-quantized base may differ from the quantized one (kernel arithmetic, not weights)
KERNEL_GAP_MAX = 1e-3
PROMPTS = ["A 70-year-old man reports crushing chest pain. Which department?", "The capital of France is"]


@dataclass
class ExportResult:
    format: str
    path: Path
    max_abs_logit_diff: float
    tolerance: float
    # max |logit diff| vs the trained model had the adapter been merged into the original float base
    # (None for a run without quantization, where both bases are the same weights)
    original_base_diff: float | None = None
    replaced: tuple[str, ...] = ()  # entries of an existing --out replaced under force
    quant: str = "none"
    round: int | None = None  # the adapter round exported


@torch.no_grad()
def _logits(model: Any, tok: Any) -> list[torch.Tensor]:
    return [model(**tok(p, return_tensors="pt")).logits.float() for p in PROMPTS]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _check(fmt: str, diff: float, path: Path, kernel_gap: float = 0.0) -> ExportResult:
    """Pass when the export is within the format's tolerance of the trained model.

    ``kernel_gap`` is what the quantized base alone already differs by between bitsandbytes' kernel
    and a plain matmul with the same de-quantized weights (no adapter, same prompts): the trained model's
    own arithmetic, which no merged export can reproduce. It is added to the tolerance once, and only
    up to :data:`KERNEL_GAP_MAX` (see :func:`_kernel_gap`): a larger gap means the de-quantized weights are
    not the ones the kernel uses, and widening the tolerance by it would pass exactly that wrong base.
    """
    tol = TOLERANCE[fmt] + kernel_gap
    if not diff <= tol:
        raise ExportError(
            f"{fmt} export at {path} reproduces the trained model's logits only to {diff:.3g} > tolerance {tol}"
        )
    log.info("%s export verified against the trained model: max |logit diff| %.3g <= %g", fmt, diff, tol)
    name, quant = fmt.split("-")
    return ExportResult(name, path, diff, tol, quant=quant)


def _kernel_gap(quantized: list[torch.Tensor], dequantized: list[torch.Tensor]) -> float:
    """How far the quantized base's kernel is from a plain matmul with its de-quantized weights; refused
    beyond :data:`KERNEL_GAP_MAX` (CPU, fp32 compute: measured 0.0 on the tiny model and SmolLM2)."""
    gap = _max_diff(quantized, dequantized)
    log.info("the quantized base alone differs from its de-quantized weights by %.3g (kernel arithmetic)", gap)
    if gap > KERNEL_GAP_MAX:
        raise ExportError(
            f"the de-quantized base differs from the quantized one the adapter was trained on by {gap:.3g}"
            f" (max |logit diff|, > {KERNEL_GAP_MAX}): its weights are not the ones bitsandbytes' kernel uses,"
            " so a merge into them would not be the trained model; export --format peft instead"
        )
    return gap


def check_out(out: Path, run_dir: Path, force: bool = False) -> tuple[str, ...]:
    """Refuse an --out that would overwrite the run or, without ``force``, anything of the user's.

    Returns the entries of ``out`` that the export will replace (empty when it is new or empty).
    """
    out, run = Path(out).resolve(), Path(run_dir).resolve()
    if out == run or run in out.parents:
        raise ExportError(f"--out {out} is inside the run directory {run}; export somewhere outside the run")
    if out in run.parents:
        raise ExportError(f"--out {out} holds the run directory {run}; export somewhere outside the run")
    return check_out_dir(out, force, error=ExportError)


def export(
    run_dir: Path,
    out: Path,
    fmt: str,
    round_: int | None = None,
    quant: str | None = None,
    force: bool = False,
) -> ExportResult:
    """Export round ``round_`` (default: the best) of ``run_dir`` to ``out`` as ``fmt`` at ``quant``
    (default: the format's first in :data:`QUANTS`), verified against the trained model's logits."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    quant = quant or QUANTS[fmt][0]
    if quant not in QUANTS[fmt]:
        raise ExportError(f"--quant {quant!r} does not apply to {fmt}; choose one of {list(QUANTS[fmt])}")
    cfg, adapter = run_adapter(run_dir, round_, as_trained=True)
    replaced = check_out(out, run_dir, force)
    if cfg.task != "causal-lm":
        raise ExportError("export supports task causal-lm; a classifier is used through its PEFT adapter")
    _check_runtime_before_work(fmt, quant)
    if replaced:
        log.warning("--force: replacing %d entries of %s: %s", len(replaced), out, ", ".join(replaced))
    final = Path(out).resolve()
    with atomic_dir(final) as tmp:  # checked by check_out: new, empty, or replaced under --force
        result = _export(cfg, adapter, tmp, fmt, quant)
    path = final / result.path.relative_to(tmp)
    return replace(result, path=path, replaced=replaced, round=int(adapter.name.split("-")[-1]))


def _check_runtime_before_work(fmt: str, quant: str) -> None:
    """Refuse an export that cannot be written without a runtime, before anything heavy starts."""
    from .export_runtime import require

    if fmt == "gguf" and quant == "q4_k_m":
        require("llama_cpp", "gguf q4_k_m (llama.cpp's quantizer)")
    if fmt == "onnx":
        from .export_onnx import require_builder

        require_builder()


def _export(cfg: RunConfig, adapter: Path, out: Path, fmt: str, quant: str) -> ExportResult:
    from peft import PeftModel

    trained, tok = trained_base(cfg)
    base_logits = _logits(trained, tok) if fmt != "peft" else None
    expected = _logits(PeftModel.from_pretrained(trained, str(adapter)).eval(), tok)
    del trained
    original_diff = None
    if cfg.model.quantization != "none":  # what merging into the original float weights would give
        original_base, _ = float_base(cfg)
        original = PeftModel.from_pretrained(original_base, str(adapter)).eval().merge_and_unload()
        original_diff = _max_diff(expected, _logits(original, tok))
        del original_base, original
        log.info("merged into the original float base, logits would differ by %.3g", original_diff)
    if fmt == "peft":
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        reloaded, _ = trained_base(cfg)
        peft_reloaded = PeftModel.from_pretrained(reloaded, str(out)).eval()
        result = _check("peft-none", _max_diff(expected, _logits(peft_reloaded, tok)), out)
        return replace(result, original_base_diff=original_diff)
    dequantized = dequantized_base(cfg)
    kernel_gap = 0.0
    if base_logits is not None and cfg.model.quantization != "none":
        kernel_gap = _kernel_gap(base_logits, _logits(dequantized, tok))
    merged = PeftModel.from_pretrained(dequantized, str(adapter)).eval().merge_and_unload()
    path = out
    if fmt == "merged":
        merged.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        from transformers import AutoModelForCausalLM

        got = _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), tok)
    elif fmt == "gguf":
        from transformers import AutoModelForCausalLM

        from .export_gguf import write_gguf, write_modelfile

        path = write_gguf(cfg, merged, out / "model.gguf", quant)
        write_modelfile(out, tok, cfg.data.system_prompt)
        got = _logits(AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32), tok)
    else:
        from .export_onnx import build_onnx, int4_mix, onnx_logits, write_readme

        mix = int4_mix(merged.config.num_hidden_layers) if quant == "int4" else (None, None)
        build_onnx(merged, tok, out, quant, *mix)
        write_readme(out, tok, cfg.data.system_prompt, quant)
        got = onnx_logits(out, tok, PROMPTS)
    result = _check(f"{fmt}-{quant}", _max_diff(expected, got), path, kernel_gap)
    return replace(result, original_base_diff=original_diff)
