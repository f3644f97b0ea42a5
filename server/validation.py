"""Checks every client update passes before any aggregation.

An update is the adapter a client sends back. It must decode (see :mod:`fedslm.wire`), stay under the
size limit, name only tensors of the global adapter with their shapes (a heterogeneous-rank strategy
may see a different rank, never a different layer width), hold only finite values, and, when a bound
is set, lie within that L2 distance of the global adapter. A failing update is rejected with the
reason; the round goes on with the others.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedslm import wire
from fedslm.config import SecurityConfig


class UpdateRejected(ValueError):
    """Why one client's update is not aggregated."""


def _shape_ok(key: str, got: tuple[int, ...], want: tuple[int, ...], flexible_rank: bool) -> bool:
    if got == want:
        return True
    if not flexible_rank or len(got) != 2 or len(want) != 2:
        return False
    if "lora_A" in key:  # (r, in_features)
        return got[1] == want[1]
    if "lora_B" in key:  # (out_features, r)
        return got[0] == want[0]
    return False


def check_update(
    record: ArrayRecord,
    reference: dict[str, torch.Tensor],
    security: SecurityConfig,
    *,
    flexible_rank: bool = False,
) -> dict[str, torch.Tensor]:
    """The decoded update (float32 tensors), or :class:`UpdateRejected` saying why not."""
    size = wire.nbytes(record)
    limit = security.max_update_mb * 1e6
    if size > limit:
        raise UpdateRejected(f"update of {size / 1e6:.2f} MB exceeds security.max_update_mb={security.max_update_mb}")
    try:
        update = wire.decode_update(record, reference)
    except (wire.WireError, ValueError, TypeError) as e:
        raise UpdateRejected(f"undecodable update: {e}") from None
    if not update:
        raise UpdateRejected("empty update")
    unknown = sorted(set(update) - set(reference))
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UpdateRejected(f"unknown tensor(s) {', '.join(unknown[:3])}{more}")
    for key, t in update.items():
        want = tuple(reference[key].shape)
        if not _shape_ok(key, tuple(t.shape), want, flexible_rank):
            raise UpdateRejected(f"{key} has shape {tuple(t.shape)}, the global adapter has {want}")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateRejected(f"{key} holds {bad} non-finite value(s)")
    if security.update_norm_bound > 0:
        same = [k for k in update if update[k].shape == reference[k].shape]
        norm = float(torch.sqrt(sum((((update[k] - reference[k]) ** 2).sum() for k in same), torch.tensor(0.0))))
        if norm > security.update_norm_bound:
            raise UpdateRejected(
                f"update norm {norm:.4g} exceeds security.update_norm_bound={security.update_norm_bound}"
            )
    return update
