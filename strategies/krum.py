"""Krum (Blanchard et al., 2017): the one update closest to its n-f-2 nearest neighbours. Like all
robust aggregators it needs each client's update, so it cannot run under secure aggregation."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Krum

from .base import LoRAStrategyMixin
from .checks import check_malicious
from .spec import register


@register(
    "krum",
    description="the one update closest to its n-f-2 neighbours (Blanchard et al. 2017)",
    needs_individual_updates=True,
)
class KrumLoRA(LoRAStrategyMixin, Krum):
    def __init__(self, *, num_malicious_nodes: int = 1, **common: Any) -> None:
        check_malicious(num_malicious_nodes)
        super().__init__(num_malicious_nodes=num_malicious_nodes, **common)
