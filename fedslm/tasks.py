"""The two tasks, behind one interface used by clients and the server.

- ``causal-lm``: instruction tuning; loss on answer tokens; evaluation by loss, perplexity and
  exact match of the greedy answer.
- ``classification``: a sequence-classification head (trained and aggregated with the adapter via
  PEFT's ``modules_to_save``); evaluation by loss, accuracy and macro precision/recall/F1.
"""

from __future__ import annotations

from typing import Any

from . import data as data_mod
from .adapters import PEFT_CACHE, ResidentPeft
from .config import RunConfig
from .model import cache_root
from .modelinfo import head_init, model_info
from .training import evaluate, evaluate_classification


def labels(cfg: RunConfig) -> list[str] | None:
    """Class names of a classification run (None for causal-lm); identical on every node.

    ``data.labels`` fixes them; otherwise they are the sorted values of ``data.label_column`` over
    the whole configured source (available to every simulated node). A real node with its own file
    must be given ``data.labels``, or its classes could disagree with the others'.
    """
    if cfg.task != "classification":
        return None
    if cfg.data.labels:
        return list(cfg.data.labels)
    return data_mod.label_names(cfg.data, data_mod.load_records(cfg.data, cache_root(cfg.model)))


def chat_prompt(cfg: RunConfig) -> bool:
    """Whether a classification run reads the chat prompt (``model.head_init`` resolves to labels)."""
    return cfg.task == "classification" and head_init(model_info(cfg.model), cfg.model) == "labels"


def trains_head(cfg: RunConfig) -> bool:
    """Whether local training moves the classification head (``train.head``, auto resolved)."""
    if cfg.train.head == "auto":
        return not chat_prompt(cfg)
    return cfg.train.head == "train"


def resident_model(cfg: RunConfig, rank: int | None = None) -> ResidentPeft:
    return PEFT_CACHE.get(cfg.model, cfg.lora, cfg.task, rank, labels=tuple(labels(cfg) or ()))


def encode(cfg: RunConfig, tokenizer: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    d = cfg.data
    return data_mod.encode_all(tokenizer, records, d, cfg.model.max_length, labels(cfg), chat=chat_prompt(cfg))


def evaluate_records(
    cfg: RunConfig, model: Any, tokenizer: Any, records: list[dict[str, Any]], examples: list[dict[str, Any]]
) -> dict[str, float]:
    if cfg.task == "classification":
        names = labels(cfg) or []
        return evaluate_classification(
            model, examples, tokenizer.pad_token_id, len(names), batch_size=cfg.eval.batch_size
        )
    d = cfg.data
    prompts = [data_mod.prompt_text(tokenizer, str(r[d.prompt_column]), d.system_prompt) for r in records]
    answers = [str(r[d.response_column]) for r in records]
    return evaluate(
        model,
        tokenizer,
        examples,
        prompts,
        answers,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
