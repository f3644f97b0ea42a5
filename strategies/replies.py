"""Train replies as plain numpy adapters and weights, for strategies that aggregate their own way
(``fedex-lora``, ``flora``, ``hetlora``): Flower's checks and logging, then the maths."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedslm.protocol import METRICS

from .aggregation import Tensors


def unpack(strategy: Any, replies: Iterable[Message]) -> tuple[list[Message], list[Tensors], list[float]]:
    """(valid replies, their adapters, their ``weighted_by_key`` weights) of a FedAvg subclass.

    Flower's ``_check_and_log_replies`` drops error replies and checks that all carry one array
    record with the same keys (shapes may differ: heterogeneous ranks)."""
    valid, _ = strategy._check_and_log_replies(replies, is_train=True)
    updates = [{k: v.numpy() for k, v in msg.content[strategy.arrayrecord_key].items()} for msg in valid]
    weights = [float(msg.content[METRICS][strategy.weighted_by_key]) for msg in valid]
    return valid, updates, weights


def pack(strategy: Any, valid: list[Message], tensors: Tensors) -> tuple[ArrayRecord, MetricRecord | None]:
    """The aggregate as an ArrayRecord, and the replies' metrics aggregated as FedAvg does."""
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()})
    return arrays, strategy.train_metrics_aggr_fn([m.content for m in valid], strategy.weighted_by_key)


def as_numpy(arrays: ArrayRecord) -> Tensors:
    return {k: v.numpy() for k, v in arrays.items()}


class OwnAggregation:
    """Mixin for strategies whose maths replaces FedAvg's (put before ``LoRAStrategyMixin``):
    remembers the global adapter each round and turns valid replies into :meth:`combine`'s tensors.
    Register such a strategy with ``central_dp=False``: central DP's sensitivity bound does not cover
    products or norm weights."""

    _global: Tensors

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
        self._global = as_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, updates, weights = unpack(self, replies)
        if not valid:
            return None, None
        return pack(self, valid, self.combine(updates, weights))

    def combine(self, updates: list[Tensors], weights: list[float]) -> Tensors:
        raise NotImplementedError
