"""Export a run's global adapter to where models are deployed, and verify every export.

- ``peft``: the adapter dir (``PeftModel.from_pretrained(base, out)`` loads it);
- ``merged``: the adapter merged into the weights it was trained against, a plain safetensors model
  (``AutoModelForCausalLM.from_pretrained(out)`` loads it). For an nf4 / int8 run these are the
  de-quantized *quantized* weights (bitsandbytes' dequantize), not the original full-precision ones:
  the adapter learnt to correct the quantized model, and merging it into the original base gives a
  different model (``ExportResult.original_base_diff`` measures how different);
- ``gguf``: the merged model as a GGUF file for llama.cpp / Ollama (Llama architecture, base
  loaded from a GGUF: its tokenizer and metadata are carried over), plus an Ollama ``Modelfile``.

Each export is reloaded and its logits compared with the *trained* model (the run's base, quantized
as in training, with the adapter) on a few prompts; the largest absolute difference is returned and
must be within the stated tolerance.

The output folder is never merged into: one that exists and is not empty is refused unless
``force`` (then its entries are replaced, and named), and one inside the run directory is refused
(the run is never written to). The export is built in a temporary sibling folder and moved into place
once verified, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig, load_config
from .errors import FedslmError
from .fs import atomic_dir, atomic_write, check_out_dir
from .logs import get_logger
from .model import BUNDLED, load_base_model, locate_bundled_gguf, resolve_model_dir

log = get_logger(__name__)

FORMATS = ("peft", "merged", "gguf")
# max |logit difference| accepted on reload (logits of SmolLM2 are O(10))
TOLERANCE = {"peft": 1e-4, "merged": 1e-3, "gguf-f32": 1e-3, "gguf-f16": 0.1}
PROMPTS = ["A 70-year-old man reports crushing chest pain. Which department?", "The capital of France is"]


class ExportError(FedslmError):
    """An export could not be written or did not reproduce the model (names the format and the gap)."""


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


def best_round(run_dir: Path) -> int | None:
    """The best kept round (lowest central eval loss) that the server recorded in the last row of
    ``metrics.jsonl`` (``best_round``); None for a run written before the divergence guard."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        return None
    try:
        best = json.loads(lines[-1]).get("best_round")
    except ValueError:
        raise ExportError(f"{path}: the last line is not JSON") from None
    return best if isinstance(best, int) else None


