"""FedProx (Li et al., 2020): FedAvg aggregation; each client adds (mu/2)||w - w_global||^2 over its
LoRA parameters to the local loss (Flower's FedProx sends ``proximal-mu``; under DP the proximal
gradient is added after clipping and noise, since it does not depend on data)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedProx

from .base import LoRAStrategyMixin
from .spec import StrategyConfigError, register


@register(  # only the local loss differs from FedAvg: its aggregate is SecAgg+'s weighted mean
    "fedprox",
    description="FedAvg + proximal term mu/2 |w - w_global|^2 on each client's LoRA (Li et al. 2020)",
    secure_aggregation=True,
)
class FedProxLoRA(LoRAStrategyMixin, FedProx):
    def __init__(self, *, proximal_mu: float = 0.01, **common: Any) -> None:
        if proximal_mu < 0:
            raise StrategyConfigError(f"strategy.params.proximal_mu must be >= 0, got {proximal_mu}")
        super().__init__(proximal_mu=proximal_mu, **common)
