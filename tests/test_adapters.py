"""LoRA adapters: only adapter tensors travel, exactly; PEFT's own format reloads to equal logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedslm.adapters import (
    AdapterError,
    adapter_state,
    from_arrayrecord,
    load_adapter_state,
    save_adapter_dir,
    target_modules,
    to_arrayrecord,
)
from fedslm.config import LoRAConfig


def _randomize(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    return state


def test_arrayrecord_round_trip_is_exact_and_excludes_base(tiny_peft) -> None:
    model = tiny_peft.model
    state = _randomize(model)
    record = to_arrayrecord(adapter_state(model))
    assert set(record) == set(state)
    assert all(".lora_A." in k or ".lora_B." in k for k in record)  # no base weight travels
    back = from_arrayrecord(record)
    for k, v in state.items():
        assert torch.equal(back[k], v)
    n_params = sum(int(np.prod(a.shape)) for a in record.values())
    assert n_params == sum(p.numel() for p in model.parameters() if p.requires_grad) == 1792


def test_load_rejects_wrong_shape_and_keys(tiny_peft) -> None:
    model = tiny_peft.model
    state = adapter_state(model)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    bad = dict(state)
    bad[key] = torch.zeros(8, 4)
    with pytest.raises(AdapterError, match=rf"{key}.*\(8, 4\).*\(64, 4\)"):
        load_adapter_state(model, bad)
    with pytest.raises(AdapterError, match="unexpected key 'x.lora_A.weight'"):
        load_adapter_state(model, {**state, "x.lora_A.weight": torch.zeros(1)})
    with pytest.raises(AdapterError, match="lacks key"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})


def test_loading_keeps_parameter_identity(tiny_peft) -> None:
    """In-place copies: optimizers/hooks bound to the parameters stay valid (opacus#820)."""
    model = tiny_peft.model
    before = [id(p) for p in model.parameters() if p.requires_grad]
    _randomize(model)
    assert before == [id(p) for p in model.parameters() if p.requires_grad]


def test_saved_adapter_reloads_with_peft_to_equal_logits(tiny_peft, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_peft.model
    state = _randomize(model)
    out = save_adapter_dir(model, state, tmp_path / "round-001")
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_peft.base.path), dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, str(out))
        got = reloaded(input_ids=ids).logits
        merged = reloaded.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(merged, expected, atol=1e-4)  # merged == unmerged


def test_default_target_modules_per_architecture() -> None:
    lora = LoRAConfig()
    assert target_modules("llama", lora) == ["q_proj", "v_proj"]
    assert target_modules("phi3", lora) == ["qkv_proj"]
    assert target_modules("llama", LoRAConfig(target_modules=["o_proj"])) == ["o_proj"]
    with pytest.raises(AdapterError, match="set lora.target_modules"):
        target_modules("mamba", lora)
