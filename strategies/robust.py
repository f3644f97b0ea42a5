"""Robust aggregation against poisoned or broken updates (they need each client's update, so they
cannot run under secure aggregation): Krum / Multi-Krum (Blanchard et al., 2017), coordinate-wise
median (Yin et al., 2018) and trimmed mean (Yin et al., 2018), on Flower's implementations."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from .base import LoRAStrategyMixin
from .registry import StrategyConfigError, register


def _check_f(f: int) -> None:
    if f < 0:
        raise StrategyConfigError(f"strategy.params.num_malicious_nodes must be >= 0, got {f}")


@register(
    "krum",
    description="the one update closest to its n-f-2 neighbours (Blanchard et al. 2017)",
    needs_individual_updates=True,
)
class KrumLoRA(LoRAStrategyMixin, Krum):
    def __init__(self, *, num_malicious_nodes: int = 1, **common: Any) -> None:
        _check_f(num_malicious_nodes)
        super().__init__(num_malicious_nodes=num_malicious_nodes, **common)


@register(
    "multikrum",
    description="mean of the m updates with the best Krum scores (Blanchard et al. 2017)",
    needs_individual_updates=True,
)
class MultiKrumLoRA(LoRAStrategyMixin, MultiKrum):
    def __init__(self, *, num_malicious_nodes: int = 1, num_nodes_to_select: int = 3, **common: Any) -> None:
        _check_f(num_malicious_nodes)
        if num_nodes_to_select < 1:
            raise StrategyConfigError(f"strategy.params.num_nodes_to_select must be >= 1, got {num_nodes_to_select}")
        super().__init__(num_malicious_nodes=num_malicious_nodes, num_nodes_to_select=num_nodes_to_select, **common)


@register(
    "median", description="coordinate-wise median of the updates (Yin et al. 2018)", needs_individual_updates=True
)
class MedianLoRA(LoRAStrategyMixin, FedMedian):
    def __init__(self, **common: Any) -> None:
        super().__init__(**common)


@register(
    "trimmed-mean",
    description="coordinate-wise mean after trimming a beta fraction at each end (Yin et al. 2018)",
    needs_individual_updates=True,
)
class TrimmedMeanLoRA(LoRAStrategyMixin, FedTrimmedAvg):
    def __init__(self, *, beta: float = 0.2, **common: Any) -> None:
        if not 0 <= beta < 0.5:
            raise StrategyConfigError(f"strategy.params.beta must be in [0, 0.5), got {beta}")
        super().__init__(beta=beta, **common)
