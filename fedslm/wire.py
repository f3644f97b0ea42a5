"""How adapter tensors travel: compact dtypes both ways, compressed deltas with error feedback up.

Downlink and plain uplink: every tensor as raw little-endian bytes in ``communication.dtype``
(bf16 by default: half of fp32, and LoRA training does not notice). Flower's ``Array`` carries the
dtype and shape; numpy has no bf16, so these arrays use ``stype="fedslm.raw"`` and are decoded here,
never by ``Array.numpy()``. Plain numpy arrays (``stype="numpy.ndarray"``) decode too.

Compressed uplink (``quantize_delta`` and/or ``topk``): the client sends ``update - global``, not
its adapter. What compression drops is kept in an error-feedback residual on the client and added
to the next round's delta (Seide et al. 2014; Karimireddy et al. 2019), so no part of an update is
lost, only delayed. Encodings, per tensor ``k`` of the update:

- int8: ``k::q8`` (int8, tensor's shape) and ``k::scale`` (fp32, one per row, ``max|row| / 127``);
- top-k: ``k::mask`` (which entries are kept, one bit each, row-major) and ``k::val`` (the kept
  values in the wire dtype, in that order);
- top-k + int8: ``k::mask``, ``k::q8`` (the kept values) and ``k::scale`` (one fp32 scale).

The server rebuilds ``global + delta`` with :func:`decode_update` before any check or aggregation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .errors import FedslmError
from .hardware import DTYPES

RAW = "fedslm.raw"
_PARTS = ("::q8", "::scale", "::mask", "::val")


class WireError(FedslmError, ValueError):
    """An array record that does not decode (unknown dtype, truncated bytes, inconsistent parts)."""


# ------------------------------------------------------------------------------------------------
# single tensors


def to_array(t: torch.Tensor, dtype: str) -> Array:
    """``t`` cast to ``dtype`` as raw bytes (no pickle, no numpy for bf16)."""
    x = t.detach().to("cpu", _torch_dtype(dtype)).contiguous()
    data = x.view(torch.uint8).numpy().tobytes() if x.numel() else b""
    return Array(dtype=dtype, shape=tuple(x.shape), stype=RAW, data=data)


def from_array(a: Array) -> torch.Tensor:
    """An ``Array`` (raw or numpy) as a float32 tensor."""
    if a.stype != RAW:
        return torch.from_numpy(np.array(a.numpy(), dtype=np.float32))
    if a.dtype in DTYPES:
        dtype = DTYPES[a.dtype]
    elif a.dtype in ("int8", "uint8", "int32"):
        dtype = getattr(torch, a.dtype)
    else:
        raise WireError(f"unknown wire dtype {a.dtype!r}")
    shape = tuple(int(s) for s in a.shape)
    n = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(a.data) != n * itemsize:
        raise WireError(f"{len(a.data)} bytes for shape {shape} of {a.dtype} (expected {n * itemsize})")
    if n == 0:
        return torch.zeros(shape, dtype=torch.float32 if dtype.is_floating_point else dtype)
    t = torch.frombuffer(bytearray(a.data), dtype=dtype).reshape(shape)
    return t.to(torch.float32) if dtype.is_floating_point else t


def _torch_dtype(name: str) -> torch.dtype:
    if name in DTYPES:
        return DTYPES[name]
    return getattr(torch, name)


def encode(state: dict[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """A full adapter state for the wire."""
    return ArrayRecord({k: to_array(v, dtype) for k, v in state.items()})


def decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """:func:`encode` back to float32 tensors (also plain numpy records)."""
    if any(k.endswith(_PARTS) for k in record):
        raise WireError("this record holds a compressed delta; decode it with decode_update()")
    return {k: from_array(v) for k, v in record.items()}


# ------------------------------------------------------------------------------------------------
# compressed deltas


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (per tensor for 1-D); returns (q, scale)."""
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    scale = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(x.shape), scale.to(torch.float32)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = q.reshape(scale.shape[0], -1).to(torch.float32) * scale[:, None]
    return rows.reshape(q.shape)


