"""LoRA adapters (PEFT): attach, read/write their tensors, move them as Flower ArrayRecords, save.

Only trainable adapter tensors ever travel: they are taken with ``get_peft_model_state_dict`` from
the unwrapped PEFT model (Opacus wraps it during DP training), so base weights never leave a node.

Two additions serve the exact and heterogeneous-rank strategies (``fedex-lora``, ``flora``,
``hetlora``):

- **frozen residuals**: a global adapter may carry ``<module>.frozen_residual`` tensors, a dense
  ``(out_features, in_features)`` weight delta per LoRA module that a quantized base cannot absorb.
  :func:`load_adapter_state` installs each as a forward hook on its LoRA layer (``y += x @ R^T``),
  frozen (never trained, never uploaded), and removes hooks the state does not name: the model is
  always exactly the state last loaded.
- **client ranks**: a client may train a lower rank than the global adapter (``rank=`` of
  :func:`peft_config`); it keeps the global LoRA scale ``alpha / lora.r``, so the first ``r`` rank
  components of the global adapter (:func:`fit_rank`) mean the same on every client.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from .config import LoRAConfig, ModelConfig
from .errors import FedslmError
from .fs import atomic_dir
from .logs import get_logger
from .model import RESIDENT, LoadedModel
from .modelinfo import DEFAULT_TARGETS

log = get_logger(__name__)


class AdapterError(FedslmError, ValueError):
    """Adapter tensors do not match the model (names the key and the shapes)."""


def target_modules(model_type: str, lora: LoRAConfig) -> list[str]:
    if lora.target_modules:
        return list(lora.target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise AdapterError(
            f"no default LoRA target modules for model type {model_type!r}; set lora.target_modules"
            f" (known defaults: {sorted(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def adapted_layers(lora: LoRAConfig, num_layers: int) -> list[int] | None:
    """The indices of the transformer layers LoRA adapts: the last ``lora.last_layers`` of
    ``num_layers``, or None for every layer."""
    if not lora.last_layers:
        return None
    if lora.last_layers > num_layers:
        raise AdapterError(f"lora.last_layers: {lora.last_layers} > the model's {num_layers} layers")
    return list(range(num_layers - lora.last_layers, num_layers))


def peft_config(
    model_type: str, lora: LoRAConfig, task: str = "causal-lm", rank: int | None = None, num_layers: int = 0
) -> Any:
    from peft import LoraConfig, TaskType

    r = rank or lora.r
    return LoraConfig(
        r=r,
        lora_alpha=lora.alpha * r / lora.r if r != lora.r else lora.alpha,  # type: ignore[arg-type]  # scale alpha/lora.r
        lora_dropout=lora.dropout,
        target_modules=target_modules(model_type, lora),
        layers_to_transform=adapted_layers(lora, num_layers),  # PEFT reads the first number of a module's name
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        bias="none",
    )


def attach_lora(base: Any, lora: LoRAConfig, task: str = "causal-lm", rank: int | None = None) -> Any:
    """Wrap ``base`` in a PEFT LoRA model; initialisation is seeded by ``lora.init_seed``."""
    from peft import get_peft_model

    cfg = peft_config(base.config.model_type, lora, task, rank, base.config.num_hidden_layers)
    if task != "causal-lm":  # the classification head (and DistilBERT's pre-classifier) train too
        from .model import HEAD_MODULES

        names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
        cfg.modules_to_save = [m for m in HEAD_MODULES if m in names]
    with torch.random.fork_rng():
        torch.manual_seed(lora.init_seed)
        model = get_peft_model(base, cfg)
    # LoRA weights in fp32: DP noise and small updates survive, and the wire format is exact.
    # (PEFT casts the LoRA input to the LoRA dtype; a trained head casts its own, below)
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" in name:
            p.data = p.data.float()
    fp32_heads(model)
    return model


def _to_fp32(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def fp32_heads(model: Any) -> int:
    """Keep each trained classification head (PEFT's ``modules_to_save`` copy) in fp32, its input cast
    to fp32 on the way in; returns how many were changed.

    In float16 AdamW's second moment of a head's gradient underflows and its update divides by
    zero (non-finite loss at the first step); in bfloat16 small updates round away. The logits then
    leave in fp32, which the loss computes in anyway.
    """
    changed = 0
    for name, module in model.named_modules():
        if ".modules_to_save." not in f"{name}." or not isinstance(module, torch.nn.Linear):
            continue
        if module.weight.dtype != torch.float32:
            module.float()
            module.register_forward_pre_hook(_to_fp32)
            changed += 1
    return changed


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors (PEFT keys, no adapter name), detached fp32 copies."""
    from peft import get_peft_model_state_dict

    inner = getattr(model, "_module", model)  # Opacus GradSampleModule -> PEFT model
    state = get_peft_model_state_dict(inner)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into ``model`` in place (parameter objects keep their identity).

    ``<module>.frozen_residual`` entries are installed as frozen residuals (see the module doc)."""
    state, residuals = split_residuals(state)
    set_residuals(model, residuals)
    current = adapter_state(model)
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if unexpected:
        raise AdapterError(f"adapter has unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
    if missing:
        raise AdapterError(f"adapter lacks key {missing[0]!r} ({len(missing)} in all)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise AdapterError(
                f"adapter key {k!r} has shape {tuple(v.shape)}, the model expects {tuple(current[k].shape)}"
            )
    params = _adapter_params(model)
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))


def _adapter_params(model: Any) -> dict[str, torch.nn.Parameter]:
    """PEFT state-dict key -> live parameter (same key mapping as get_peft_model_state_dict)."""
    inner = getattr(model, "_module", model)
    name = inner.active_adapter if isinstance(inner.active_adapter, str) else inner.active_adapter[0]
    out = {}
    for full, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        # lora_A.default.weight -> lora_A.weight; classifier.modules_to_save.default.weight -> classifier.weight
        key = full.replace(f".modules_to_save.{name}.", ".").replace(f".{name}.", ".")
        out[key] = p
    return out


# -- frozen residuals and client ranks ----------------------------------------------------------

RESIDUAL_SUFFIX = ".frozen_residual"
RESIDUAL_FILE = "frozen_residuals.safetensors"  # next to adapter_model.safetensors in a saved adapter dir
_HOOK_ATTR = "_fedslm_residual_hook"


def split_residuals(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors, module -> frozen residual) of a global adapter state."""
    adapter = {k: v for k, v in state.items() if not k.endswith(RESIDUAL_SUFFIX)}
    residuals = {k[: -len(RESIDUAL_SUFFIX)]: v for k, v in state.items() if k.endswith(RESIDUAL_SUFFIX)}
    return adapter, residuals


class _AddResidual:
    """Forward hook of a LoRA layer: ``output + x @ R^T`` (computed in fp32, R frozen)."""

    def __init__(self, residual: torch.Tensor) -> None:
        self.residual = residual.detach().to(torch.float32).clone()

    def __call__(self, module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if self.residual.device != x.device:  # moved once, not copied to a GPU on every forward
            self.residual = self.residual.to(x.device)
        extra = torch.nn.functional.linear(x.to(torch.float32), self.residual)
        return output + extra.to(output.dtype)


def set_residuals(model: Any, residuals: dict[str, torch.Tensor]) -> None:
    """Make ``residuals`` (LoRA module name -> ``(out, in)`` delta) the model's only frozen residuals."""
    inner = getattr(model, "_module", model)
    modules = dict(inner.named_modules())
    for name, r in residuals.items():
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "lora_A"):
            raise AdapterError(f"residual {name + RESIDUAL_SUFFIX!r} names no LoRA module of the model")
        want = (layer.out_features, layer.in_features)
        if tuple(r.shape) != want:
            raise AdapterError(f"residual {name + RESIDUAL_SUFFIX!r} has shape {tuple(r.shape)}, the layer is {want}")
    for layer in modules.values():
        handle = layer.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
    for name, r in residuals.items():
        layer = modules[name]
        layer.__dict__[_HOOK_ATTR] = layer.register_forward_hook(_AddResidual(r))


def residuals_of(model: Any) -> dict[str, torch.Tensor]:
    """The frozen residuals installed on ``model`` (module name -> delta)."""
    inner = getattr(model, "_module", model)
    out = {}
    for name, layer in inner.named_modules():
        handle = layer.__dict__.get(_HOOK_ATTR)
        if handle is not None:
            out[name] = layer._forward_hooks[handle.id].residual
    return out


def fit_rank(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The adapter at LoRA rank ``rank``: A's first ``rank`` rows and B's first ``rank`` columns
    (zero-padded when the adapter is smaller). Other tensors unchanged."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith(".lora_A.weight"):
            out[k] = v[:rank] if v.shape[0] >= rank else torch.cat([v, v.new_zeros(rank - v.shape[0], v.shape[1])], 0)
        elif k.endswith(".lora_B.weight"):
            out[k] = (
                v[:, :rank] if v.shape[1] >= rank else torch.cat([v, v.new_zeros(v.shape[0], rank - v.shape[1])], 1)
            )
    return out


def trainable_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- wire format -----------------------------------------------------------------------------


def to_arrayrecord(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: _array(v) for k, v in state.items()})


def _array(t: torch.Tensor) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy()))


