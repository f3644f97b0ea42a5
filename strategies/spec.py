"""The registry's entries: one :class:`StrategySpec` per YAML name, added by the ``register`` decorator.

Strategy modules import this module to register themselves; it imports none of them (so there is no
import cycle). ``registry.py`` loads every strategy module and is what the rest of the code asks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedslm.errors import FedslmError


class StrategyConfigError(FedslmError, ValueError):
    """An unknown strategy, an unknown parameter, or a combination the strategy cannot run."""


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy and what it can run with (its capability flags, checked by
    :mod:`strategies.checks` for every run)."""

    name: str
    cls: type[Any]
    description: str
    heterogeneous_ranks: bool = False  # mixed ranks: can aggregate adapters of different ranks
    needs_individual_updates: bool = False  # robust aggregators: incompatible with secure aggregation
    # secure aggregation: the aggregate is the example-weighted mean of the uploads, which is all that
    # SecAgg+ reveals, and the SecAgg+ path (plain weighted averaging) implements it
    secure_aggregation: bool = False
    # central DP: the aggregate is a weighted mean of clipped updates, the sensitivity central DP's
    # noise is calibrated for (products B_i A_i, stacks and norm weights are not)
    central_dp: bool = True

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
    secure_aggregation: bool = False,
    central_dp: bool = True,
) -> Callable[[type], type]:
    """Class decorator: make a strategy available in YAML as ``strategy: {name: <name>}``, with its
    capability flags (see :class:`StrategySpec`)."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise StrategyConfigError(
                f"strategy name {name!r} registered twice ({_REGISTRY[name].cls.__name__} and {cls.__name__})"
            )
        _REGISTRY[name] = StrategySpec(
            name,
            cls,
            description,
            heterogeneous_ranks=heterogeneous_ranks,
            needs_individual_updates=needs_individual_updates,
            secure_aggregation=secure_aggregation,
            central_dp=central_dp,
        )
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def registered(name: str) -> StrategySpec:
    """The spec registered as ``name`` so far (``registry.get`` first loads every strategy module)."""
    if name not in _REGISTRY:
        raise StrategyConfigError(f"unknown strategy {name!r}; valid names are: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_specs() -> list[StrategySpec]:
    """Every spec registered so far, by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def check_params(spec: StrategySpec, params: dict[str, Any]) -> None:
    allowed = spec.params()
    for key in params:
        if key not in allowed:
            raise StrategyConfigError(
                f"strategy.params.{key}: not a parameter of {spec.name!r}; allowed: {sorted(allowed) or 'none'}"
            )
