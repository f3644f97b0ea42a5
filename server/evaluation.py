"""Central evaluation of the global adapter on the held-out test split, and the initial adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from slm import data as data_mod
from slm.adapters import (
    PEFT_CACHE,
    adapter_state,
    from_arrayrecord,
    load_adapter_state,
    save_adapter_dir,
    to_arrayrecord,
)
from slm.config import RunConfig
from slm.logs import get_logger
from slm.model import cache_root
from slm.training import evaluate

log = get_logger(__name__)


class CentralEvaluator:
    """Holds the server's copy of base + LoRA and the test split; never sees client data."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        resident = PEFT_CACHE.get(cfg.model, cfg.lora)
        self.model, self.tokenizer = resident.model, resident.base.tokenizer
        self._initial = adapter_state(self.model)  # seeded init (lora.init_seed); B = 0
        d = cfg.data
        records = data_mod.test_records(d, cache_root(cfg.model))
        self.examples = data_mod.encode_all(self.tokenizer, records, d, cfg.model.max_length)
        self.prompts = [data_mod.prompt_text(self.tokenizer, str(r[d.prompt_column]), d.system_prompt) for r in records]
        self.answers = [str(r[d.response_column]) for r in records]
        log.info("Central evaluation on %d held-out records", len(records))

    def initial_arrays(self) -> ArrayRecord:
        return to_arrayrecord(self._initial)

    def _load(self, arrays: ArrayRecord) -> dict[str, Any]:
        state = dict(self._initial)
        state.update(from_arrayrecord(arrays))
        load_adapter_state(self.model, state)
        return state

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        self._load(arrays)
        return evaluate(
            self.model,
            self.tokenizer,
            self.examples,
            self.prompts,
            self.answers,
            batch_size=self.cfg.eval.batch_size,
            max_new_tokens=self.cfg.eval.max_new_tokens,
        )

    def save(self, arrays: ArrayRecord, out: Path) -> Path:
        """The global adapter in PEFT's format (``PeftModel.from_pretrained(base, out)`` loads it)."""
        return save_adapter_dir(self.model, self._load(arrays), out)
