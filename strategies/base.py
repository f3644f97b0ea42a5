"""What every fedslm strategy adds to a Flower Message-API strategy.

- seeded, reproducible client sampling (Flower's default uses the global ``random`` module);
- ``bind_run``: the strategy sees the validated run config once (e.g. LoRA rank, privacy);
- ``client_config``: extra keys a strategy sends to clients (``proximal-mu``, ``freeze-a`` ...);
- ``state_dict`` / ``load_state_dict``: strategy state for checkpoints (server optimizer moments).

The mixin comes first in the MRO: ``class FedAvgLoRA(LoRAStrategyMixin, FedAvg)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from slm.logs import get_logger

if TYPE_CHECKING:
    from slm.config import RunConfig

log = get_logger(__name__)


class LoRAStrategyMixin:
    """Seeded sampling, run binding and checkpointable state for a Flower strategy."""

    run_cfg: RunConfig
    fraction_train: float
    min_train_nodes: int
    min_available_nodes: int
    arrayrecord_key: str
    configrecord_key: str

    def bind_run(self, cfg: RunConfig) -> None:
        self.run_cfg = cfg
        self._rng = random.Random(cfg.federation.seed)

    @classmethod
    def check_run_config(cls, cfg: RunConfig) -> None:
        """Refuse run configs this strategy cannot serve (raise ``StrategyConfigError``)."""

    # -- what travels to clients -------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Any]:
        """Strategy-specific keys added to each train message's config."""
        return {}

    def sample(self, grid: Grid) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        n = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        n = min(n, len(nodes))
        return sorted(self._rng.sample(nodes, n))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids = self.sample(grid)
        log.info("configure_train: sampled %d of %d nodes", len(node_ids), len(list(grid.get_node_ids())))
        config["server-round"] = server_round
        for key, value in self.client_config(server_round).items():
            config[key] = value
        return [
            Message(
                content=RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}),
                message_type=MessageType.TRAIN,
                dst_node_id=node_id,
            )
            for node_id in node_ids
        ]

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able and tensor state needed to resume (override when the strategy has state)."""
        return {"rng": _rng_state_to_json(self._rng.getstate())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(_rng_state_from_json(state["rng"]))

    def summary(self) -> None:
        log.log(INFO, "Strategy %s (seeded sampling, seed=%d)", type(self).__name__, self.run_cfg.federation.seed)
        super().summary()  # type: ignore[misc]


def _rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
