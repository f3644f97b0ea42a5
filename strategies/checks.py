"""Parameter checks shared by several strategies (typed errors naming the value)."""

from __future__ import annotations

from .registry import StrategyConfigError


def check_server_optimizer(eta: float, tau: float, beta_1: float = 0.9, beta_2: float = 0.99) -> None:
    if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
        raise StrategyConfigError(
            f"server optimizer needs eta > 0, tau > 0, betas in [0, 1); got eta={eta}, tau={tau},"
            f" beta_1={beta_1}, beta_2={beta_2}"
        )


def check_malicious(f: int) -> None:
    if f < 0:
        raise StrategyConfigError(f"strategy.params.num_malicious_nodes must be >= 0, got {f}")
