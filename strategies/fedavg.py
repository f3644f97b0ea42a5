"""FedAvg (McMahan et al., 2017): the example-weighted mean of the clients' adapter tensors.

Averaging A and B separately is not the mean of the products B_i A_i; see ``fedex-lora`` for the
exact alternative.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg

from .base import LoRAStrategyMixin
from .spec import register


@register(
    "fedavg", description="example-weighted mean of adapter tensors (McMahan et al., 2017)", secure_aggregation=True
)
class FedAvgLoRA(LoRAStrategyMixin, FedAvg):
    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
