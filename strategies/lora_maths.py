"""LoRA-aware aggregation maths (FedEx-LoRA, FLoRA, HetLoRA) as pure functions on numpy dicts.

An adapter is a dict keyed by PEFT state-dict names: ``<module>.lora_A.weight`` (r, in) and
``<module>.lora_B.weight`` (out, r) per LoRA module, possibly other trained tensors (a
classification head), and possibly ``<module>.frozen_residual`` (out, in): a dense weight delta that
the quantized base cannot absorb (:mod:`fedslm.adapters` applies it as a frozen forward hook). A
module's weight update is therefore ``scaling * B @ A + residual`` with ``scaling = alpha / r``
(the global LoRA scale; clients of a lower rank keep it, see :func:`fedslm.adapters.peft_config`).

Everything is computed in float64 and returned as float32. Weights are normalised here; they must
be finite, >= 0 and not all zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .aggregation import Tensors

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
RESIDUAL_SUFFIX = ".frozen_residual"  # fedslm.adapters.RESIDUAL_SUFFIX (not imported: that pulls in torch)


def modules(tensors: Tensors) -> list[str]:
    """LoRA modules present with both A and B (``<module>`` of ``<module>.lora_A.weight``)."""
    names = [k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX)]
    missing = [m for m in names if m + B_SUFFIX not in tensors]
    if missing:
        raise ValueError(f"LoRA module {missing[0]!r} has lora_A but no lora_B")
    return sorted(names)


def normalise(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be finite, >= 0 and not all 0; got {list(weights)}")
    return w / w.sum()


def _mean(arrays: Sequence[np.ndarray], p: np.ndarray) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"cannot average tensors of different shapes {sorted(shapes)}")
    return np.einsum("i,i...->...", p, np.stack([np.asarray(a, dtype=np.float64) for a in arrays]))


def _others(updates: Sequence[Tensors], p: np.ndarray) -> Tensors:
    """Weighted mean of every tensor that is neither LoRA A/B nor a residual (e.g. a head)."""
    keys = [k for k in updates[0] if not k.endswith((A_SUFFIX, B_SUFFIX, RESIDUAL_SUFFIX))]
    return {k: _mean([u[k] for u in updates], p).astype(np.float32) for k in keys}


def effective_deltas(tensors: Tensors, scaling: float) -> Tensors:
    """Module -> its dense weight update ``scaling * B @ A (+ residual)`` (float64)."""
    out = {}
    for m in modules(tensors):
        delta = scaling * (tensors[m + B_SUFFIX].astype(np.float64) @ tensors[m + A_SUFFIX].astype(np.float64))
        if m + RESIDUAL_SUFFIX in tensors:
            delta = delta + tensors[m + RESIDUAL_SUFFIX]
        out[m] = delta
    return out


def accumulate(current: Tensors, new: dict[str, np.ndarray]) -> Tensors:
    """``<module>.frozen_residual`` tensors: the current global residual (0 if none) plus ``new``."""
    out = {}
    for m, r in new.items():
        old = current.get(m + RESIDUAL_SUFFIX)
        total = r if old is None else old.astype(np.float64) + r
        out[m + RESIDUAL_SUFFIX] = np.asarray(total, dtype=np.float32)
    return out


# -- FedEx-LoRA ---------------------------------------------------------------------------------


def fedex_aggregate(
    updates: Sequence[Tensors], weights: Sequence[float], scaling: float
) -> tuple[Tensors, dict[str, np.ndarray]]:
    """FedEx-LoRA (Singhal et al. 2024): the weighted means of A and B, and per module the residual
    ``scaling * (sum_i p_i B_i A_i - mean(B) mean(A))`` that makes ``mean(B) mean(A)`` exact.

    Returns (mean adapter, module -> residual of this round, float64)."""
    p = normalise(weights)
    mean = _others(updates, p)
    residuals = {}
    for m in modules(updates[0]):
        a = _mean([u[m + A_SUFFIX] for u in updates], p)
        b = _mean([u[m + B_SUFFIX] for u in updates], p)
        products = [u[m + B_SUFFIX].astype(np.float64) @ u[m + A_SUFFIX].astype(np.float64) for u in updates]
        residuals[m] = scaling * (_mean(products, p) - b @ a)
        mean[m + A_SUFFIX], mean[m + B_SUFFIX] = a.astype(np.float32), b.astype(np.float32)
    return mean, residuals


# -- FLoRA --------------------------------------------------------------------------------------


def flora_stack(
    a_list: Sequence[np.ndarray], b_list: Sequence[np.ndarray], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA (Wang et al. 2024): ``A_stack`` = the rows ``p_i A_i`` one client after another,
    ``B_stack`` = the columns ``B_i`` in the same order, so ``B_stack @ A_stack = sum_i p_i B_i A_i``
    exactly, whatever each client's rank ``r_i``; the stack has rank ``sum_i r_i``."""
    p = normalise(weights)
    if len(a_list) != len(b_list) or len(a_list) != len(p):
        raise ValueError(f"got {len(a_list)} A, {len(b_list)} B and {len(p)} weights")
    for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"client {i}: lora_A has rank {a.shape[0]}, lora_B has rank {b.shape[1]}")
    a_stack = np.concatenate([pi * np.asarray(a, dtype=np.float64) for pi, a in zip(p, a_list, strict=True)], 0)
    b_stack = np.concatenate([np.asarray(b, dtype=np.float64) for b in b_list], 1)
    return a_stack, b_stack


