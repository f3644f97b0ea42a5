"""ONNX int4 settings of onnxruntime-genai's model builder, side by side on one run: how many of the run's
evaluation records each answers right in ONNX Runtime, how many answers equal the trained model's, size, speed.

    .venv/bin/python bench/export_int4.py RUN_DIR [--only default,fp32-activations] [--extra 480]

The adapter is merged once (into the de-quantized base it was trained against, as ``fedslm export``
does) and built once per setting of :data:`SETTINGS` (the builder's ``--extra_options``). The reference
answers are the merged model's greedy answers in transformers (fp32), which equal the trained model's
(``fedslm export --format merged`` checks that to 1e-3 in max |logit|).

A run's 48 evaluation records resolve a loss only to one record, 2.1 points. ``--extra N`` also scores
N more triage records that the run never saw (generated with another seed; none whose question is in
the run's data), where one record is 100/N points.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedslm.export_onnx import int4_mix, int8_overrides, matmul_names  # noqa: E402

LAYERS = range(30)  # SmolLM2-135M's decoder layers


def nodes(*projections: str, layers: range | list[int] = LAYERS) -> list[str]:
    return matmul_names(projections, layers)


def int8_nodes(names: list[str], lm_head: bool = True) -> dict:
    """--target_options keeping ``names`` (and, untied, the lm_head) in 8 bits, the rest of the body int4."""
    return int8_overrides(names + (["/lm_head/MatMul"] if lm_head else []))


ATTN_DOWN = nodes("attn/qkv_proj", "attn/o_proj", "mlp/down_proj")
ENDS = [0, 1, 2, 3, 26, 27, 28, 29]  # the first and last eighth of the layers, as llama.cpp's mixed strategy
UNTIED_KQ = {"shared_embeddings": "false", "algo_config": "k_quant"}
GATHER4 = {"op_types_to_quantize": "MatMul/Gather"}
# label -> the builder's --extra_options (int4 unless "precision" names another; "target": --target_options)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},  # RTN, block 32, symmetric, accuracy_level 4 (int8 activations) on the CPU EP
    "fp32-activations": {"accuracy_level": "1"},
    # SmolLM2 ties lm_head to the embeddings, which the builder then shares as one int4 matrix;
    # last_matmul:int8 alone writes a model that does not load (lm_head.MatMul.weight_Q8G32 missing), and
    # so does is_symmetric=false (a uint8 embedding Reshape where float is expected)
    "untied": {"shared_embeddings": "false"},
    "untied+lm_head-int8": {"shared_embeddings": "false", "matmul_mixed_precision": "last_matmul:int8"},
    "untied+k_quant_mixed": {"shared_embeddings": "false", "algo_config": "k_quant_mixed"},
    "untied+k_quant_mixed+asym": {**UNTIED_KQ, "algo_config": "k_quant_mixed", "is_symmetric": "false"},
    "untied+k_quant_mixed+block16": {**UNTIED_KQ, "algo_config": "k_quant_mixed", "block_size": "16"},
    "k_quant+down_proj-int8": {**UNTIED_KQ, "target": int8_nodes(nodes("mlp/down_proj"))},
    "k_quant+mlp-int8": {**UNTIED_KQ, "target": int8_nodes(nodes("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"))},
    "k_quant+mlp-int8+gather4": {
        **UNTIED_KQ,
        **GATHER4,
        "target": int8_nodes(nodes("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")),
    },
    "k_quant+attn-int8": {**UNTIED_KQ, "target": int8_nodes(nodes("attn/qkv_proj", "attn/o_proj"))},
    "k_quant+attn+down-int8": {**UNTIED_KQ, "target": int8_nodes(ATTN_DOWN)},
    "tied+k_quant+attn+down-int8": {
        "algo_config": "k_quant",
        "target": int8_nodes(ATTN_DOWN, lm_head=False),
    },
    "tied+k_quant+attn-int8": {
        "algo_config": "k_quant",
        "target": int8_nodes(nodes("attn/qkv_proj", "attn/o_proj"), lm_head=False),
    },
    "tied+attn+down-int8": {"target": int8_nodes(ATTN_DOWN, lm_head=False)},
    "k_quant+attn+down-int8+ends": {
        **UNTIED_KQ,
        "target": int8_nodes(ATTN_DOWN + nodes("mlp/gate_proj", "mlp/up_proj", layers=ENDS)),
    },
    "k_quant+attn+down+up-int8": {**UNTIED_KQ, "target": int8_nodes(ATTN_DOWN + nodes("mlp/up_proj"))},
    "tied4+k_quant+attn+down-int8": {
        "algo_config": "k_quant",
        **GATHER4,
        "target": int8_nodes(ATTN_DOWN, lm_head=False),
    },
    "tied4+attn+down-int8": {**GATHER4, "target": int8_nodes(ATTN_DOWN, lm_head=False)},
    "tied4+k_quant+attn+down-int8+ends": {
        "algo_config": "k_quant",
        **GATHER4,
        "target": int8_nodes(ATTN_DOWN + nodes("mlp/gate_proj", "mlp/up_proj", layers=ENDS), lm_head=False),
    },
    "tied4+k_quant+attn+down+up-int8": {
        "algo_config": "k_quant",
        **GATHER4,
        "target": int8_nodes(ATTN_DOWN + nodes("mlp/up_proj"), lm_head=False),
    },
    "tied4+body-int8": {
        "algo_config": "k_quant",
        **GATHER4,
        "target": int8_nodes(ATTN_DOWN + nodes("mlp/gate_proj", "mlp/up_proj"), lm_head=False),
    },
    # --quant int4 (fedslm.export_onnx.int4_mix): tied int8 embeddings/lm_head; int8 attention, down, and
    # the MLP of the first and last quarter of the layers (0-7, 22-29); int4 gate/up of layers 8-21
    "fedslm-int4": {**int4_mix(len(LAYERS))[0], "target": int4_mix(len(LAYERS))[1]},
    "int8": {"precision": "int8"},
    # the mix before it (int4 gate/up of layers 4-25), and one with only up_proj of layers 4-25 int4
    "mix-gate-up-4-25": {
        **int4_mix(len(LAYERS))[0],
        "target": int8_nodes(ATTN_DOWN + nodes("mlp/gate_proj", "mlp/up_proj", layers=ENDS)),
    },
    "mix-up-only": {
        **int4_mix(len(LAYERS))[0],
        "target": int8_nodes(
            nodes("attn/qkv_proj", "attn/o_proj", "mlp/down_proj", "mlp/gate_proj") + nodes("mlp/up_proj", layers=ENDS)
        ),
    },
}


def _reference_answers(merged: Any, tok: Any, prompts: list[str], new_tokens: int) -> list[str]:
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    with torch.no_grad():
        gen = merged.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _speed(path: Path, text: str, n: int) -> float:
    import onnxruntime_genai as og

    from fedslm.export_runtime import onnx_greedy

    model = og.Model(str(path))
    ids = og.Tokenizer(model).encode(text)
    onnx_greedy(og, model, ids, 4)
    t0 = time.perf_counter()
    made = len(onnx_greedy(og, model, ids, n))
    return made / (time.perf_counter() - t0)


def unseen_prompts(cfg: Any, tok: Any, n: int) -> tuple[list[str], list[str]]:
    """Prompts and answers of ``n`` triage records generated with another seed than the run's, leaving
    out any whose question is among the run's own records (training or evaluation)."""
    from fedslm import triage
    from fedslm.data import load_records, prompt_text
    from fedslm.model import cache_root

    d = cfg.data
    if d.source != "triage":
        raise SystemExit(f"--extra generates triage records; this run's data.source is {d.source!r}")
    seen = {str(r[d.prompt_column]) for r in load_records(d, cache_root(cfg.model))}
    fresh = [r for r in triage.generate(4 * n, seed=d.seed + 7919) if r["question"] not in seen][:n]
    if len(fresh) < n:
        raise SystemExit(f"--extra {n}: only {len(fresh)} generated records are not in the run's data")
    return [prompt_text(tok, r["question"], d.system_prompt) for r in fresh], [r["answer"] for r in fresh]


