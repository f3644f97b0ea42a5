"""FedAvgM (Hsu et al., 2019): server momentum on the averaged adapter update."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvgM

from .base import LoRAStrategyMixin
from .spec import StrategyConfigError, register


@register("fedavgm", description="FedAvg with server momentum on the adapter update (Hsu et al. 2019)")
class FedAvgMLoRA(LoRAStrategyMixin, FedAvgM):
    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9, **common: Any) -> None:
        if server_learning_rate <= 0 or not 0 <= server_momentum < 1:
            raise StrategyConfigError(
                f"fedavgm needs server_learning_rate > 0 and server_momentum in [0, 1), got "
                f"{server_learning_rate}, {server_momentum}"
            )
        super().__init__(server_learning_rate=server_learning_rate, server_momentum=server_momentum, **common)
