"""Tiny random models built from each family's config (no hub): fast tests of the real code paths.

They use SmolLM2's tokenizer (vocabulary 49,152, with a chat template), so data handling is the same
as for the real model. Weights are seeded, so a tiny model is identical on every machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .logs import get_logger

log = get_logger(__name__)

_COMMON = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
_DECODER = {
    **_COMMON,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

# family -> (transformers config class name, model class name, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, "pad_token_id": 0}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 16}),
    # encoders (classification only)
    "bert": ("BertConfig", "BertModel", {**_COMMON, "num_attention_heads": 4, "max_position_embeddings": 512}),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertModel",
        {
            "vocab_size": 49152,
            "dim": 64,
            "hidden_dim": 128,
            "n_layers": 2,
            "n_heads": 4,
            "max_position_embeddings": 512,
        },
    ),
}
DECODERS = ("llama", "qwen2", "mistral", "phi3", "gemma2")


def build_tiny_model_dir(family: str, out: Path, tokenizer_dir: Path) -> Path:
    """Write (once) a seeded random model of ``family`` with the tokenizer in ``tokenizer_dir`` to ``out``."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from .fs import atomic_dir
    from .modeldir import is_complete

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(FAMILIES)}")
    if is_complete(out):
        return out
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config_name, model_name, kwargs = FAMILIES[family]
    if family in DECODERS:
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    else:
        ids = {"pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    config = getattr(transformers, config_name)(**kwargs, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(config)
    with atomic_dir(out, is_complete) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / ".complete").write_text(str(time.time()))
    log.info("Built tiny %s model in %s", family, out)
    return out
