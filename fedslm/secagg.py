"""What SecAgg+ needs from fedslm, as pure functions: a fixed tensor order, packing, the error bound.

Flower's SecAgg+ (Bell et al. 2020) lives in its legacy API, which moves adapters as a *list* of
numpy arrays, not a named ``ArrayRecord``. Both sides therefore agree on an order: the server sends
the global adapter's keys (:func:`adapter_keys`) in the train config, and each client uploads the
tensors its strategy uploads (:func:`upload_keys`) in that order, as float32.

What the server learns is the example-weighted mean of the uploads, up to SecAgg+'s quantization.
Client ``i`` with ``n_i`` examples scales its values by ``r_i = round(n_i / W * Q) / Q`` (``W`` =
``secagg_max_weight``, ``Q`` = ``secagg_quantization_range``), clips them to ``[-C, C]`` (``C`` =
``secagg_clipping_range``) and rounds them stochastically to the grid of step ``2C / Q``. The masks
cancel exactly in the integer sum, so the server's mean differs from the exact one by less than
:func:`quantization_error_bound`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedslm.config import SecurityConfig

from .errors import FedslmError
from .protocol import LoRAPlan


class SecAggError(FedslmError, ValueError):
    """Arrays that do not match the agreed key order (count, names or shapes)."""


def adapter_keys(state: Mapping[str, Any]) -> list[str]:
    """The fixed order of the global adapter's tensors on the SecAgg+ path (sorted names)."""
    return sorted(state)


def upload_keys(keys: Sequence[str], strategy_keys: Mapping[str, Any]) -> list[str]:
    """The tensors a client uploads, in ``keys`` order: without B when the strategy keeps it on the
    client (``upload-lora-b: false``, FedSA-LoRA), without A when A is frozen (``train-lora-a: false``,
    FFA-LoRA): :meth:`fedslm.protocol.LoRAPlan.uploads`, the rule the client runner applies."""
    return LoRAPlan.from_record(strategy_keys).uploads(keys)


def pack(state: Mapping[str, torch.Tensor | np.ndarray], keys: Sequence[str]) -> list[np.ndarray]:
    """``state``'s tensors named in ``keys``, in that order, as float32 numpy arrays."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise SecAggError(f"{len(missing)} of the agreed tensors are missing, e.g. {missing[0]!r}")
    extra = sorted(set(state) - set(keys))
    if extra:
        raise SecAggError(f"{len(extra)} tensors are not in the agreed order, e.g. {extra[0]!r}")
    return [_numpy32(state[k]) for k in keys]


def unpack(
    arrays: Sequence[np.ndarray], keys: Sequence[str], reference: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`pack` back to named float32 tensors; shapes checked against ``reference`` if given."""
    if len(arrays) != len(keys):
        raise SecAggError(f"{len(arrays)} arrays for {len(keys)} agreed tensors")
    out: dict[str, torch.Tensor] = {}
    for k, a in zip(keys, arrays, strict=True):
        t = torch.from_numpy(_numpy32(a))
        if reference is not None and k in reference and tuple(reference[k].shape) != tuple(t.shape):
            raise SecAggError(f"{k!r} has shape {tuple(t.shape)}, expected {tuple(reference[k].shape)}")
        out[k] = t
    return out


def _numpy32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def weight_ratio(num_examples: int, sec: SecurityConfig) -> float:
    """The weight SecAgg+ really gives a client: ``n / max_weight`` rounded to ``1 / Q``."""
    q = sec.secagg_quantization_range
    return round(num_examples / sec.secagg_max_weight * q) / q


def quantization_error_bound(num_examples: Sequence[int], max_abs: float, sec: SecurityConfig) -> float:
    """Largest difference, per value, between SecAgg+'s aggregate and the exact example-weighted mean
    of ``len(num_examples)`` uploads whose values are at most ``max_abs`` in magnitude.

    With ``m`` clients, step ``d = 2C / Q`` and ``R = sum r_i``: stochastic rounding moves each
    client's scaled value by less than ``d``, so the unmasked sum is off by less than ``m d``, and the
    mean by ``m d / R``; the rounded weights ``|r_i - n_i / W| <= 1 / (2Q)`` move the mean by at most
    ``m max_abs / (Q R)``. Raises if a scaled value could be clipped (then there is no such bound)."""
    m = len(num_examples)
    if m == 0:
        raise SecAggError("no clients")
    c, q = sec.secagg_clipping_range, sec.secagg_quantization_range
    ratios = [weight_ratio(n, sec) for n in num_examples]
    if max(ratios) * max_abs > c:
        raise SecAggError(
            f"a value of {max_abs:g} scaled by its weight {max(ratios):g} exceeds secagg_clipping_range={c:g}:"
            " SecAgg+ clips it; raise security.secagg_clipping_range"
        )
    total = math.fsum(ratios)
    return m * (2 * c / q) / total + m * max_abs / (q * total)


__all__ = [
    "SecAggError",
    "adapter_keys",
    "pack",
    "quantization_error_bound",
    "unpack",
    "upload_keys",
    "weight_ratio",
]