def flora_aggregate(
    updates: Sequence[Tensors], weights: Sequence[float], scaling: float
) -> tuple[Tensors, dict[str, np.ndarray]]:
    """Per module ``scaling * B_stack @ A_stack`` (the round's exact weighted mean of the clients'
    LoRA updates, each trained from B = 0); other tensors averaged. Returns (others, module -> delta)."""
    mean = _others(updates, normalise(weights))
    deltas = {}
    for m in modules(updates[0]):
        a_stack, b_stack = flora_stack([u[m + A_SUFFIX] for u in updates], [u[m + B_SUFFIX] for u in updates], weights)
        deltas[m] = scaling * (b_stack @ a_stack)
    return mean, deltas


# -- HetLoRA ------------------------------------------------------------------------------------


def pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A (r, in) and B (out, r) zero-padded to ``rank`` (rows of A, columns of B)."""
    r = a.shape[0]
    if b.shape[1] != r:
        raise ValueError(f"lora_A has rank {r}, lora_B has rank {b.shape[1]}")
    if r > rank:
        raise ValueError(f"a client adapter of rank {r} exceeds the global rank {rank}")
    a_pad = np.zeros((rank, a.shape[1]), dtype=np.float64)
    b_pad = np.zeros((b.shape[0], rank), dtype=np.float64)
    a_pad[:r], b_pad[:, :r] = a, b
    return a_pad, b_pad


def hetlora_weights(a_list: Sequence[np.ndarray], b_list: Sequence[np.ndarray]) -> np.ndarray:
    """Sparsity-weighted aggregation (Cho et al. 2024): ``p_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F``.
    Equal weights if every product is 0 (nothing to tell the clients apart)."""
    pairs = zip(a_list, b_list, strict=True)
    norms = np.array([np.linalg.norm(np.asarray(b, np.float64) @ np.asarray(a, np.float64)) for a, b in pairs])
    if norms.sum() == 0:
        return np.full(len(norms), 1.0 / len(norms))
    return norms / norms.sum()


def hetlora_aggregate(updates: Sequence[Tensors], weights: Sequence[float], rank: int) -> Tensors:
    """HetLoRA (Cho et al. 2024): per module, every client's A and B zero-padded to ``rank`` and
    summed with :func:`hetlora_weights` of that module; other tensors by ``weights`` (examples).
    Each client takes the first ``r_i`` components back (:func:`fedslm.adapters.fit_rank`)."""
    out = _others(updates, normalise(weights))
    for m in modules(updates[0]):
        a_list = [u[m + A_SUFFIX] for u in updates]
        b_list = [u[m + B_SUFFIX] for u in updates]
        p = hetlora_weights(a_list, b_list)
        padded = [pad_rank(a, b, rank) for a, b in zip(a_list, b_list, strict=True)]
        out[m + A_SUFFIX] = _mean([a for a, _ in padded], p).astype(np.float32)
        out[m + B_SUFFIX] = _mean([b for _, b in padded], p).astype(np.float32)
    return out
