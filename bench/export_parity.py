"""Every export format and quantization of one run, side by side: size, exact match in its runtime,
generation speed on this CPU, beside fedslm's own evaluation of the trained model.

    .venv/bin/python bench/export_parity.py RUN_DIR [--out DIR] [--only gguf-f16,onnx-int4] [--markdown FILE]

For each format it runs ``fedslm.export.export`` (the logit check against the trained NF4 model +
adapter), ``fedslm.export_runtime.check_task`` (exact match on the run's evaluation records in the
runtime: llama.cpp, ONNX Runtime GenAI, transformers) and times greedy generation of up to
``--tokens`` new tokens for one prompt in that runtime; ``fedslm generate`` (the trained model in
fedslm: NF4 base + adapter through transformers) is the speed reference. It also measures where the
issue's llama.cpp gap could come from (``--causes``): the GGUF merged into the original float base,
llama.cpp's own chat formatting, no system prompt, and llama.cpp's tokenization of the prompts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ["peft-none", "merged-none", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8", "onnx-int4"]
SPEED_PROMPT = "Describe, step by step, how a hospital emergency department triages a patient with chest pain."


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _generator(fmt: str, path: Path, text: str, tok: Any, run: Path) -> Callable[[int], int]:
    """A function generating up to n tokens greedily from ``text`` in the format's runtime; returns how many."""
    if fmt == "gguf":
        from fedslm.export_runtime import load_llama

        llm = load_llama(path, "the speed of a GGUF export")
        ids = llm.tokenize(text.encode(), special=True)
        return lambda n: llm.create_completion(ids, max_tokens=n, temperature=0.0)["usage"]["completion_tokens"]
    if fmt == "onnx":
        import onnxruntime_genai as og

        model = og.Model(str(path))
        ids = og.Tokenizer(model).encode(text)

        from fedslm.export_runtime import onnx_greedy

        return lambda n: len(onnx_greedy(og, model, ids, n))
    import torch

    if fmt == "merged":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    else:  # fedslm generate: the run's base, quantized as in training, with the adapter
        from fedslm.chat import ChatModel

        model = ChatModel(run).model
    enc = tok(text, return_tensors="pt", add_special_tokens=False)

    def hf_generate(n: int) -> int:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return out.shape[1] - enc["input_ids"].shape[1]

    return hf_generate


def _tokens_per_s(fmt: str, path: Path, cfg: Any, tok: Any, run: Path, n: int) -> float:
    """Generation speed after one warm-up call (graph set-up, kernel selection and caches excluded)."""
    from fedslm.data import prompt_text

    generate = _generator(fmt, path, prompt_text(tok, SPEED_PROMPT, cfg.data.system_prompt), tok, run)
    generate(4)
    t0 = time.perf_counter()
    made = generate(n)
    return made / (time.perf_counter() - t0)


def parity(run: Path, out: Path, variants: list[str], n: int) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from fedslm.export import export, run_adapter
    from fedslm.export_runtime import central_accuracy, check_task, eval_prompts, trained_accuracy
    from fedslm.model import resolve_model_dir

    cfg, adapter = run_adapter(run)
    round_ = int(adapter.name.split("-")[-1])
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(cfg.model)))
    central = central_accuracy(run, round_)  # fedslm's own evaluation of the trained model, if recorded
    total = len(eval_prompts(cfg, tok)[0])
    acc = central if central is not None else trained_accuracy(cfg, adapter)[0] / total
    rows = [
        {
            "variant": f"trained model in fedslm (round {round_})",
            "mb": None,
            "diff": 0.0,
            "acc": acc,
            "n": total,
            "central": central,
            "tps": _tokens_per_s("fedslm", run, cfg, tok, run, n),
        }
    ]
    print(_line(rows[-1]), flush=True)
    for variant in variants:
        fmt, quant = variant.split("-")
        try:
            result = export(run, out / variant, fmt, quant=None if quant == "none" else quant, force=True)
            task = check_task(run, fmt, result.quant, result.path, round_)
        except Exception as e:  # noqa: BLE001 - a failed variant is a row of the table, not the end of it
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {e}"})
            print(f"{variant}: {rows[-1]['error']}", flush=True)
            continue
        where = out / variant if fmt != "gguf" else result.path
        rows.append(
            {
                "variant": variant,
                "mb": _size_mb(out / variant),
                "diff": result.max_abs_logit_diff,
                "tol": result.tolerance,
                "acc": task.accuracy,
                "n": task.records,
                "central": task.reference,
                "runtime": task.runtime,
                "ok": task.ok,
                "tps": _tokens_per_s(fmt, where, cfg, tok, run, n),
            }
        )
        print(_line(rows[-1]), flush=True)
    return rows


