"""The divergence guard: a round whose aggregate blows up is not kept.

A round is rejected when its global adapter holds a non-finite value, when its central eval loss
exceeds ``federation.divergence_factor`` times the best loss so far, or when its central accuracy falls
more than ``federation.accuracy_drop`` below the best so far (an overshooting learning rate can lower
exact match while the loss still falls). The federation then keeps the previous global adapter and
halves the clients' learning rate for the rounds that follow (:data:`fedslm.protocol.LR_SCALE` in the
train config); the metrics row says why (``diverged``). :class:`Kept` knows the rounds kept and which
of them is the best: the highest accuracy, then the lowest loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord

LR_BACKOFF = 0.5  # the learning-rate factor after each rejected round


def all_finite(arrays: ArrayRecord) -> bool:
    """Whether every value of every array is finite."""
    return all(bool(np.isfinite(a.numpy()).all()) for a in arrays.values())


def divergence_reason(
    loss: float | None,
    best: float | None,
    factor: float,
    finite: bool,
    accuracy: float | None = None,
    best_accuracy: float | None = None,
    drop: float = 1.0,
) -> str:
    """Why a round's aggregate is rejected ('' when it is kept). ``factor`` 0 turns the loss test off,
    ``drop`` 1 the accuracy test."""
    if not finite:
        return "the aggregated adapter holds non-finite values"
    if loss is None:
        return ""
    if not math.isfinite(loss):
        return f"central eval loss {loss}"
    if factor > 0 and best is not None and loss > factor * best:
        return f"central eval loss {loss:.4g} > {factor:g} x the best so far {best:.4g} (federation.divergence_factor)"
    if accuracy is not None and best_accuracy is not None and drop < 1 and accuracy < best_accuracy - drop - 1e-9:
        return (
            f"central accuracy {accuracy:.4g} < the best so far {best_accuracy:.4g} - {drop:g}"
            " (federation.accuracy_drop)"
        )
    return ""


@dataclass
class Kept:
    """The centrally evaluated rounds whose adapter was kept: (round, eval loss, accuracy or None)."""

    rounds: list[tuple[int, float, float | None]] = field(default_factory=list)

    def add(self, rnd: int, loss: float, accuracy: float | None) -> None:
        self.rounds.append((rnd, float(loss), None if accuracy is None else float(accuracy)))

    @property
    def loss(self) -> float | None:
        """The lowest eval loss kept."""
        return min((r[1] for r in self.rounds), default=None)

    @property
    def accuracy(self) -> float | None:
        """The highest accuracy kept (None where no round measured one)."""
        return max((r[2] for r in self.rounds if r[2] is not None), default=None)

    @property
    def best_round(self) -> int | None:
        """The round export and generate use by default: the highest accuracy, then the lowest loss."""
        if not self.rounds:
            return None
        return max(self.rounds, key=lambda r: (-math.inf if r[2] is None else r[2], -r[1]))[0]

    def state(self) -> list[list[float | None]]:
        return [list(r) for r in self.rounds]

    @classmethod
    def restore(cls, state: dict) -> Kept:
        """From a checkpoint's state; one written before this class kept only ``best``: [loss, round]."""
        if state.get("kept") is not None:
            return cls([(int(r[0]), float(r[1]), r[2]) for r in state["kept"]])
        best = state.get("best")
        return cls([(int(best[1]), float(best[0]), None)] if best else [])
