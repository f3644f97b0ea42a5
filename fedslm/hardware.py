"""Hardware probing: which device a node trains on and which compute dtype it runs natively.

bf16 is fast only where the hardware computes it: CUDA devices of compute capability 8.0 and newer
(Ampere, Hopper), and CPUs with AVX512-BF16 or AMX. Elsewhere torch emulates it: on an AVX2-only
EPYC a 512x576 by 576x1536 matmul takes 120 ms in bf16 against 13 ms in fp32, and an NF4 + DP-SGD
step 104 s against 3.5 s. So ``model.compute_dtype: auto`` resolves per node, from what the node
has, and ``model.device: auto`` picks CUDA where it exists.

The probes are plain functions of what they read (``/proc/cpuinfo`` flags, torch's CPU capability,
CUDA's device capability) so that tests can hand them any machine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch

from .config import DEVICE_PATTERN, DType
from .errors import FedslmError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_NAMES: dict[str, DType] = {name: name for name in get_args(DType)}


def as_dtype(name: object) -> DType | None:
    """``name`` as a ``model.compute_dtype`` value (``auto`` or a dtype), or None where it is none."""
    return _DTYPE_NAMES.get(name) if isinstance(name, str) else None


class HardwareError(FedslmError, RuntimeError):
    """A device or dtype was asked for that this machine does not have; the message names the key."""


@dataclass(frozen=True)
class CpuInfo:
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    flags: frozenset[str]  # /proc/cpuinfo "flags"

    @property
    def native_bf16(self) -> bool:
        """The CPU has AVX512-BF16 or AMX *and* torch uses it: a capability capped below AVX512
        (``ATEN_CPU_CAPABILITY=avx2``) takes the emulated bf16 kernels an AVX2-only CPU takes."""
        capability = self.capability.upper()
        if "AMX" in capability:
            return True
        return any(f in self.flags for f in CPU_BF16_FLAGS) and capability.startswith("AVX512")


@dataclass(frozen=True)
class CudaInfo:
    available: bool
    count: int = 0
    capability: tuple[int, int] = (0, 0)  # of the device in use
    name: str = ""

    @property
    def native_bf16(self) -> bool:
        return self.available and self.capability >= (8, 0)


@functools.cache
def probe_cpu() -> CpuInfo:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux: torch's capability string alone
        pass
    return CpuInfo(torch.backends.cpu.get_cpu_capability(), frozenset(flags))


def probe_cuda(index: int = 0) -> CudaInfo:
    if not torch.cuda.is_available():
        return CudaInfo(False)
    count = torch.cuda.device_count()
    if index >= count:
        return CudaInfo(True, count)
    return CudaInfo(True, count, torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))


def resolve_device(requested: str, cuda: CudaInfo | None = None, key: str = "model.device") -> str:
    """``auto`` -> ``cuda`` where CUDA exists, else ``cpu``; an explicit CUDA device must exist."""
    if not DEVICE_PATTERN.match(requested):
        raise HardwareError(f"{key}: {requested!r} is not one of auto | cpu | cuda | cuda:N")
    if requested == "cpu":
        return "cpu"
    cuda = cuda if cuda is not None else probe_cuda(_index(requested))
    if requested == "auto":
        return "cuda" if cuda.available else "cpu"
    if not cuda.available:
        raise HardwareError(
            f"{key}: {requested!r} asked for, but torch finds no CUDA device (torch {torch.__version__})"
        )
    if _index(requested) >= cuda.count:
        raise HardwareError(f"{key}: {requested!r} asked for, but this machine has {cuda.count} CUDA device(s)")
    return requested


def resolve_compute_dtype(
    requested: str,
    device: str,
    cpu: CpuInfo | None = None,
    cuda: CudaInfo | None = None,
    key: str = "model.compute_dtype",
    computes: bool = True,
) -> DType:
    """The compute dtype for ``device`` (already resolved): ``auto`` picks what the hardware runs natively.

    CUDA: bfloat16 from compute capability 8.0, else float16. CPU: bfloat16 with AVX512-BF16 or
    AMX, else float32. An explicit choice wins, except float16 on a CPU, which is refused: CPUs have
    no native fp16 matmul (a client's forward and backward took 6-8x as long as in float32 on the
    AVX2 EPYC, ``bench/grad_dtypes.py``). fp16 needs no loss scaling here: its per-sample LoRA
    gradients were 3x closer to float32's than bf16's, and scaling the loss by 2^10 or 2^16 left them
    as they were.
    ``computes=False``: the model is only loaded to read its weights (an export rebuilding the base
    a GPU run trained on), so float16 on a CPU is allowed.
    """
    choice = as_dtype(requested)
    if choice is None:
        raise HardwareError(f"{key}: {requested!r} is not one of auto | {' | '.join(DTYPES)}")
    on_cuda = device.startswith("cuda")
    if choice == "float16" and not on_cuda and computes:
        raise HardwareError(
            f"{key}: float16 on a CPU is refused (no native fp16 matmul: emulated, 6-8x slower than"
            " float32); use auto, float32, or bfloat16"
        )
    if choice != "auto":
        return choice
    if on_cuda:
        cuda = cuda if cuda is not None else probe_cuda(_index(device))
        return "bfloat16" if cuda.native_bf16 else "float16"
    cpu = cpu if cpu is not None else probe_cpu()
    return "bfloat16" if cpu.native_bf16 else "float32"


def resolve_client_gpus(
    requested: float | str,
    device: str,
    concurrent: int,
    cuda: CudaInfo | None = None,
    key: str = "federation.client_gpus",
    cluster: bool = False,
) -> float:
    """Each simulated client's GPU share (Ray's ``num_gpus``) for clients whose ``model.device`` resolved
    to ``device`` on the driver, with ``concurrent`` clients training at once.

    Ray hides every GPU from a worker that reserved none, so a client told ``model.device: cuda``
    with a share of 0 would find no CUDA device. ``auto``: 0 on a CPU, else the GPUs split evenly
    among the clients that run at once (FlowerTune's ``num-gpus``), at most one GPU each. A number
    is used as given; above 0 it needs CUDA here, unless the clients run on a Ray cluster (``cluster``:
    its workers may have GPUs its head lacks), and 0 with an explicit CUDA device is refused.

    The automatic share is one GPU over a whole number, rounded down to Ray's resolution (1e-4).
    Flower makes ``int(GPUs / share)`` actors a node: 3 clients at once on 2 GPUs at 0.667 each got
    2 actors (one client waiting its turn) where 0.5 gives room for all three, and a share that Ray
    would round up past a whole GPU (1/6 as 0.1667: six are 1.0002) leaves an actor pending forever,
    and the round with it.
    """
    on_cuda = device.startswith("cuda")
    if requested == "auto":
        if not on_cuda:
            return 0.0
        cuda = cuda if cuda is not None else probe_cuda(_index(device))
        per_gpu = math.ceil(max(concurrent, 1) / max(cuda.count, 1))  # clients packed on each GPU
        return math.floor(1e4 / per_gpu) / 1e4
    share = float(requested)
    if share > 0:
        if not cluster:  # a cluster's workers may have GPUs this head lacks
            cuda = cuda if cuda is not None else probe_cuda()
            if not cuda.available:
                raise HardwareError(
                    f"{key}: {share:g} needs a CUDA device, and torch {torch.__version__} finds none;"
                    " set it to 0 or auto"
                )
    elif on_cuda:
        raise HardwareError(
            f"{key}: 0 hides the GPU from the simulated clients (Ray gives a worker only the GPU share it"
            f" reserves), so model.device {device!r} cannot be met there; leave it auto or give a share such"
            " as 0.25 (four clients per GPU)"
        )
    return share


def check_ray_device(device: str, cuda: CudaInfo | None = None, key: str = "model.device") -> None:
    """Refuse a numbered GPU for clients in Ray workers, where it would name another GPU or none.

    Ray shows each client actor only the GPUs its share reserves, renumbered from 0: there ``cuda:1``
    does not exist, and on a machine of several GPUs ``cuda:0`` is whichever one Ray gave.
    """
    if ":" not in device:
        return
    cuda = cuda if cuda is not None else probe_cuda(_index(device))
    if cuda.count > 1:
        raise HardwareError(
            f"{key}: {device!r} cannot hold for clients in Ray workers (Ray shows each one only the GPU"
            " it reserves, as cuda:0); use cuda, and CUDA_VISIBLE_DEVICES="
            f"{_index(device)} to keep the whole run on that GPU"
        )


def _index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def describe(device: str, dtype: str) -> str:
    """One line for the plan at start: what was resolved, and from what."""
    if device.startswith("cuda"):
        info = probe_cuda(_index(device))
        return f"{device} ({info.name}, capability {info.capability[0]}.{info.capability[1]}), compute {dtype}"
    cpu = probe_cpu()
    native = "native bf16" if cpu.native_bf16 else "no native bf16"
    return f"cpu ({cpu.capability}, {native}), compute {dtype}"
