"""YAML strategy names -> strategy classes, through one small registry.

The entries (specs, the ``register`` decorator) live in ``spec.py``, which strategy modules import;
this module loads every strategy module before it answers, and builds the configured one.

Unknown or duplicate names raise, listing the valid ones. A strategy's YAML parameters are its
keyword-only constructor arguments; anything else is refused at config load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .spec import StrategyConfigError, StrategySpec, check_params, register, registered, registered_specs

if TYPE_CHECKING:
    from fedslm.config import RunConfig

    from .base import LoRAStrategyMixin

__all__ = ["StrategyConfigError", "StrategySpec", "available", "build", "check_params", "get", "register"]


def _load_all() -> None:
    from . import _all  # noqa: F401  (imports every strategy module, which registers itself)


def available() -> list[StrategySpec]:
    _load_all()
    return registered_specs()


def get(name: str) -> StrategySpec:
    _load_all()
    return registered(name)


def check_strategy_config(cfg: RunConfig) -> None:
    """Called by :func:`fedslm.server.preflight.validate_run`: name, parameters and run compatibility."""
    try:
        spec = get(cfg.strategy.name)
        check_params(spec, cfg.strategy.params)
        from .checks import check_central_dp, check_client_ranks, check_secure_aggregation

        check_client_ranks(spec, cfg)
        check_secure_aggregation(spec, cfg)
        check_central_dp(spec, cfg)
        check = getattr(spec.cls, "check_run_config", None)
        if check is not None:
            check(cfg)
    except StrategyConfigError as e:
        from fedslm.config import ConfigError

        raise ConfigError(f"strategy: {e}") from None


def build(cfg: RunConfig) -> LoRAStrategyMixin:
    """Instantiate the configured strategy with the federation's sampling settings."""
    spec = get(cfg.strategy.name)
    check_params(spec, cfg.strategy.params)
    fed = cfg.federation
    strategy = spec.cls(
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=fed.min_train_clients,
        min_evaluate_nodes=0,
        min_available_nodes=fed.min_train_clients,
        **cfg.strategy.params,
    )
    strategy.bind_run(cfg)
    if cfg.privacy.central:
        from .central_dp import CentralDP

        p = cfg.privacy
        return CentralDP(  # type: ignore[return-value]
            strategy,
            noise_multiplier=p.central_noise_multiplier,
            clipping_norm=p.central_clipping_norm,
            clients_per_round=fed.clients_per_round,
            num_clients=fed.num_clients,
            delta=p.central_delta,
            seed=cfg.seed,
        )
    return strategy
