"""Parameter checks shared by several strategies (typed errors naming the value)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import StrategyConfigError

if TYPE_CHECKING:
    from slm.config import RunConfig

    from .registry import StrategySpec


def check_server_optimizer(eta: float, tau: float, beta_1: float = 0.9, beta_2: float = 0.99) -> None:
    if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
        raise StrategyConfigError(
            f"server optimizer needs eta > 0, tau > 0, betas in [0, 1); got eta={eta}, tau={tau},"
            f" beta_1={beta_1}, beta_2={beta_2}"
        )


def check_malicious(f: int) -> None:
    if f < 0:
        raise StrategyConfigError(f"strategy.params.num_malicious_nodes must be >= 0, got {f}")


def check_client_ranks(spec: StrategySpec, cfg: RunConfig) -> None:
    """A strategy without ``heterogeneous_ranks`` needs every client profile at rank ``lora.r``;
    central DP needs it for any strategy (it clips ``update - global`` tensor by tensor)."""
    from slm.config import profile_ranks

    ranks = profile_ranks(cfg)
    if all(r == cfg.lora.r for r in ranks.values()):
        return
    if not spec.heterogeneous_ranks:
        from .registry import available

        flexible = [s.name for s in available() if s.heterogeneous_ranks]
        raise StrategyConfigError(
            f"{spec.name!r} aggregates adapters of one rank, lora.r={cfg.lora.r}, but clients.profiles give ranks"
            f" {ranks}; use a strategy for mixed ranks ({', '.join(flexible)}) or give every profile rank {cfg.lora.r}"
        )
    if cfg.privacy.central:
        raise StrategyConfigError(
            f"privacy.mode {cfg.privacy.mode!r} clips each update against the global adapter, which needs every"
            f" client at rank lora.r={cfg.lora.r}, but clients.profiles give ranks {ranks}"
        )
    if cfg.communication.compresses_delta:
        raise StrategyConfigError(
            "communication.quantize_delta/topk send update - global, which needs every client at rank"
            f" lora.r={cfg.lora.r}, but clients.profiles give ranks {ranks}; use communication.dtype alone"
        )


def check_no_central_dp(name: str, cfg: RunConfig) -> None:
    """Central DP bounds the sensitivity of a weighted mean of clipped updates; products, stacks and
    norm weights are not that, so its noise would not give the accounted epsilon."""
    if cfg.privacy.central:
        raise StrategyConfigError(
            f"{name!r} aggregates products B_i A_i (not a mean of clipped updates), so privacy.mode"
            f" {cfg.privacy.mode!r} would not give its accounted epsilon; use privacy.mode local or none"
        )
