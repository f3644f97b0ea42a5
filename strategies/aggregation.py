"""Aggregation maths as pure functions on dicts of numpy arrays (keyed by adapter tensor name)."""

from __future__ import annotations

import numpy as np

Tensors = dict[str, np.ndarray]  # an adapter (or an update), tensor name -> array: the one definition


def update_norm(update: Tensors, reference: Tensors) -> float:
    """L2 norm of ``update - reference`` over all keys of ``update``."""
    return float(np.sqrt(sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in update)))


def clip_update(update: Tensors, reference: Tensors, max_norm: float) -> tuple[Tensors, float]:
    """``reference + clip(update - reference)`` to L2 norm ``max_norm`` over all keys; and the norm."""
    norm = update_norm(update, reference)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    out = {k: (reference[k] + scale * (update[k].astype(np.float64) - reference[k])).astype(np.float32) for k in update}
    return out, norm


def add_noise(aggregate: Tensors, std: float, rng: np.random.Generator) -> Tensors:
    return {k: (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32) for k, v in aggregate.items()}
