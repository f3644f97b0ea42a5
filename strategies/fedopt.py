"""Adaptive server optimizers on the aggregated adapter delta (Reddi et al., 2021, "Adaptive
Federated Optimization"): FedAdam, FedYogi, FedAdagrad. Defaults: server learning rate eta 1e-2,
beta_1 0.9, beta_2 0.99, adaptivity tau 1e-3 (the paper's grid, suited to small LoRA deltas)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi

from .base import LoRAStrategyMixin
from .registry import StrategyConfigError, register


def _check(eta: float, tau: float, beta_1: float = 0.9, beta_2: float = 0.99) -> None:
    if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
        raise StrategyConfigError(
            f"server optimizer needs eta > 0, tau > 0, betas in [0, 1); got eta={eta}, tau={tau},"
            f" beta_1={beta_1}, beta_2={beta_2}"
        )


@register("fedadam", description="server-side Adam on the averaged adapter delta (Reddi et al. 2021)")
class FedAdamLoRA(LoRAStrategyMixin, FedAdam):
    def __init__(
        self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, **common: Any
    ) -> None:
        _check(eta, tau, beta_1, beta_2)
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, **common)


@register("fedyogi", description="server-side Yogi on the averaged adapter delta (Reddi et al. 2021)")
class FedYogiLoRA(LoRAStrategyMixin, FedYogi):
    def __init__(
        self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, **common: Any
    ) -> None:
        _check(eta, tau, beta_1, beta_2)
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, **common)


@register("fedadagrad", description="server-side Adagrad on the averaged adapter delta (Reddi et al. 2021)")
class FedAdagradLoRA(LoRAStrategyMixin, FedAdagrad):
    def __init__(self, *, eta: float = 1e-2, tau: float = 1e-3, **common: Any) -> None:
        _check(eta, tau)
        super().__init__(eta=eta, tau=tau, **common)