def topk_indices(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices of the ``ceil(fraction * numel)`` largest-magnitude entries, sorted."""
    k = max(1, math.ceil(fraction * x.numel()))
    return torch.topk(x.reshape(-1).abs(), k, sorted=False).indices.sort().values.to(torch.int32)


def compress_delta(
    delta: dict[str, torch.Tensor], *, dtype: str, int8: bool, topk: float
) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
    """Encode ``delta``; returns (record, what the server will decode) so the caller can keep
    ``delta - decoded`` as its error-feedback residual."""
    out: dict[str, Array] = {}
    seen: dict[str, torch.Tensor] = {}
    for k, d in delta.items():
        d = d.detach().to(torch.float32)
        if topk > 0:
            idx = topk_indices(d, topk).long()
            vals = d.reshape(-1)[idx]
            mask = np.zeros(d.numel(), dtype=bool)
            mask[idx.numpy()] = True
            out[f"{k}::mask"] = to_array(torch.from_numpy(np.packbits(mask)), "uint8")
            if int8:
                q, scale = quantize_int8(vals)
                out[f"{k}::q8"], out[f"{k}::scale"] = to_array(q, "int8"), to_array(scale, "float32")
                vals = dequantize_int8(q, scale)
            else:
                out[f"{k}::val"] = to_array(vals, dtype)
                vals = from_array(out[f"{k}::val"])
            dense = torch.zeros(d.numel(), dtype=torch.float32)
            dense[idx] = vals
            seen[k] = dense.reshape(d.shape)
        else:
            q, scale = quantize_int8(d)
            out[f"{k}::q8"], out[f"{k}::scale"] = to_array(q, "int8"), to_array(scale, "float32")
            seen[k] = dequantize_int8(q, scale)
    return ArrayRecord(out), seen


def decode_update(record: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's update as full float32 tensors: plain records as they are, compressed deltas
    added to ``reference`` (the global adapter the client was sent). Raises :class:`WireError`."""
    plain = {k: v for k, v in record.items() if not k.endswith(_PARTS)}
    out = {k: from_array(v) for k, v in plain.items()}
    names = sorted({k.rsplit("::", 1)[0] for k in record if k.endswith(_PARTS)})
    for name in names:
        if name not in reference:
            raise WireError(f"compressed delta for {name!r}, which is not in the global adapter")
        if name in out:
            raise WireError(f"{name!r} sent both plain and as a delta")
        ref = reference[name].to(torch.float32)
        parts = {p: record[f"{name}{p}"] for p in _PARTS if f"{name}{p}" in record}
        out[name] = ref + _delta(name, parts, ref.shape)
    return out


def _delta(name: str, parts: dict[str, Array], shape: torch.Size) -> torch.Tensor:
    n = math.prod(shape)
    if "::mask" in parts:
        packed = from_array(parts["::mask"]).reshape(-1).numpy().astype(np.uint8)
        if packed.size != (n + 7) // 8:
            raise WireError(f"{name}: top-k mask of {packed.size} bytes for shape {tuple(shape)}")
        idx = torch.from_numpy(np.flatnonzero(np.unpackbits(packed, count=n))).long()
        if "::q8" in parts:
            vals = _dequant(name, parts).reshape(-1)
        elif "::val" in parts:
            vals = from_array(parts["::val"]).reshape(-1)
        else:
            raise WireError(f"{name}: top-k mask without values")
        if vals.numel() != idx.numel():
            raise WireError(f"{name}: {idx.numel()} kept entries but {vals.numel()} values")
        dense = torch.zeros(n, dtype=torch.float32)
        dense[idx] = vals
        return dense.reshape(shape)
    if "::q8" not in parts:
        raise WireError(f"{name}: incomplete compressed delta (parts {sorted(parts)})")
    d = _dequant(name, parts)
    if tuple(d.shape) != tuple(shape):
        raise WireError(f"{name}: delta shape {tuple(d.shape)} != global {tuple(shape)}")
    return d


def _dequant(name: str, parts: dict[str, Array]) -> torch.Tensor:
    if "::scale" not in parts:
        raise WireError(f"{name}: int8 values without scales")
    q, scale = from_array(parts["::q8"]), from_array(parts["::scale"]).reshape(-1)
    rows = q.shape[0] if q.dim() > 1 else 1
    if scale.numel() != rows:
        raise WireError(f"{name}: {scale.numel()} scales for {rows} rows")
    return dequantize_int8(q, scale)


def nbytes(record: ArrayRecord) -> int:
    return sum(len(v.data) for v in record.values())


__all__: list[Any] = [
    "WireError",
    "compress_delta",
    "decode",
    "decode_update",
    "dequantize_int8",
    "encode",
    "from_array",
    "quantize_int8",
    "to_array",
    "topk_indices",
]
