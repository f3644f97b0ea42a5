"""YAML strategy names -> strategy classes, through one small registry.

The entries (specs, the ``register`` decorator) live in ``spec.py``, which strategy modules import;
this module loads every strategy module before it answers, and builds the configured one.

Unknown or duplicate names raise, listing the valid ones. A strategy's YAML parameters are its
keyword-only constructor arguments; anything else is refused at config load.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
    from fedslm.config import ConfigError

    try:
        spec = get(cfg.strategy.name)
        check_params(spec, cfg.strategy.params)
        check_param_types(spec, cfg.strategy.params)
        from .checks import check_central_dp, check_client_ranks, check_secure_aggregation

        check_client_ranks(spec, cfg)
        check_secure_aggregation(spec, cfg)
        check_central_dp(spec, cfg)
        check = getattr(spec.cls, "check_run_config", None)
        if check is not None:
            check(cfg)
        with _flower_logs_quiet():  # built only to be checked; the run builds (and logs) its own
            build(cfg)  # its constructor checks the values: ranges, and what they must be together
    except StrategyConfigError as e:
        raise ConfigError(f"strategy: {e}") from None
    except (TypeError, ValueError) as e:  # a check of Flower's, or of a nested strategy's parameters
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"strategy {cfg.strategy.name!r} with params {cfg.strategy.params}: {e}") from None


@contextlib.contextmanager
def _flower_logs_quiet() -> Iterator[None]:
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_param_types(spec: StrategySpec, params: dict[str, Any]) -> None:
    """Each parameter's value against the type its constructor declares (``eta: float`` refuses
    ``"0.1"`` and ``true``): a :class:`fedslm.config.ConfigError` naming the key and the type."""
    import typing

    from fedslm.config import check_value

    hints = typing.get_type_hints(spec.cls.__init__)
    for key, value in params.items():
        check_value(value, hints.get(key, Any), f"strategy.params.{key}")


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
            client_canaries=cfg.audit.client_canaries if cfg.audit.enabled else 0,
        )
    return strategy
