"""Coordinate-wise median of the updates (Yin et al., 2018)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedMedian

from .base import LoRAStrategyMixin
from .spec import register


@register(
    "median", description="coordinate-wise median of the updates (Yin et al. 2018)", needs_individual_updates=True
)
class MedianLoRA(LoRAStrategyMixin, FedMedian):
    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
