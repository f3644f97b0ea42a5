"""YAML strategy names -> strategy classes, through one small registry.

Unknown or duplicate names raise, listing the valid ones. A strategy's YAML parameters are its
keyword-only constructor arguments; anything else is refused at config load.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedslm.errors import FedslmError

if TYPE_CHECKING:
    from fedslm.config import RunConfig

    from .base import LoRAStrategyMixin


class StrategyConfigError(FedslmError, ValueError):
    """An unknown strategy, an unknown parameter, or a combination the strategy cannot run."""


@dataclass(frozen=True)
class StrategySpec:
    name: str
    cls: type
    description: str
    heterogeneous_ranks: bool  # can aggregate adapters of different ranks
    needs_individual_updates: bool  # robust aggregators: incompatible with secure aggregation

    def params(self) -> dict[str, inspect.Parameter]:
        """The YAML-settable parameters: the keyword-only arguments of the registered class's own
        ``__init__`` (Flower's sampling arguments come from the ``federation`` section)."""
        init = self.cls.__dict__.get("__init__")
        if init is None:
            return {}
        return {p.name: p for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY}


_REGISTRY: dict[str, StrategySpec] = {}


def register(
    name: str,
    *,
    description: str,
    heterogeneous_ranks: bool = False,
    needs_individual_updates: bool = False,
) -> Callable[[type], type]:
    """Class decorator: make a strategy available in YAML as ``strategy: {name: <name>}``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise StrategyConfigError(
                f"strategy name {name!r} registered twice ({_REGISTRY[name].cls.__name__} and {cls.__name__})"
            )
        _REGISTRY[name] = StrategySpec(name, cls, description, heterogeneous_ranks, needs_individual_updates)
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _load_all() -> None:
    from . import _all  # noqa: F401  (imports every strategy module, which registers itself)


def available() -> list[StrategySpec]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get(name: str) -> StrategySpec:
    _load_all()
    if name not in _REGISTRY:
        raise StrategyConfigError(f"unknown strategy {name!r}; valid names are: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def check_params(spec: StrategySpec, params: dict[str, Any]) -> None:
    allowed = spec.params()
    for key in params:
        if key not in allowed:
            raise StrategyConfigError(
                f"strategy.params.{key}: not a parameter of {spec.name!r}; allowed: {sorted(allowed) or 'none'}"
            )


def check_strategy_config(cfg: RunConfig) -> None:
    """Called by :func:`fedslm.server.preflight.validate_run`: name, parameters and run compatibility."""
    try:
        spec = get(cfg.strategy.name)
        check_params(spec, cfg.strategy.params)
        from .checks import check_client_ranks, check_secure_aggregation  # checks imports this module

        check_client_ranks(spec, cfg)
        check_secure_aggregation(spec, cfg)
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
