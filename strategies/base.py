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

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedslm.grid import GridView
from fedslm.logs import get_logger

if TYPE_CHECKING:
    from fedslm.config import RunConfig

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

    def sample(self, grid: Grid | GridView) -> list[int]:
        # the federation's grid view lists nodes in client-id order and hides clients whose privacy
        # budget is spent; the round's size stays a fraction of ALL nodes (what DP was calibrated for)
        view = GridView.of(grid)  # a plain grid: its nodes in node-id order
        nodes = view.get_node_ids()
        population = len(view.all_node_ids())
        n = max(int(population * self.fraction_train), self.min_train_nodes)
        n = min(n, len(nodes))
        picked = set(self._rng.sample(range(len(nodes)), n))
        return [node for i, node in enumerate(nodes) if i in picked]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The Flower class's own ``configure_train`` (FedOpt records the current arrays, FedProx sends
        ``proximal-mu`` ...), on exactly the seeded sample of nodes, in node order."""
        view = GridView.of(grid)
        node_ids = self.sample(view)
        log.info("configure_train: sampled %d of %d nodes", len(node_ids), len(view.get_node_ids()))
        for key, value in self.client_config(server_round).items():
            config[key] = value
        saved = (self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        self.fraction_train, self.min_train_nodes, self.min_available_nodes = 1.0, len(node_ids), len(node_ids)
        try:
            messages = super().configure_train(server_round, arrays, config, view.only(node_ids))  # type: ignore[misc]
        finally:
            self.fraction_train, self.min_train_nodes, self.min_available_nodes = saved
        return sorted(messages, key=lambda m: m.metadata.dst_node_id)

    if TYPE_CHECKING:  # provided by the Flower strategy the mixin is combined with

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    # -- checkpointing ----------------------------------------------------------------------
    # Flower's server-optimizer state: FedOpt's moments (dicts of arrays), FedAvgM's momentum (list)
    _ARRAY_STATE = ("m_t", "v_t", "momentum_vector")

    def state_dict(self) -> dict[str, Any]:
        """The state needed to resume: JSON values and numpy arrays (checkpoints store the arrays
        as safetensors). Override, calling super(), when a strategy keeps more."""
        state: dict[str, Any] = {"rng": _rng_state_to_json(self._rng.getstate())}
        for attr in self._ARRAY_STATE:
            value = getattr(self, attr, None)
            if value is not None:
                state[attr] = {"list": list(value)} if isinstance(value, list) else {"dict": dict(value)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(_rng_state_from_json(state["rng"]))
        for attr in self._ARRAY_STATE:
            if attr in state:
                value = state[attr]
                setattr(self, attr, list(value["list"]) if "list" in value else dict(value["dict"]))

    def summary(self) -> None:
        log.log(INFO, "Strategy %s (seeded sampling, seed=%d)", type(self).__name__, self.run_cfg.federation.seed)
        super().summary()  # type: ignore[misc]


def _rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
