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

from flwr.app import ArrayRecord, ConfigRecord, Message
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
        # the round's size is a fraction of ALL registered nodes (what the DP noise was calibrated
        # for), also when the server hides nodes whose privacy budget is spent
        population = len(grid.all_node_ids()) if hasattr(grid, "all_node_ids") else len(nodes)
        n = max(int(population * self.fraction_train), self.min_train_nodes)
        n = min(n, len(nodes))
        return sorted(self._rng.sample(nodes, n))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The Flower class's own ``configure_train`` (FedOpt records the current arrays, FedProx sends
        ``proximal-mu`` ...), on exactly the seeded sample of nodes, in node order."""
        node_ids = self.sample(grid)
        log.info("configure_train: sampled %d of %d nodes", len(node_ids), len(list(grid.get_node_ids())))
        for key, value in self.client_config(server_round).items():
            config[key] = value
        saved = (self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        self.fraction_train, self.min_train_nodes, self.min_available_nodes = 1.0, len(node_ids), len(node_ids)
        try:
            messages = super().configure_train(server_round, arrays, config, _SampledGrid(grid, node_ids))  # type: ignore[misc]
        finally:
            self.fraction_train, self.min_train_nodes, self.min_available_nodes = saved
        return sorted(messages, key=lambda m: m.metadata.dst_node_id)

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able and tensor state needed to resume (override when the strategy has state)."""
        return {"rng": _rng_state_to_json(self._rng.getstate())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(_rng_state_from_json(state["rng"]))

    def summary(self) -> None:
        log.log(INFO, "Strategy %s (seeded sampling, seed=%d)", type(self).__name__, self.run_cfg.federation.seed)
        super().summary()  # type: ignore[misc]


class _SampledGrid:
    """A view of a Grid that shows only the sampled nodes (Flower's sampler then takes them all)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
