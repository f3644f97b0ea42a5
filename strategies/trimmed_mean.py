"""Coordinate-wise trimmed mean (Yin et al., 2018): drop a beta fraction at each end."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedTrimmedAvg

from .base import LoRAStrategyMixin
from .spec import StrategyConfigError, register


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