def compare(run: Path, labels: list[str], tokens: int, extra: int = 0) -> None:
    from peft import PeftModel

    from fedslm.data import prompt_text
    from fedslm.export_onnx import build_onnx
    from fedslm.export_runtime import central_accuracy, count_correct, eval_prompts, onnx_answers
    from fedslm.runs import ExportError, dequantized_base, run_adapter, trained_base
    from fedslm.training import normalize_answer

    cfg, adapter = run_adapter(run)
    round_ = int(adapter.name.split("-")[-1])
    tok = trained_base(cfg)[1]
    merged = PeftModel.from_pretrained(dequantized_base(cfg), str(adapter)).eval().merge_and_unload()
    _, prompts, answers = eval_prompts(cfg, tok)
    new_tokens = cfg.eval.max_new_tokens
    want = [normalize_answer(t) for t in _reference_answers(merged, tok, prompts, new_tokens)]
    speed_text = prompt_text(tok, "Describe how a hospital triages a patient with chest pain.", cfg.data.system_prompt)
    central = central_accuracy(run, round_)
    print(f"round {round_}: central eval {central}; merged model in transformers {count_correct(want, answers)}/48")
    more, more_answers = unseen_prompts(cfg, tok, extra) if extra else ([], [])
    more_want = [normalize_answer(t) for t in _reference_answers(merged, tok, more, new_tokens)] if extra else []
    if extra:
        print(f"{extra} unseen records: merged model in transformers {count_correct(more_want, more_answers)}/{extra}")
    extra_head = f" exact match ({extra} unseen) | equal answers ({extra} unseen) |" if extra else ""
    head = "| setting | extra_options | size MB | exact match | answers equal to the trained model's |"
    print(f"{head}{extra_head} tokens/s |")
    print("|---|---|---:|---:|---:|" + ("---:|---:|" if extra else "") + "---:|")
    for label in labels:
        options = dict(SETTINGS[label])
        precision = options.pop("precision", "int4")
        target = options.pop("target", None)
        with tempfile.TemporaryDirectory(prefix="int4-") as tmp:
            out = Path(tmp) / label
            try:
                build_onnx(merged, tok, out, precision, options, target)
            except ExportError as e:
                print(f"| {label} | build failed: {e} |", flush=True)
                continue
            got = [normalize_answer(t) for t in onnx_answers(out, prompts, new_tokens)]
            mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
            same = sum(g == w for g, w in zip(got, want, strict=True))
            shown = " ".join(f"{k}={v}" for k, v in options.items()) or "(builder defaults)"
            cells = ""
            if extra:
                got_more = [normalize_answer(t) for t in onnx_answers(out, more, new_tokens)]
                same_more = sum(g == w for g, w in zip(got_more, more_want, strict=True))
                cells = f" {count_correct(got_more, more_answers)}/{extra} | {same_more}/{extra} |"
            print(
                f"| {label} | {shown} | {mb:.1f} | {count_correct(got, answers)}/{len(answers)} |"
                f" {same}/{len(want)} |{cells} {_speed(out, speed_text, tokens):.1f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings, of: " + ",".join(SETTINGS))
    ap.add_argument("--tokens", type=int, default=32, help="new tokens generated for the speed column")
    ap.add_argument("--extra", type=int, default=0, help="also score this many triage records the run never saw")
    args = ap.parse_args()
    unknown = sorted(set(args.only.split(",")) - set(SETTINGS))
    if unknown:
        ap.error(f"--only: unknown settings {unknown}; choose from {list(SETTINGS)}")
    compare(args.run_dir, args.only.split(","), args.tokens, args.extra)


if __name__ == "__main__":
    main()
