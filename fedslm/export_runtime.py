"""An export scored by task in the runtime it was made for, beside the run's own central evaluation.

The runtimes: llama.cpp (llama-cpp-python) for GGUF, ONNX Runtime GenAI for ONNX, transformers for
``merged`` and ``peft``. Each answers the run's evaluation records (``data.test_records``: the same
held-out records, in the same order, that the server's central evaluation scored) greedily, from the
prompt the clients trained on (the tokenizer's chat template with ``data.system_prompt``), tokenized by
the runtime itself as a deployed app would, for at most ``eval.max_new_tokens``; an answer is right
when it matches the record's after :func:`~fedslm.training.normalize_answer`, as in training.

Tolerance (``task_tolerance``): an unquantized export (peft, merged, gguf f32/f16, onnx fp32) is the
trained model in another runtime, so its exact match may differ from the run's central-evaluation
accuracy of the exported round by at most max(1 point, one record), either way. A quantized one (gguf
q8_0/q4_k_m, onnx int8/int4) changes the weights, and some answers flip both ways; it may lose at
most max(2 points, one record), and scoring higher is reported but not refused (the demo's q4_k_m
answered 40/48 where the run had 37/48). One record is the resolution of the measurement: 48 records
give 2.08 points each.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .config import RunConfig
from .logs import get_logger
from .runs import ExportError

log = get_logger(__name__)

DEPLOY_HINT = "install it with: pip install 'fedslm[deploy]'"
_RUNTIMES = {
    "llama_cpp": "llama.cpp (llama-cpp-python)",
    "onnxruntime_genai": "ONNX Runtime GenAI (onnxruntime-genai)",
    "onnxruntime": "ONNX Runtime (onnxruntime)",
    "onnx": "onnx",
    "onnx_ir": "onnx-ir",
}
QUANTIZED = ("q8_0", "q4_k_m", "int8", "int4")


class RuntimeMissing(ExportError):
    """A deployment runtime is not installed (the message says which extra installs it)."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import a deployment runtime, or raise :class:`RuntimeMissing` with the one-line install hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        name = _RUNTIMES.get(module, module)
        raise RuntimeMissing(f"{needed_for} needs {name}, which is not installed; {DEPLOY_HINT}") from None


def task_tolerance(quant: str, n: int) -> float:
    return max(0.02 if quant in QUANTIZED else 0.01, 1.0 / max(n, 1))


@dataclass(frozen=True)
class TaskCheck:
    runtime: str
    correct: int
    records: int
    reference: float  # the run's central-evaluation accuracy of the exported round
    reference_source: str
    tolerance: float
    quantized: bool = False  # a loss budget (one-sided) instead of parity (two-sided)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.records, 1)

    @property
    def ok(self) -> bool:
        gap = self.reference - self.accuracy
        return (gap if self.quantized else abs(gap)) <= self.tolerance + 1e-9

    def line(self) -> str:
        head = (
            f"exact match in {self.runtime}: {self.accuracy:.3f} ({self.correct}/{self.records}) vs"
            f" {self.reference:.3f} {self.reference_source}:"
        )
        if not self.ok:
            lost = "LOSES more than" if self.quantized else "DIFFERS by more than"
            return f"{head} {lost} the tolerance {self.tolerance:.3f}"
        if self.accuracy - self.reference > self.tolerance + 1e-9:  # a quantized export that scores higher
            return f"{head} higher (quantization flips answers both ways); no loss beyond {self.tolerance:.3f}"
        return f"{head} within the tolerance {self.tolerance:.3f}"


def central_accuracy(run_dir: Path, round_: int) -> float | None:
    """``eval_accuracy`` of ``round_`` in the run's ``metrics.jsonl`` (None when not recorded)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            raise ExportError(f"{path}: a line is not JSON") from None
        if row.get("round") == round_ and row.get("eval_accuracy") is not None:
            return float(row["eval_accuracy"])
    return None


def eval_prompts(cfg: RunConfig, tok: Any) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The run's evaluation records, their prompts (chat template + system prompt) and answers."""
    from . import data as data_mod
    from .model import cache_root

    records = data_mod.test_records(cfg.data, cache_root(cfg.model))
    d = cfg.data
    prompts = [data_mod.prompt_text(tok, str(r[d.prompt_column]), d.system_prompt) for r in records]
    return records, prompts, [str(r[d.response_column]) for r in records]


def count_correct(texts: list[str], answers: list[str]) -> int:
    """:func:`fedslm.training.count_correct`, imported on use (training imports torch)."""
    from .training import count_correct as exact_matches

    return exact_matches(texts, answers)


