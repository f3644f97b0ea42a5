"""The divergence guard: a round whose aggregate blows up is not kept.

A round is rejected when its global adapter holds a non-finite value, or when its central eval loss
exceeds ``federation.divergence_factor`` times the best loss so far. The federation then keeps the
previous global adapter and halves the clients' learning rate for the rounds that follow
(:data:`fedslm.protocol.LR_SCALE` in the train config); the metrics row says why (``diverged``).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord

LR_BACKOFF = 0.5  # the learning-rate factor after each rejected round


def all_finite(arrays: ArrayRecord) -> bool:
    """Whether every value of every array is finite."""
    return all(bool(np.isfinite(a.numpy()).all()) for a in arrays.values())


def divergence_reason(loss: float | None, best: float | None, factor: float, finite: bool) -> str:
    """Why a round's aggregate is rejected ('' when it is kept). ``factor`` 0 turns the loss test off."""
    if not finite:
        return "the aggregated adapter holds non-finite values"
    if loss is None or factor <= 0:
        return ""
    if not math.isfinite(loss):
        return f"central eval loss {loss}"
    if best is not None and loss > factor * best:
        return f"central eval loss {loss:.4g} > {factor:g} x the best so far {best:.4g} (federation.divergence_factor)"
    return ""
