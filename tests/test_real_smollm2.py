"""The real SmolLM2-135M-Instruct (4-bit NF4 base): DP training moves LoRA (opacus issue 820
regression), and a short federation runs the whole path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedslm import data
from fedslm.adapters import PEFT_CACHE, adapter_state, load_adapter_state
from fedslm.config import load_config
from fedslm.model import cache_root
from fedslm.training import DPSettings, LocalTraining, train_local

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_dp_training_on_nf4_smollm2_changes_lora_every_step_and_lowers_loss() -> None:
    """Regression for opacus#820: DP-SGD over PEFT must really train the LoRA weights."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["data.num_records=1200"])  # ~243 records a client
    resident = PEFT_CACHE.get(cfg.model, cfg.lora)
    model, tok = resident.model, resident.base.tokenizer
    layers = model.base_model.model.model.layers  # the demo adapts the last 15 of 30 (lora.last_layers)
    assert type(layers[15].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert type(layers[14].self_attn.q_proj).__name__ == "Linear4bit"  # below: no LoRA
    start = adapter_state(model)
    records = data.client_records(cfg.data, cache_root(cfg.model), 0, 4).records
    examples = data.encode_all(tok, records, cfg.data, cfg.model.max_length)
    q = 4 / len(examples)
    snapshots = [start]

    def on_step(step: int) -> None:
        snapshots.append(adapter_state(model))

    # 12 steps of 4 (measured: mean loss of the first 6 steps 4.17, of the last 6 2.66)
    spec = LocalTraining(steps=12, batch_size=4, learning_rate=0.01, seed=1, dp=DPSettings(0.6, 1.0, q))
    try:
        result = train_local(model, examples, tok.pad_token_id, spec, on_step=on_step)
    finally:
        final = adapter_state(model)
        load_adapter_state(model, start)
    assert len(snapshots) == 13
    for before, after in zip(snapshots, snapshots[1:], strict=False):
        changed = sum(not torch.equal(before[k], after[k]) for k in before)
        assert changed == len(before) == 60  # every LoRA tensor (15 layers x q, v x A, B) moves at every step
    assert all(torch.isfinite(v).all() for v in final.values())
    assert all(float(final[k].abs().max()) > 0 for k in final if "lora_B" in k)  # B left its zero init
    first, last = sum(result.losses[:6]) / 6, sum(result.losses[-6:]) / 6
    assert last < first - 1.0, result.losses


def test_short_dp_federation_on_real_smollm2(real_run_dir) -> None:
    out, rows = real_run_dir
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    assert 0 < rows[1]["epsilon_max"] < 8.0
    # two r=8 adapters on 15 layers (230,400 values) in bf16, + 60 key names and the metric record each
    assert 2 * 230_400 * 2 < rows[1]["bytes_up"] < 2 * (230_400 * 2 + 15_000)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "local" and summary["model"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("fmt", ["peft", "merged", "gguf", "onnx"])
def test_exports_reload_to_the_same_logits(real_run_dir, tmp_path: Path, fmt: str) -> None:
    from fedslm.export import TOLERANCE, export

    run, _ = real_run_dir
    quant = {"gguf": "f16", "onnx": "fp32"}.get(fmt, "none")  # onnx fp32: the precision that can tell bases apart
    result = export(run, tmp_path / fmt, fmt, quant=quant)
    key = f"{fmt}-{quant}"
    # the tolerance is the format's plus the NF4 kernel's own gap (at most 1e-3, see export._check); it must stay
    # far below what merging into the original float base gives, or the check could not tell the bases apart
    assert TOLERANCE[key] <= result.tolerance and result.max_abs_logit_diff <= result.tolerance
    if fmt != "peft":
        assert result.original_base_diff > 10 * result.tolerance
    if fmt == "peft":
        assert result.max_abs_logit_diff == 0.0 and (tmp_path / fmt / "adapter_model.safetensors").is_file()
    if fmt == "merged":
        assert (tmp_path / fmt / "config.json").is_file() and not list((tmp_path / fmt).glob("adapter_*"))
    if fmt == "gguf":
        import gguf

        reader = gguf.GGUFReader(str(result.path))
        assert reader.fields["general.architecture"].contents() == "llama"
        assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
        assert "FROM ./model.gguf" in (tmp_path / fmt / "Modelfile").read_text()
    if fmt == "onnx":
        genai = json.loads((tmp_path / fmt / "genai_config.json").read_text())["model"]
        assert genai["decoder"]["num_hidden_layers"] == 30 and genai["vocab_size"] == 49152


def test_export_errors_name_the_problem(real_run_dir, tmp_path: Path) -> None:
    from fedslm.export import ExportError, export

    run, _ = real_run_dir
    with pytest.raises(ExportError, match="no round 7"):
        export(run, tmp_path / "x", "peft", round_=7)
    with pytest.raises(ExportError, match="choose one of"):
        export(run, tmp_path / "x", "tflite")  # onnx is a format since issue 19
    with pytest.raises(ExportError, match=r"--quant 'q4_k_m' does not apply to onnx"):
        export(run, tmp_path / "x", "onnx", quant="q4_k_m")
    with pytest.raises(ExportError, match="not a run directory"):
        export(tmp_path, tmp_path / "x", "peft")


def test_generate_streams_an_answer(real_run_dir) -> None:
    from fedslm.chat import ChatModel

    run, _ = real_run_dir
    model = ChatModel(run)
    pieces = list(model.stream([{"role": "user", "content": "Chest pain on exertion. Which department?"}], 8))
    assert len(pieces) >= 2 and "".join(pieces).strip()
