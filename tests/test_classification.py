"""Classification: hand-computed metrics, encoders and decoders with a LoRA + trained head,
and a federation whose classifier head is aggregated too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedslm import data
from fedslm.adapters import adapter_state, attach_lora
from fedslm.config import ConfigError, DataConfig, LoRAConfig, ModelConfig, load_config
from fedslm.model import cache_root, load_base_model
from fedslm.training import DPSettings, LocalTraining, classification_metrics, train_local

ROOT = Path(__file__).resolve().parent.parent


def test_metrics_hand_computed() -> None:
    # classes 0,1,2; truth/pred pairs: (0,0) (0,1) (1,1) (1,1) (2,1) (2,2)
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 2], 3)
    # precision: c0 1/1, c1 2/4, c2 1/1 -> 2.5/3 ; recall: c0 1/2, c1 2/2, c2 1/2 -> 2/3
    # f1: c0 2*1*.5/1.5=2/3, c1 2*.5*1/1.5=2/3, c2 2/3 -> 2/3
    assert m["eval_accuracy"] == pytest.approx(4 / 6)
    assert m["eval_precision"] == pytest.approx(2.5 / 3)
    assert m["eval_recall"] == pytest.approx(2 / 3)
    assert m["eval_f1"] == pytest.approx(2 / 3)
    never = classification_metrics([0, 1], [0, 0], 2)  # class 1 never predicted: precision 0
    assert never["eval_precision"] == pytest.approx(0.25) and never["eval_f1"] == pytest.approx((2 / 3) / 2)


@pytest.mark.parametrize(
    ("family", "targets", "head"),
    [
        ("bert", {"query", "value"}, "classifier"),
        ("distilbert", {"q_lin", "v_lin"}, "classifier"),
        ("llama", {"q_proj", "v_proj"}, "score"),
    ],
)
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_classifier_lora_and_head_train_with_dp(family: str, targets: set[str], head: str, quant: str) -> None:
    cfg = DataConfig(num_records=60)
    records = data.client_records(cfg, cache_root(), 0, 2).records[:24]
    names = data.label_names(cfg, data.load_records(cfg, cache_root()))
    assert names == sorted(names) and len(names) == 6
    loaded = load_base_model(
        ModelConfig(name=f"tiny-{family}", quantization=quant, compute_dtype="float32"),
        "classification",
        labels=tuple(names),
    )
    model = attach_lora(loaded.model, LoRAConfig(r=4, alpha=8), task="classification")
    state = adapter_state(model)
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[1] for k in state if ".lora_" in k}
    assert adapted == targets
    head_keys = [k for k in state if f"{head}." in k and ".lora_" not in k]
    assert head_keys, sorted(state)[-4:]  # the classifier head travels with the adapter
    examples = data.encode_all(loaded.tokenizer, records, cfg, 96, names)
    assert {e["label"] for e in examples} <= set(range(6))
    spec = LocalTraining(steps=3, batch_size=8, learning_rate=0.01, dp=DPSettings(1.0, 1.0, 8 / 24))
    result = train_local(model, examples, loaded.tokenizer.pad_token_id, spec)
    after = adapter_state(model)
    assert all(torch.isfinite(v).all() for v in after.values()) and result.steps == 3
    assert all(not torch.equal(state[k], after[k]) for k in head_keys)


@pytest.mark.parametrize("family", ["llama", "distilbert"])
def test_a_half_precision_model_trains_its_head_in_fp32(family: str) -> None:
    """float16 compute (``auto`` on a GPU older than Ampere): a head trained in fp16 gave a non-finite
    loss at the first step (AdamW's second moment underflows). The head is kept in fp32 and moves;
    the rest of the model stays in fp16. (fp16 is refused on a CPU as a setting, so the test casts.)"""
    cfg = DataConfig(num_records=60)
    records = data.client_records(cfg, cache_root(), 0, 2).records[:16]
    names = data.label_names(cfg, data.load_records(cfg, cache_root()))
    loaded = load_base_model(
        ModelConfig(name=f"tiny-{family}", quantization="none", compute_dtype="float32"), "classification", tuple(names)
    )
    model = attach_lora(loaded.model.to(torch.float16), LoRAConfig(r=4, alpha=8), task="classification")
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trained and set(trained.values()) == {torch.float32}, trained
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {torch.float16}
    state = adapter_state(model)
    examples = data.encode_all(loaded.tokenizer, records, cfg, 96, names)
    spec = LocalTraining(steps=3, batch_size=8, learning_rate=1e-3, dp=DPSettings(1.0, 1.0, 8 / 16))
    result = train_local(model, examples, loaded.tokenizer.pad_token_id, spec)
    after = adapter_state(model)
    assert result.steps == 3 and all(torch.isfinite(v).all() for v in after.values())
    assert all(not torch.equal(state[k], after[k]) for k in state if ".lora_" not in k)  # the head moved


NAMES = ("Cardiology", "Dermatology", "Gastroenterology", "Neurology", "Orthopedics", "Pulmonology")


def test_labels_head_answers_as_the_language_model_does() -> None:
    """model.head_init labels: on the chat prompt the classifier's logits are the causal LM's next-token
    logits of the class names' first tokens (tiny llama, tied embeddings, fp32: equal to 1e-5)."""
    mcfg = ModelConfig(name="tiny-llama", quantization="none", compute_dtype="float32")
    classifier = load_base_model(mcfg, "classification", labels=NAMES)
    lm = load_base_model(mcfg)
    tok = lm.tokenizer
    firsts = [tok(n, add_special_tokens=False)["input_ids"][0] for n in NAMES]
    assert len(set(firsts)) == 6
    emb = lm.model.get_input_embeddings().weight
    assert torch.equal(classifier.model.score.weight, emb[firsts])
    cfg = DataConfig()
    records = [{"question": "Triage: 40-year-old man with chest pain. Which department?", "specialty": "Cardiology"}]
    (example,) = data.encode_all(tok, records, cfg, 96, list(NAMES), chat=True)
    assert tok.decode(example["input_ids"]).endswith("Which department?<|im_end|>\n<|im_start|>assistant\n")
    assert "Answer with the department only." in tok.decode(example["input_ids"])  # data.system_prompt
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        got = classifier.model(input_ids=ids).logits[0]
        want = lm.model(input_ids=ids).logits[0, -1, firsts]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # without chat the raw question is classified (what an encoder reads)
    (raw,) = data.encode_all(tok, records, cfg, 96, list(NAMES))
    assert raw["input_ids"] == tok(records[0]["question"])["input_ids"]


def test_labels_sharing_a_first_token_start_from_their_mean() -> None:
    mcfg = ModelConfig(name="tiny-qwen2", quantization="none", compute_dtype="float32")
    names = ("Cardiology", "Cardiac surgery")
    loaded = load_base_model(mcfg, "classification", labels=names)
    ids = [loaded.tokenizer(n, add_special_tokens=False)["input_ids"] for n in names]
    assert ids[0][0] == ids[1][0] and ids[0] != ids[1]  # the case this covers
    emb = loaded.model.get_input_embeddings().weight
    want = torch.stack([emb[i].mean(0) for i in ids])
    torch.testing.assert_close(loaded.model.score.weight, want)
    assert not torch.equal(loaded.model.score.weight[0], loaded.model.score.weight[1])


def test_head_init_resolves_per_architecture_and_refuses_labels_on_an_encoder() -> None:
    from fedslm.server.preflight import load_run

    from fedslm import tasks
    from fedslm.modelinfo import ModelLoadError

    tiny = ROOT / "configs" / "classify-tiny.yaml"  # tiny-distilbert
    assert not tasks.chat_prompt(load_config(tiny))  # auto: an encoder reads the raw text
    assert tasks.chat_prompt(load_config(tiny, ["model.name=tiny-llama"]))
    assert not tasks.chat_prompt(load_config(tiny, ["model.name=tiny-llama", "model.head_init=random"]))
    assert not tasks.chat_prompt(load_config(ROOT / "configs" / "demo.yaml"))  # causal-lm: not a classifier
    refused = r"classify-tiny.yaml: model.head_init: labels needs a decoder.*distilbert encoder"
    with pytest.raises(ModelLoadError, match=refused):
        load_run(tiny, ["model.head_init=labels"])
    with pytest.raises(ConfigError, match="model.head_init"):
        load_config(tiny, ["model.head_init=words"])


def test_a_frozen_head_stays_as_it_came_while_lora_trains_with_dp() -> None:
    """train.head frozen (auto with the labels head): DP-SGD moves LoRA, the head keeps every bit, and it
    is trainable again afterwards (the resident model is reused by the next call)."""
    from fedslm import tasks

    names = list(NAMES)
    loaded = load_base_model(ModelConfig(name="tiny-llama", compute_dtype="float32"), "classification", tuple(names))
    model = attach_lora(loaded.model, LoRAConfig(r=4, alpha=8), task="classification")
    cfg = DataConfig(num_records=60)
    records = data.client_records(cfg, cache_root(), 0, 2).records[:24]
    examples = data.encode_all(loaded.tokenizer, records, cfg, 96, names, chat=True)
    before = adapter_state(model)
    heads = [k for k in before if "score" in k]
    spec = LocalTraining(steps=3, batch_size=8, learning_rate=0.01, train_head=False, dp=DPSettings(1.0, 1.0, 8 / 24))
    train_local(model, examples, loaded.tokenizer.pad_token_id, spec)
    after = adapter_state(model)
    assert heads and all(torch.equal(before[k], after[k]) for k in heads)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(p.requires_grad for n, p in model.named_parameters() if "modules_to_save" in n)
    tiny = ROOT / "configs" / "classify-tiny.yaml"
    assert tasks.trains_head(load_config(tiny))  # auto: a random head must learn
    assert not tasks.trains_head(load_config(tiny, ["model.name=tiny-llama"]))  # auto: the labels head is kept
    assert tasks.trains_head(load_config(tiny, ["model.name=tiny-llama", "train.head=train"]))
    assert not tasks.trains_head(load_config(tiny, ["train.head=frozen"]))


def test_unknown_label_is_an_error(tiny_peft) -> None:
    cfg = DataConfig()
    with pytest.raises(data.DataError, match="'Cardiology'.*not one of data.labels"):
        data.encode_all(tiny_peft.base.tokenizer, [{"question": "q", "specialty": "Cardiology"}], cfg, 32, ["A", "B"])


@pytest.mark.integration
def test_tiny_classification_federation_aggregates_the_head(tmp_path: Path) -> None:
    from fedslm.simulation.run import simulate
    from safetensors.torch import load_file

    # the guard off: the random tiny model's accuracy on 16 records moves by chance (CI measured 2 of 16
    # right, then 1 of 16), and this test is about the head travelling, not about the guard
    overrides = ["federation.num_rounds=1", "federation.accuracy_drop=1", "federation.divergence_factor=0"]
    cfg = load_config(ROOT / "configs" / "classify-tiny.yaml", overrides)
    rows = simulate(cfg, tmp_path / "run", progress=False)
    assert not rows[1]["diverged"]
    assert {"eval_f1", "eval_precision", "eval_recall"} <= set(rows[-1]) and rows[1]["clients"] == 4
    first = load_file(str(tmp_path / "run" / "adapters" / "round-000" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "run" / "adapters" / "round-001" / "adapter_model.safetensors"))
    heads = [k for k in last if "classifier" in k]
    assert heads and all(not torch.equal(first[k], last[k]) for k in heads)  # the head was trained and averaged
    assert all(torch.isfinite(v).all() for v in last.values())


@pytest.mark.slow
@pytest.mark.integration
def test_real_smollm2_classifier_learns_in_two_rounds(tmp_path: Path) -> None:
    from fedslm.simulation.run import simulate

    overrides = [
        "privacy.mode=none",
        "train.learning_rate=0.005",  # the non-private learning rate (BENCHMARKS.md)
        "federation.num_clients=2",
        "federation.num_rounds=2",
        "federation.backend=inprocess",  # one SmolLM2 in this process, not one more per Ray worker
        "train.local_steps=10",
        "train.batch_size=4",  # batches of 8 learned no better (0.958, loss 0.11) at twice the compute
        "data.num_records=1200",  # as measured
        "data.eval_size=48",
    ]
    rows = simulate(load_config(ROOT / "configs" / "classify.yaml", overrides), tmp_path / "run", progress=False)
    # measured (the class names' head, frozen): accuracy 0.229 -> 0.854 -> 0.958, loss 4.51 -> 0.48 -> 0.15, F1 0.957
    assert rows[0]["eval_accuracy"] < 0.4 and rows[-1]["eval_accuracy"] >= 0.9
    assert rows[-1]["eval_f1"] >= 0.85 and rows[-1]["eval_loss"] < 0.5