def load_llama(path: Path, needed_for: str) -> Any:
    """A GGUF loaded in llama.cpp on all cores, with its weights as written: no extra buffer types
    (``use_extra_bufts=False``, what llama.cpp's ``--no-repack`` sets).

    Why: with extra buffer types llama.cpp moves the weights of a quantized GGUF (q8_0, q4_k_m, the
    bundled Q4_1) into its AMX buffer on a CPU with AMX, and llama-cpp-python 0.3.36's AMX matmul
    (``ggml_backend_amx_mul_mat``) dies there with a general protection fault in ``ldtilecfg`` on the
    first token (measured on this Xeon with amx_int8; BENCHMARKS.md "Export parity"). f16 tensors never
    take that buffer, so f16 runs the same either way. ``Llama`` has no argument for it: its default
    model parameters are replaced for the one load, and restored.
    """
    llama_cpp = require("llama_cpp", needed_for)
    api = llama_cpp.llama_cpp
    default = api.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False)
    finally:
        api.llama_model_default_params = default


def llama_cpp_answers(path: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of a GGUF in llama.cpp; the prompt text is tokenized by llama.cpp (BOS as the GGUF says)."""
    llm = load_llama(path, "the task check of a GGUF export")
    texts = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), special=True)
        out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        texts.append(out["choices"][0]["text"])
    return texts


def onnx_answers(path: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of an ONNX export in ONNX Runtime GenAI, tokenized by its own tokenizer."""
    og = require("onnxruntime_genai", "the task check of an ONNX export")
    model = og.Model(str(path))
    tokenizer = og.Tokenizer(model)
    eos = json.loads((Path(path) / "genai_config.json").read_text())["model"]["eos_token_id"]
    stops = set(eos) if isinstance(eos, list) else {eos}
    texts = []
    for prompt in prompts:
        answer = onnx_greedy(og, model, tokenizer.encode(prompt), max_new_tokens)
        texts.append(tokenizer.decode([t for t in answer if t not in stops]))
    return texts


def onnx_greedy(og: ModuleType, model: Any, ids: Any, max_new_tokens: int) -> list[int]:
    """The new tokens ONNX Runtime GenAI generates greedily after ``ids`` (up to EOS or ``max_new_tokens``)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]]


def transformers_accuracy(cfg: RunConfig, model: Any, tok: Any) -> tuple[int, int]:
    """Correct answers of a transformers model, scored by the central evaluation's own code."""
    from . import tasks

    records = eval_prompts(cfg, tok)[0]
    metrics = tasks.evaluate_records(cfg, model, tok, records, tasks.encode(cfg, tok, records))
    return round(metrics["eval_accuracy"] * len(records)), len(records)


def trained_accuracy(cfg: RunConfig, adapter: Path) -> tuple[int, int]:
    from peft import PeftModel

    from .runs import trained_base

    base, tok = trained_base(cfg)
    return transformers_accuracy(cfg, PeftModel.from_pretrained(base, str(adapter)).eval(), tok)


def check_task(run_dir: Path, fmt: str, quant: str, path: Path, round_: int) -> TaskCheck:
    """Score the export at ``path`` by task in its runtime, beside the run's central evaluation of ``round_``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import resolve_model_dir
    from .runs import run_adapter

    cfg, adapter = run_adapter(run_dir, round_, as_trained=True)
    new_tokens = cfg.eval.max_new_tokens
    if fmt in ("gguf", "onnx"):  # the prompt text from the run's tokenizer (the one carried into the export)
        tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(cfg.model) if fmt == "gguf" else path))
        _, prompts, answers = eval_prompts(cfg, tok)
        runtime, answer = ("llama.cpp", llama_cpp_answers) if fmt == "gguf" else ("ONNX Runtime", onnx_answers)
        correct, n = count_correct(answer(path, prompts, new_tokens), answers), len(answers)
    elif fmt == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()
        runtime, (correct, n) = (
            "transformers",
            transformers_accuracy(cfg, model, AutoTokenizer.from_pretrained(str(path))),
        )
    else:
        runtime, (correct, n) = "transformers (base + adapter)", trained_accuracy(cfg, path)
    reference = central_accuracy(run_dir, round_)
    source = f"in the run's central evaluation (metrics.jsonl, round {round_})"
    if reference is None:
        trained, _ = trained_accuracy(cfg, adapter)
        reference, source = (
            trained / max(n, 1),
            f"of the trained model in fedslm (round {round_}; no metrics.jsonl row)",
        )
    return TaskCheck(runtime, correct, n, reference, source, task_tolerance(quant, n), quant in QUANTIZED)
