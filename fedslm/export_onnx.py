"""The merged model as ONNX for ONNX Runtime (phones, CPU), through onnxruntime-genai's model builder.

The builder (``python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p PRECISION -e cpu``)
writes ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json`` (what an ONNX Runtime GenAI app
loads: model shape, EOS/BOS, search defaults) and the tokenizer files with the chat template. For the
CPU execution provider it builds ``int8`` (default), ``int4`` (a 4/8-bit mix, :func:`int4_mix`: the
builder's plain RTN int4 lost 50 points of exact match on a trained SmolLM2, BENCHMARKS.md "Export
parity") or ``fp32``; fp16 is a GPU precision there (the builder refuses FP16 CPU). The adapter is merged
into the weights it was trained against (see fedslm/export.py). ``genai_config.json`` has no system-prompt
field, so ``README.txt`` in the export carries the run's system prompt and how to build the prompt.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fs import atomic_write
from .logs import get_logger
from .runs import ExportError

log = get_logger(__name__)

ONNX_QUANTS = ("int8", "int4", "fp32")


def require_builder() -> None:
    """Refuse --format onnx, with the install hint, when the model builder cannot run."""
    from .export_runtime import require

    for module in ("onnxruntime_genai", "onnx", "onnx_ir"):
        require(module, "--format onnx (onnxruntime-genai's model builder)")


def matmul_names(projections: Iterable[str], layers: Iterable[int]) -> list[str]:
    """The model builder's MatMul node names of ``projections`` (e.g. "mlp/down_proj") in ``layers``."""
    return [f"/model/layers.{i}/{p}/MatMul" for i in layers for p in projections]


def int8_overrides(names: list[str]) -> dict:
    """The builder's ``--target_options`` that keep the MatMuls ``names`` in 8 bits in an int4 build (its
    extra options name only presets of nodes, llama.cpp's mixed layers or the lm_head)."""
    return {"quant_config": {"weights": {"overrides": [{"match": {"name": n}, "type": "int8"} for n in names]}}}


def int4_mix(num_layers: int) -> tuple[dict[str, str], dict]:
    """``--quant int4``'s builder options: k_quant int4 for the gate/up projections of the middle half of
    the layers; int8 for the attention (qkv, o) and down_proj of every layer, the whole MLP of the first
    and last quarter of the layers and the lm_head, which tied embeddings share as one int8 matrix (plain
    ``-p int8`` keeps them fp32). On SmolLM2 (BENCHMARKS.md "Export parity", bench/export_int4.py --extra
    480): 149 MB against int8's 270 MB, and on 480 records neither run saw it lost 1.5 points on the demo
    run and none on issue 19's; the builder's plain int4 answered 5/48 where the model had 29/48, int4
    attention alone cost ~20 answers, an int4 lm_head ~3, and int4 gate/up of the middle 22 layers (the
    mix before) 3.75 points on the demo run."""
    edge = math.ceil(num_layers / 4)
    ends = sorted({*range(edge), *range(num_layers - edge, num_layers)})
    names = matmul_names(("attn/qkv_proj", "attn/o_proj", "mlp/down_proj"), range(num_layers))
    names += matmul_names(("mlp/gate_proj", "mlp/up_proj"), ends) + ["/lm_head/MatMul"]
    return {"algo_config": "k_quant", "op_types_to_quantize": "MatMul/Gather"}, int8_overrides(names)


def build_onnx(
    merged: Any, tok: Any, out: Path, precision: str, options: dict[str, str] | None = None, target: dict | None = None
) -> None:
    """Run the model builder on ``merged`` (saved to a temporary HF folder) into ``out``; ``options`` are the
    builder's ``--extra_options``, ``target`` its ``--target_options`` (per-node weight types: the extra
    options only name presets); bench/export_int4.py compares them; none: its defaults."""
    with tempfile.TemporaryDirectory(prefix="fedslm-onnx-") as tmp:
        hf = Path(tmp) / "merged"
        merged.save_pretrained(str(hf))
        tok.save_pretrained(str(hf))
        argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
        argv += ["-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if options:
            argv += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
        if target:
            argv += ["--target_options", json.dumps(target)]
        log.info("Building the %s ONNX model with onnxruntime-genai's model builder", precision)
        proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"onnxruntime-genai's model builder failed ({precision}, cpu): {last}")
    log.debug("model builder output:\n%s", proc.stdout[-4000:])


def write_readme(out: Path, tok: Any, system_prompt: str, precision: str) -> None:
    system = system_prompt or "(none: training used no system prompt)"
    example = tok.apply_chat_template(
        ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        + [{"role": "user", "content": "QUESTION"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    atomic_write(
        out / "README.txt",
        f"ONNX Runtime GenAI model ({precision}, CPU), exported by fedslm with the adapter merged in.\n"
        "Load this folder with onnxruntime_genai.Model(path); genai_config.json describes it.\n\n"
        f"System prompt used in training (put it in every conversation as the system message):\n{system}\n\n"
        f"Prompt text the model was trained on (chat template, no BOS added), for QUESTION:\n{example}\n"
        f"Stop at {tok.eos_token!r} (eos_token_id in genai_config.json); decode greedily.\n",
    )


def onnx_logits(path: Path, tok: Any, prompts: list[str]) -> list[torch.Tensor]:
    """Logits of each prompt (all positions) computed by ONNX Runtime GenAI from the export."""
    from .export_runtime import require

    og = require("onnxruntime_genai", "the logit check of an ONNX export")
    model = og.Model(str(path))
    logits = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="np")["input_ids"].astype(np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        logits.append(torch.from_numpy(np.asarray(generator.get_output("logits"), dtype=np.float32)))
    return logits