def causes(run: Path, out: Path) -> list[tuple[str, float]]:
    """Exact match of GGUF f16 variants in llama.cpp that isolate the candidate causes of the issue's gap."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from fedslm.export import run_adapter
    from fedslm.export_gguf import write_gguf
    from fedslm.export_runtime import count_correct, eval_prompts, llama_cpp_answers, load_llama
    from fedslm.model import resolve_model_dir
    from fedslm.runs import float_base

    cfg, adapter = run_adapter(run)
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(cfg.model)))
    records, prompts, answers = eval_prompts(cfg, tok)
    n = cfg.eval.max_new_tokens
    fixed = out / "gguf-f16" / "model.gguf"
    found = [("GGUF f16, merged into the de-quantized NF4 base (this export)", fixed)]
    original, _ = float_base(cfg)
    old = out / "gguf-f16-original-base.gguf"
    write_gguf(cfg, PeftModel.from_pretrained(original, str(adapter)).merge_and_unload(), old, "f16")
    found.append(("GGUF f16, merged into the original float base (before the fix)", old))
    results = [(label, count_correct(llama_cpp_answers(p, prompts, n), answers) / len(answers)) for label, p in found]
    llm = load_llama(fixed, "the causes of the llama.cpp gap")
    ours = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    same = sum(llm.tokenize(p.encode(), special=True) == ids for p, ids in zip(prompts, ours, strict=True))
    results.append((f"llama.cpp tokenizes the prompt as transformers does ({same}/{len(prompts)} prompts)", 1.0))
    d = cfg.data
    for label, system in (
        ("llama.cpp's chat template, run's system prompt", d.system_prompt),
        ("no system prompt", ""),
    ):
        texts = []
        for r in records:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": str(r[d.prompt_column])}
            ]
            reply = llm.create_chat_completion(messages, max_tokens=n, temperature=0.0, top_k=1)
            texts.append(reply["choices"][0]["message"]["content"] or "")
        results.append((f"GGUF f16 via create_chat_completion: {label}", count_correct(texts, answers) / len(answers)))
    for label, acc in results:
        print(f"{label}: {acc:.3f}", flush=True)
    return results


def _line(r: dict[str, Any]) -> str:
    mb = "-" if r["mb"] is None else f"{r['mb']:.1f}"
    central = "-" if r.get("central") is None else f"{r['central']:.3f}"
    return (
        f"| {r['variant']} | {r.get('runtime', 'transformers (fedslm)')} | {mb} | {r['diff']:.3g} |"
        f" {r['acc']:.3f} ({round(r['acc'] * r['n'])}/{r['n']}) | {central} | {r['tps']:.1f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="where the exports go (default: a temporary folder)")
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants, of: " + ",".join(VARIANTS))
    ap.add_argument("--tokens", type=int, default=64, help="new tokens generated for the speed column")
    ap.add_argument("--causes", action="store_true", help="also measure the candidate causes of the llama.cpp gap")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="export-parity-"))
    print("| export | runtime | size MB | max abs logit diff vs trained | exact match | central eval | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    parity(args.run_dir, out, args.only.split(","), args.tokens)
    if args.causes:
        causes(args.run_dir, out)


if __name__ == "__main__":
    main()
