"""Central evaluation of the global adapter on the held-out test split, and the initial adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedslm import data as data_mod
from fedslm import tasks
from fedslm.adapters import (
    from_arrayrecord,
    load_adapter_state,
    save_adapter_dir,
    to_arrayrecord,
)
from fedslm.config import RunConfig
from fedslm.logs import get_logger
from fedslm.model import cache_root

log = get_logger(__name__)


class CentralEvaluator:
    """Holds the server's copy of base + LoRA and the test split; never sees client data."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        resident = tasks.resident_model(cfg)
        self.model, self.tokenizer = resident.model, resident.base.tokenizer
        self.compute_dtype = resident.base.compute_dtype
        self._initial = dict(resident.initial)  # seeded init (lora.init_seed); B = 0
        self.records = data_mod.test_records(cfg.data, cache_root(cfg.model))
        self.examples = tasks.encode(cfg, self.tokenizer, self.records)
        records = self.records
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
        return tasks.evaluate_records(self.cfg, self.model, self.tokenizer, self.records, self.examples)

    def save(self, arrays: ArrayRecord, out: Path) -> Path:
        """The global adapter in PEFT's format (``PeftModel.from_pretrained(base, out)`` loads it)."""
        return save_adapter_dir(self.model, self._load(arrays), out)