def from_arrayrecord(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32)) for k, v in record.items()}


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def save_adapter_dir(model: Any, state: dict[str, torch.Tensor], out: Path) -> Path:
    """Write ``state`` as a PEFT adapter dir (adapter_config.json + adapter_model.safetensors).

    ``PeftModel.from_pretrained(base, out)`` loads it. Written atomically. Frozen residuals
    (``fedex-lora``, ``flora``) go beside it in ``frozen_residuals.safetensors``, which PEFT ignores:
    add them with :func:`load_adapter_state` (keys ``<module>.frozen_residual``).
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        inner = getattr(model, "_module", model)
        load_adapter_state(inner, state)
        inner.save_pretrained(str(tmp))
        _, residuals = split_residuals(state)
        if residuals:  # PEFT does not know them: beside the adapter, applied by load_adapter_state
            from safetensors.torch import save_file

            data = {k + RESIDUAL_SUFFIX: v.detach().to(torch.float32).contiguous() for k, v in residuals.items()}
            save_file(data, str(tmp / RESIDUAL_FILE))
    return out


# -- one PEFT model per process ---------------------------------------------------------------


@dataclass
class ResidentPeft:
    base: LoadedModel
    model: Any  # PeftModel
    key: tuple[Any, ...]
    initial: dict[str, torch.Tensor]  # the seeded initial adapter (lora.init_seed), whatever is loaded now


class _PeftCache:
    """The resident base model wrapped once with LoRA; re-wrapped only if the LoRA shape changes."""

    def __init__(self) -> None:
        self._current: ResidentPeft | None = None
        self._lock = threading.Lock()

    def get(
        self,
        mcfg: ModelConfig,
        lora: LoRAConfig,
        task: str = "causal-lm",
        rank: int | None = None,
        labels: tuple[str, ...] = (),
    ) -> ResidentPeft:
        base = RESIDENT.get(mcfg, task, labels)
        key = (
            id(base.model),
            rank or lora.r,
            lora.alpha,
            lora.dropout,
            tuple(lora.target_modules),
            lora.last_layers,
            task,
        )
        with self._lock:
            cur = self._current
            if cur is not None and cur.key == key:
                return cur
            if cur is not None and cur.base is base:
                base.model = cur.model.unload()  # strip the old LoRA layers off the shared base
            model = attach_lora(base.model, lora, task, rank)
            self._current = ResidentPeft(base, model, key, adapter_state(model))
            return self._current


PEFT_CACHE = _PeftCache()
