"""FedAdagrad (Reddi et al., 2021): Adagrad on the server over the averaged adapter delta."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdagrad

from .base import LoRAStrategyMixin
from .checks import check_server_optimizer
from .spec import register


@register("fedadagrad", description="server-side Adagrad on the averaged adapter delta (Reddi et al. 2021)")
class FedAdagradLoRA(LoRAStrategyMixin, FedAdagrad):
    def __init__(self, *, eta: float = 1e-2, tau: float = 1e-3, **common: Any) -> None:
        check_server_optimizer(eta, tau)
        super().__init__(eta=eta, tau=tau, **common)
