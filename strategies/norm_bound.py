"""Norm bounding around any strategy (Sun et al., 2019, "Can you really backdoor federated
learning?"): each client's update ``w_i - w`` is clipped to L2 norm ``max_norm`` (over all its
adapter tensors) before the inner strategy aggregates. YAML::

    strategy:
      name: norm-bound
      params: {inner: fedavg, inner_params: {}, max_norm: 1.0}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from fedslm.logs import get_logger

from .spec import StrategyConfigError, check_params, register, registered
from .wrapper import WrapperStrategy

log = get_logger(__name__)


@register(
    "norm-bound",
    description="clip each client's update to max_norm, then run the inner strategy",
    needs_individual_updates=True,
)
class NormBound(WrapperStrategy):
    def __init__(
        self, *, inner: str = "fedavg", inner_params: dict[str, Any] | None = None, max_norm: float = 1.0, **common: Any
    ) -> None:
        if max_norm <= 0:
            raise StrategyConfigError(f"strategy.params.max_norm must be > 0, got {max_norm}")
        if inner == "norm-bound":
            raise StrategyConfigError("strategy.params.inner: norm-bound cannot wrap itself")
        super().__init__(registered(inner).cls(**common, **(inner_params or {})))
        self.max_norm = max_norm
        self.clipped = 0  # updates clipped so far

    @classmethod
    def check_run_config(cls, cfg: Any) -> None:
        params = cfg.strategy.params
        spec = registered(str(params.get("inner", "fedavg")))
        check_params(spec, dict(params.get("inner_params") or {}))

    def bind_run(self, cfg: Any) -> None:
        self.inner.bind_run(cfg)

    def summary(self) -> None:
        log.info("Norm bound %.3g around %s", self.max_norm, type(self.inner).__name__)
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        bounded, norms = self.clip_replies(replies, self.max_norm)
        for msg, norm in zip(bounded, norms, strict=True):
            if norm > self.max_norm:
                self.clipped += 1
                log.info(
                    "round %d: node %s update norm %.3g clipped to %.3g",
                    server_round,
                    msg.metadata.src_node_id,
                    norm,
                    self.max_norm,
                )
        return self.inner.aggregate_train(server_round, bounded)
