"""Export a run's global adapter to where models are deployed, and verify every export.

- ``peft``: the adapter dir (``PeftModel.from_pretrained(base, out)`` loads it);
- ``merged``: the adapter merged into the de-quantized float base, a plain safetensors model
  (``AutoModelForCausalLM.from_pretrained(out)`` loads it);
- ``gguf``: the merged model as a GGUF file for llama.cpp / Ollama (Llama architecture, base
  loaded from a GGUF: its tokenizer and metadata are carried over), plus an Ollama ``Modelfile``.

Each export is reloaded and its logits compared with the in-memory model on a few prompts;
the largest absolute difference is returned and must be within the stated tolerance.
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
from .logs import get_logger
from .model import BUNDLED, locate_bundled_gguf, resolve_model_dir

log = get_logger(__name__)

FORMATS = ("peft", "merged", "gguf")
# max |logit difference| accepted on reload (logits of SmolLM2 are O(10))
TOLERANCE = {"peft": 1e-4, "merged": 1e-3, "gguf-f32": 1e-3, "gguf-f16": 0.1}
PROMPTS = ["A 70-year-old man reports crushing chest pain. Which department?", "The capital of France is"]


class ExportError(RuntimeError):
    """An export could not be written or did not reproduce the model (names the format and the gap)."""


@dataclass
class ExportResult:
    format: str
    path: Path
    max_abs_logit_diff: float
    tolerance: float


def run_adapter(run_dir: Path, round_: int | None = None) -> tuple[RunConfig, Path]:
    """The run's config and the adapter dir of ``round_`` (default: the last round)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    rounds = sorted((run_dir / "adapters").glob("round-*"))
    if not rounds:
        raise ExportError(f"{run_dir} holds no adapters/round-NNN")
    if round_ is None:
        return cfg, rounds[-1]
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


@torch.no_grad()
def _logits(model: Any, tok: Any) -> list[torch.Tensor]:
    return [model(**tok(p, return_tensors="pt")).logits.float() for p in PROMPTS]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _check(fmt: str, diff: float, path: Path) -> ExportResult:
    tol = TOLERANCE[fmt]
    if not diff <= tol:
        raise ExportError(f"{fmt} export at {path} reproduces logits only to {diff:.3g} > tolerance {tol}")
    log.info("%s export verified: max |logit diff| %.3g <= %g", fmt, diff, tol)
    return ExportResult(fmt.split("-")[0], path, diff, tol)


def export(run_dir: Path, out: Path, fmt: str, round_: int | None = None, gguf_dtype: str = "f16") -> ExportResult:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    cfg, adapter = run_adapter(run_dir, round_)
    if cfg.task != "causal-lm":
        raise ExportError("export supports task causal-lm; a classifier is used through its PEFT adapter")
    from peft import PeftModel

    out = Path(out)
    base, tok = _float_base(cfg)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    expected = _logits(peft_model, tok)
    if fmt == "peft":
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(adapter, out)
        fresh, _ = _float_base(cfg)
        reloaded = PeftModel.from_pretrained(fresh, str(out)).eval()
        return _check("peft", _max_diff(expected, _logits(reloaded, tok)), out)
    merged = peft_model.merge_and_unload()
    if fmt == "merged":
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        return _check("merged", _max_diff(expected, _logits(reloaded, tok)), out)
    return _export_gguf(cfg, merged, tok, expected, out, gguf_dtype)


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
    cfg: RunConfig, merged: Any, tok: Any, expected: list[torch.Tensor], out: Path, dtype: str
) -> ExportResult:
    import gguf

    if merged.config.model_type != "llama":
        raise ExportError(f"gguf export supports the Llama architecture, not {merged.config.model_type!r}")
    if dtype not in ("f16", "f32"):
        raise ExportError(f"gguf dtype {dtype!r}: choose f16 or f32")
    source = gguf.GGUFReader(str(_source_gguf(cfg)))
    out.mkdir(parents=True, exist_ok=True)
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
    _write_modelfile(out, tok)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
    result = _check(f"gguf-{dtype}", _max_diff(expected, _logits(reloaded, tok)), path)
    return replace(result, path=path)


def _write_modelfile(out: Path, tok: Any) -> None:
    """An Ollama Modelfile for the ChatML template SmolLM2 uses."""
    eos = tok.eos_token or "<|im_end|>"
    template = (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    (out / "Modelfile").write_text(
        f"FROM ./model.gguf\nTEMPLATE {json.dumps(template)}\nPARAMETER stop {json.dumps(eos)}\n"
        "PARAMETER temperature 0\n"
    )
