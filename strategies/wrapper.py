"""Base of the strategies that wrap another one (central DP, norm bounding): delegation, the
current global adapter, and clipping each client's update by key before the inner aggregates."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslm.protocol import ARRAYS, METRICS
from fedslm.records import arrays_of, metrics_of

from .aggregation import clip_update


class WrapperStrategy(Strategy):
    """Delegates to ``self.inner``; subclasses override ``aggregate_train`` (and ``summary``)."""

    inner: Any

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._current: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:  # run_cfg, client_config, state_dict ... of the inner
        return getattr(self.__dict__["inner"], name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def clip_replies(
        self, replies: Iterable[Message], max_norm: float, metrics: dict[str, Any] | None = None
    ) -> tuple[list[Message], list[float]]:
        """Each reply with its update ``w_i - w`` clipped to ``max_norm`` (metrics updated by ``metrics``)."""
        out, norms = [], []
        for msg in replies:
            update = {k: v.numpy() for k, v in arrays_of(msg.content).items()}
            clipped, norm = clip_update(update, {k: self._current[k] for k in update}, max_norm)
            norms.append(norm)
            content = RecordDict(
                {
                    ARRAYS: ArrayRecord({k: Array(v) for k, v in clipped.items()}),
                    METRICS: MetricRecord({**dict(metrics_of(msg.content)), **(metrics or {})}),
                }
            )
            out.append(make_message(msg.metadata, content=content))
        return out, norms

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
