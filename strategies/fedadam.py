"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): Adam on the server over the
averaged adapter delta. Defaults: eta 1e-2, beta_1 0.9, beta_2 0.99, tau 1e-3 (suited to small LoRA deltas)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam

from .base import LoRAStrategyMixin
from .checks import check_server_optimizer
from .spec import register


@register("fedadam", description="server-side Adam on the averaged adapter delta (Reddi et al. 2021)")
class FedAdamLoRA(LoRAStrategyMixin, FedAdam):
    def __init__(
        self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, **common: Any
    ) -> None:
        check_server_optimizer(eta, tau, beta_1, beta_2)
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, **common)
