"""fedslm export on a tiny NF4 run: --out safety, merge onto the weights the adapter was trained against,
verification against the trained model (quantized base + adapter), the Ollama Modelfile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedslm.config import load_config
from fedslm.export import ExportError, export
from fedslm.export_gguf import write_modelfile

ROOT = Path(__file__).resolve().parent.parent
FEDSLM = str(Path(sys.executable).with_name("fedslm"))


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory) -> Path:
    """A run directory whose round-1 adapter (random, non-zero B) was built on the tiny NF4 base."""
    from fedslm.adapters import attach_lora
    from fedslm.model import load_base_model

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.quantization=nf4", "model.compute_dtype=float32"])
    run = tmp_path_factory.mktemp("nf4") / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    model = attach_lora(load_base_model(cfg.model).model, cfg.lora)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(run / "adapters" / "round-001"))
    return run


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_non_empty_out_is_refused_and_survives(nf4_run, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty .*notes.txt.*--force"):
        export(nf4_run, victim, "peft")
    assert _tree(victim) == {"notes.txt": b"mine"}
    proc = subprocess.run(
        [FEDSLM, "export", str(nf4_run), "--format", "merged", "--out", str(victim)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not empty" in proc.stderr  # one line, no traceback
    assert _tree(victim) == {"notes.txt": b"mine"}


@pytest.mark.parametrize("where", [".", "adapters", "adapters/new", ".."])
def test_out_in_or_around_the_run_is_refused_even_with_force(nf4_run, where):
    before = _tree(nf4_run)
    with pytest.raises(ExportError, match="run directory"):
        export(nf4_run, nf4_run / where, "peft", force=True)
    assert _tree(nf4_run) == before


def test_nf4_export_reproduces_the_trained_model(nf4_run, tmp_path):
    """Merged into the de-quantized NF4 weights it matches the trained model; into the original it does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedslm.export import PROMPTS, _trained_base

    victim = tmp_path / "out"
    victim.mkdir()
    (victim / "old.bin").write_bytes(b"x")
    result = export(nf4_run, victim, "merged", force=True)
    assert result.replaced == ("old.bin",)
    assert not (victim / "old.bin").exists() and (victim / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    assert result.max_abs_logit_diff <= result.tolerance
    # independent check: the trained model (NF4 base + adapter) against the export reloaded here
    cfg = load_config(nf4_run / "config.yaml")
    base, tok = _trained_base(cfg)
    trained = PeftModel.from_pretrained(base, str(nf4_run / "adapters" / "round-001")).eval()
    exported = AutoModelForCausalLM.from_pretrained(str(victim), dtype=torch.float32).eval()
    with torch.no_grad():
        ids = tok(PROMPTS[0], return_tensors="pt")
        gap = float((trained(**ids).logits - exported(**ids).logits).abs().max())
    assert gap <= 1e-3
    assert result.original_base_diff is not None and result.original_base_diff > 20 * max(gap, 1e-5)


def test_peft_export_into_new_folder(nf4_run, tmp_path):
    result = export(nf4_run, tmp_path / "a" / "peft", "peft")
    assert result.max_abs_logit_diff <= 1e-4 and result.replaced == ()
    assert (tmp_path / "a" / "peft" / "adapter_model.safetensors").is_file()


def test_modelfile_carries_system_prompt_template_and_stops(tmp_path):
    from transformers import AutoTokenizer

    from fedslm.model import bundled_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
    write_modelfile(tmp_path, tok, 'Answer with the "department" only.')
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert json.loads(next(x for x in lines if x.startswith("SYSTEM "))[7:]) == 'Answer with the "department" only.'
    template = json.loads(next(x for x in lines if x.startswith("TEMPLATE "))[9:])
    assert "<|im_start|>system\n{{ .System }}<|im_end|>" in template
    assert {json.loads(x[15:]) for x in lines if x.startswith("PARAMETER stop ")} == {"<|im_end|>", "<|im_start|>"}
    write_modelfile(tmp_path, tok, "")
    assert not any(x.startswith("SYSTEM") for x in (tmp_path / "Modelfile").read_text().splitlines())
