"""Every model family users pick, through the real code paths on tiny random configs:
load -> quantize -> LoRA (per-architecture default targets) -> one DP-SGD step -> FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslm import data
from fedslm.adapters import adapter_state, attach_lora, to_arrayrecord
from fedslm.config import DataConfig, LoRAConfig, ModelConfig
from fedslm.model import cache_root, load_base_model
from fedslm.tiny import DECODERS
from fedslm.training import DPSettings, LocalTraining, train_local

QV = {"q_proj", "v_proj"}
TARGETS = {"llama": QV, "qwen2": QV, "mistral": QV, "gemma2": QV, "phi3": {"qkv_proj"}}


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_family_round_trip(family: str, quant: str) -> None:
    loaded = load_base_model(ModelConfig(name=f"tiny-{family}", quantization=quant, compute_dtype="float32"))
    model = attach_lora(loaded.model, LoRAConfig(r=4, alpha=8))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names}
    assert adapted == TARGETS[family], names[:4]
    assert len(names) == 2 * 2 * len(TARGETS[family])  # 2 layers x (A, B) per target
    cfg = DataConfig(num_records=60)
    records = data.client_records(cfg, cache_root(), 0, 2).records[:16]
    examples = data.encode_all(loaded.tokenizer, records, cfg, 96)
    before = adapter_state(model)
    spec = LocalTraining(steps=2, batch_size=4, learning_rate=0.01, dp=DPSettings(1.0, 1.0, 0.25))
    result = train_local(model, examples, loaded.tokenizer.pad_token_id, spec)
    after = adapter_state(model)
    assert np.isfinite(result.loss_mean) and all(torch.isfinite(v).all() for v in after.values())
    assert all(not torch.equal(before[k], after[k]) for k in before)
    # FedAvg of two clients' adapters equals the hand-computed weighted mean
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    contents = [
        RecordDict({"arrays": to_arrayrecord(s), "metrics": MetricRecord({"num-examples": n})})
        for s, n in ((before, 1), (after, 3))
    ]
    agg = aggregate_arrayrecords(contents, "num-examples")
    key = next(iter(before))
    np.testing.assert_allclose(agg[key].numpy(), (before[key].numpy() + 3 * after[key].numpy()) / 4, rtol=1e-6)
