"""Parameter checks shared by several strategies (typed errors naming the value)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .spec import StrategyConfigError, registered_specs

if TYPE_CHECKING:
    from fedslm.config import RunConfig

    from .spec import StrategySpec


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
    from fedslm.config import profile_ranks

    ranks = profile_ranks(cfg)
    if all(r == cfg.lora.r for r in ranks.values()):
        return
    if not spec.heterogeneous_ranks:
        flexible = [s.name for s in registered_specs() if s.heterogeneous_ranks]
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


def check_central_dp(spec: StrategySpec, cfg: RunConfig) -> None:
    """Central DP bounds the sensitivity of a weighted mean of clipped updates; products, stacks and
    norm weights are not that, so its noise would not give the accounted epsilon."""
    if cfg.privacy.central and not spec.central_dp:
        raise StrategyConfigError(
            f"{spec.name!r} aggregates products B_i A_i (not a mean of clipped updates), so privacy.mode"
            f" {cfg.privacy.mode!r} would not give its accounted epsilon; use privacy.mode local or none"
        )


def check_secure_aggregation(spec: StrategySpec, cfg: RunConfig) -> None:
    """``security.secure_aggregation: secagg+`` reveals only the weighted sum of the sampled clients'
    uploads: refuse everything that needs an individual update, or more than their mean."""
    sec = cfg.security
    if not sec.secure:
        return
    why = f"security.secure_aggregation {sec.secure_aggregation!r} shows the server only the sum of the updates"
    on_secagg = ", ".join(s.name for s in registered_specs() if s.secure_aggregation)
    if spec.needs_individual_updates:
        raise StrategyConfigError(
            f"{why}, but {spec.name!r} needs every client's individual update; use one of {on_secagg}"
        )
    if not spec.secure_aggregation:
        raise StrategyConfigError(
            f"{why}; {spec.name!r} is not implemented on it (server optimizers could step on the mean, but the"
            f" SecAgg+ path runs plain example-weighted averaging); use one of {on_secagg}"
        )
    if cfg.privacy.central:
        raise StrategyConfigError(
            f"{why}, but privacy.mode {cfg.privacy.mode!r} clips each client's update on the server (central DP"
            " needs individual updates); use privacy.mode local or none"
        )
    if cfg.communication.compresses_delta:
        raise StrategyConfigError(
            f"{why} of full adapters, but communication.quantize_delta/topk send compressed deltas with a"
            " per-client error feedback; switch them off (SecAgg+ quantizes on its own)"
        )
    if sec.update_norm_bound > 0:
        raise StrategyConfigError(
            f"{why}, but security.update_norm_bound={sec.update_norm_bound} checks each client's update; set it to 0"
        )
    if cfg.eval.per_client:
        raise StrategyConfigError(f"{why}; eval.per_client is not implemented on the SecAgg+ path; set it to false")
    _check_secagg_sizes(cfg)


def _check_secagg_sizes(cfg: RunConfig) -> None:
    from fedslm.config import SECAGG_MODULUS_RANGE

    sec, per_round = cfg.security, cfg.federation.clients_per_round
    if per_round < 2:
        raise StrategyConfigError(
            f"SecAgg+ needs at least 2 clients per round, federation samples {per_round};"
            " raise federation.min_train_clients or fraction_train"
        )
    t = sec.secagg_reconstruction_threshold
    if isinstance(t, int) and t > per_round:
        raise StrategyConfigError(
            f"security.secagg_reconstruction_threshold={t} > the {per_round} clients sampled per round: no client"
            " could ever be unmasked; lower it or sample more clients"
        )
    if per_round * sec.secagg_quantization_range >= SECAGG_MODULUS_RANGE:
        raise StrategyConfigError(
            f"{per_round} clients x security.secagg_quantization_range={sec.secagg_quantization_range} >= 2**32:"
            " the sum of the quantized updates would wrap around; lower secagg_quantization_range"
        )
