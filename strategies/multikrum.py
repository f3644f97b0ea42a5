"""Multi-Krum (Blanchard et al., 2017): the mean of the m updates with the best Krum scores."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import MultiKrum

from .base import LoRAStrategyMixin
from .checks import check_malicious
from .spec import StrategyConfigError, register


@register(
    "multikrum",
    description="mean of the m updates with the best Krum scores (Blanchard et al. 2017)",
    needs_individual_updates=True,
)
class MultiKrumLoRA(LoRAStrategyMixin, MultiKrum):
    def __init__(self, *, num_malicious_nodes: int = 1, num_nodes_to_select: int = 3, **common: Any) -> None:
        check_malicious(num_malicious_nodes)
        if num_nodes_to_select < 1:
            raise StrategyConfigError(f"strategy.params.num_nodes_to_select must be >= 1, got {num_nodes_to_select}")
        super().__init__(num_malicious_nodes=num_malicious_nodes, num_nodes_to_select=num_nodes_to_select, **common)