def run_adapter(run_dir: Path, round_: int | None = None) -> tuple[RunConfig, Path]:
    """The run's config and the adapter dir of ``round_`` (default: the run's best round, see :func:`best_round`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
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


def _float_base(cfg: RunConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(cfg.model)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), tok


def _trained_base(cfg: RunConfig) -> tuple[Any, Any]:
    """The weights the clients trained on (quantized as configured, from the run's dtype), computed in fp32.

    A run whose compute dtype resolved to bf16 quantizes bf16 weights; those exact weights are kept,
    but the reference computes in float32 so that bf16 rounding noise (about 0.9 in max |logit| on
    SmolLM2-135M) does not hide a wrong merge base.
    """
    import bitsandbytes as bnb

    loaded = load_base_model(replace(cfg.model, device="cpu"))
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


def _dequantized_base(cfg: RunConfig) -> Any:
    """The weights the adapter was trained against, in float32: the de-quantized quantized base."""
    model, _ = _trained_base(cfg)
    if cfg.model.quantization != "none":
        model = model.dequantize()  # bitsandbytes' dequantize_4bit / int8 SCB, module by module
        model.config.__dict__.pop("quantization_config", None)
    return model.float().eval()


@torch.no_grad()
def _logits(model: Any, tok: Any) -> list[torch.Tensor]:
    return [model(**tok(p, return_tensors="pt")).logits.float() for p in PROMPTS]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _check(fmt: str, diff: float, path: Path, kernel_gap: float = 0.0) -> ExportResult:
    """Pass when the export is within the format's tolerance of the trained model.

    ``kernel_gap`` is what the quantized base alone already differs by between bitsandbytes' kernel
    and a plain matmul with the same de-quantized weights (no adapter, same prompts): the trained model's
    own arithmetic, which no merged export can reproduce. Twice that gap is allowed on top.
    """
    tol = TOLERANCE[fmt] + 2 * kernel_gap
    if not diff <= tol:
        raise ExportError(
            f"{fmt} export at {path} reproduces the trained model's logits only to {diff:.3g} > tolerance {tol}"
        )
    log.info("%s export verified against the trained model: max |logit diff| %.3g <= %g", fmt, diff, tol)
    return ExportResult(fmt.split("-")[0], path, diff, tol)


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
    gguf_dtype: str = "f16",
    force: bool = False,
) -> ExportResult:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    cfg, adapter = run_adapter(run_dir, round_)
    replaced = check_out(out, run_dir, force)
    if cfg.task != "causal-lm":
        raise ExportError("export supports task causal-lm; a classifier is used through its PEFT adapter")
    if fmt == "gguf" and gguf_dtype not in ("f16", "f32"):
        raise ExportError(f"gguf dtype {gguf_dtype!r}: choose f16 or f32")
    if replaced:
        log.warning("--force: replacing %d entries of %s: %s", len(replaced), out, ", ".join(replaced))
    final = Path(out).resolve()
    with atomic_dir(final) as tmp:  # checked by check_out: new, empty, or replaced under --force
        result = _export(cfg, adapter, tmp, fmt, gguf_dtype)
    path = final / result.path.relative_to(tmp)
    return replace(result, path=path, replaced=replaced)


def _export(cfg: RunConfig, adapter: Path, out: Path, fmt: str, gguf_dtype: str) -> ExportResult:
    from peft import PeftModel

    trained_base, tok = _trained_base(cfg)
    base_logits = _logits(trained_base, tok) if fmt != "peft" else None
    expected = _logits(PeftModel.from_pretrained(trained_base, str(adapter)).eval(), tok)
    del trained_base
    original_diff = None
    if cfg.model.quantization != "none":  # what merging into the original float weights would give
        float_base, _ = _float_base(cfg)
        original = PeftModel.from_pretrained(float_base, str(adapter)).eval().merge_and_unload()
        original_diff = _max_diff(expected, _logits(original, tok))
        del float_base, original
        log.info("merged into the original float base, logits would differ by %.3g", original_diff)
    if fmt == "peft":
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        reloaded, _ = _trained_base(cfg)
        peft_reloaded = PeftModel.from_pretrained(reloaded, str(out)).eval()
        result = _check("peft", _max_diff(expected, _logits(peft_reloaded, tok)), out)
        return replace(result, original_base_diff=original_diff)
    dequantized = _dequantized_base(cfg)
    kernel_gap = _max_diff(base_logits, _logits(dequantized, tok)) if cfg.model.quantization != "none" else 0.0
    log.info("the quantized base alone differs from its de-quantized weights by %.3g (kernel arithmetic)", kernel_gap)
    merged = PeftModel.from_pretrained(dequantized, str(adapter)).eval().merge_and_unload()
    if fmt == "merged":
        merged.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        result = _check("merged", _max_diff(expected, _logits(reloaded, tok)), out, kernel_gap)
    else:
        result = _export_gguf(cfg, merged, tok, expected, out, gguf_dtype, kernel_gap)
    return replace(result, original_base_diff=original_diff)


# -- GGUF ------------------------------------------------------------------------------------


def _source_gguf(cfg: RunConfig) -> Path:
    name = cfg.model.name
    if name in BUNDLED:
        return locate_bundled_gguf(name)
    if name.endswith(".gguf"):
        return Path(name).expanduser()
    raise ExportError(
        f"gguf export needs a base loaded from a GGUF (tokenizer and metadata are carried over); model.name is"
        f" {name!r}. Export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py instead"
    )


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k weights (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _export_gguf(
    cfg: RunConfig,
    merged: Any,
    tok: Any,
    expected: list[torch.Tensor],
    out: Path,
    dtype: str,
    kernel_gap: float = 0.0,
) -> ExportResult:
    import gguf

    if merged.config.model_type != "llama":
        raise ExportError(f"gguf export supports the Llama architecture, not {merged.config.model_type!r}")
    source = gguf.GGUFReader(str(_source_gguf(cfg)))
    path = out / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, field in source.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    c = merged.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in merged.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = _permute(array, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute(array, c.num_key_value_heads)
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r}")
        keep_f32 = array.ndim == 1 or dtype == "f32"  # norms stay f32, as llama.cpp does
        writer.add_tensor(gg_name, array.astype(np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _write_modelfile(out, tok, cfg.data.system_prompt)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
    result = _check(f"gguf-{dtype}", _max_diff(expected, _logits(reloaded, tok)), path, kernel_gap)
    return replace(result, path=path)


def _write_modelfile(out: Path, tok: Any, system_prompt: str) -> None:
    """An Ollama Modelfile: the ChatML template SmolLM2 uses, the run's system prompt and stop tokens."""
    eos = tok.eos_token or "<|im_end|>"
    template = (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    lines = ["FROM ./model.gguf", f"TEMPLATE {json.dumps(template)}"]
    if system_prompt:  # training put it in every prompt: the deployed model must see it too
        lines.append(f"SYSTEM {json.dumps(system_prompt)}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys([eos, "<|im_end|>", "<|im_start|>"])]
    lines.append("PARAMETER temperature 0")
    atomic_write(out / "Modelfile", "\n".join(lines) + "\n")
