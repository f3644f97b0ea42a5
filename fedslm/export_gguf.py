"""The merged model as a GGUF file for llama.cpp / Ollama, in f16 / f32 or quantized, plus a Modelfile.

- ``f16`` (default) and ``f32``: written here with the ``gguf`` package (norms stay f32, as llama.cpp does);
- ``q8_0``: quantized here too, in pure Python (``gguf.quants``), block for block what llama.cpp writes;
- ``q4_k_m``: an f32 GGUF requantized by llama.cpp's own quantizer (``llama_model_quantize`` of
  llama-cpp-python, the ``deploy`` extra). Rows whose length is not a multiple of 256 (SmolLM2's 576)
  cannot take k-quants; llama.cpp picks its fallback type for those itself.

The model's hyperparameters are written from the merged model's own config; only the tokenizer
(``tokenizer.*``) and descriptive ``general.*`` keys are carried over from the GGUF the base came
from (for a tiny test model, the bundled SmolLM2 GGUF whose tokenizer it uses).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .fs import atomic_write
from .logs import get_logger
from .modelinfo import BUNDLED, TINY_PREFIX, locate_bundled_gguf
from .runs import ExportError

log = get_logger(__name__)

GGUF_QUANTS = ("f16", "f32", "q8_0", "q4_k_m")
# general.* keys that describe the weights written, not the source: never carried over
_NOT_CARRIED = ("general.architecture", "general.file_type", "general.quantization_version")


def source_gguf(cfg: RunConfig) -> Path:
    """The GGUF whose tokenizer metadata the export carries (the base's own, or SmolLM2's for tiny models)."""
    name = cfg.model.name
    if name in BUNDLED:
        return locate_bundled_gguf(name)
    if name.startswith(TINY_PREFIX):  # tiny test models use SmolLM2's tokenizer (fedslm/tiny.py)
        return locate_bundled_gguf("smollm2-135m-instruct")
    if name.endswith(".gguf"):
        return Path(name).expanduser()
    raise ExportError(
        f"gguf export needs a base loaded from a GGUF (its tokenizer is carried over); model.name is"
        f" {name!r}. Export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py instead"
    )


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k weights (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hyperparameters(writer: Any, c: Any) -> None:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)


def write_gguf(cfg: RunConfig, merged: Any, path: Path, quant: str) -> Path:
    """Write ``merged`` (a Llama model, float32) to ``path`` as a GGUF of ``quant``."""
    if quant == "q4_k_m":
        f32 = path.with_suffix(".f32.tmp")
        try:
            write_gguf(cfg, merged, f32, "f32")
            _llama_quantize(f32, path, "q4_k_m")
        finally:
            f32.unlink(missing_ok=True)
        return path
    import gguf

    if merged.config.model_type != "llama":
        raise ExportError(f"gguf export supports the Llama architecture, not {merged.config.model_type!r}")
    source = gguf.GGUFReader(str(source_gguf(cfg)))
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, field in source.fields.items():
        if not name.startswith(("tokenizer.", "general.")) or name in _NOT_CARRIED:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    c = merged.config
    _hyperparameters(writer, c)
    file_type = {"f16": "MOSTLY_F16", "f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0"}[quant]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
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
        if array.ndim == 1 or quant == "f32":  # norms stay f32, as llama.cpp does
            writer.add_tensor(gg_name, array.astype(np.float32))
        elif quant == "q8_0":
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gg_name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gg_name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_quantize(src: Path, dst: Path, quant: str) -> None:
    from .export_runtime import require

    llama_cpp = require("llama_cpp", f"gguf {quant} (llama.cpp's quantizer)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params.nthread = 0  # all cores
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (llama_model_quantize returned {rc})")
    log.info("llama.cpp quantized %s to %s: %.1f MB", src.name, quant, dst.stat().st_size / 1e6)


def write_modelfile(out: Path, tok: Any, system_prompt: str) -> None:
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
