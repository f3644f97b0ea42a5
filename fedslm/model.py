"""Base-model loading: the bundled SmolLM2 GGUF, hub ids, local dirs and tiny random models.

GGUF loading in transformers de-quantizes to float, cannot be combined with a quantization config,
and ``save_pretrained`` refuses GGUF-loaded models. So a GGUF is converted once into a cached
safetensors directory (atomic: a killed conversion never leaves a half cache) and that directory is
loaded with the configured quantization (bitsandbytes nf4 / int8, or none). On a CPU, where
quantizing takes most of a load, the quantized model is kept too (:func:`kept_quantized`) and later
loads read it back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, RunConfig
from .fs import atomic_dir
from .hardware import (
    DTYPES,
    HardwareError,
    check_ray_device,
    describe,
    probe_cpu,
    resolve_client_gpus,
    resolve_compute_dtype,
    resolve_device,
)
from .logs import get_logger, quiet_loading
from .modeldir import is_complete
from .modelinfo import BUNDLED, TINY_PREFIX, ModelLoadError, cache_root, head_init, locate_bundled_gguf, model_info

log = get_logger(__name__)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF to a safetensors model directory (with tokenizer), atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_complete(out):
        return out
    log.info("Converting %s to safetensors in %s (once; about 30 s)", gguf.name, out)
    with atomic_dir(out, is_complete) as tmp:  # a half-converted one left by a crash is replaced
        kw = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / ".complete").write_text(str(time.time()))
    return out


def bundled_tokenizer_dir(cfg: ModelConfig | None = None) -> Path:
    """SmolLM2's tokenizer (and chat template), used by the tiny random test models too."""
    return resolve_model_dir(ModelConfig(name="smollm2-135m-instruct", cache_dir=cfg.cache_dir if cfg else ""))


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """A local directory that ``from_pretrained`` can load for ``cfg.name``."""
    name = cfg.name
    if name in BUNDLED:
        return convert_gguf(locate_bundled_gguf(name), cache_root(cfg) / "models" / name)
    if name.startswith(TINY_PREFIX):
        from .tiny import build_tiny_model_dir  # only tests and quick runs need these

        out = cache_root(cfg) / "models" / name
        return build_tiny_model_dir(name[len(TINY_PREFIX) :], out, bundled_tokenizer_dir(cfg))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name {name!r} is a directory without config.json")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name {name!r}: no such GGUF file")
        return convert_gguf(path, cache_root(cfg) / "models" / path.stem)
    try:  # a hub id: download (or find in the HF cache) a snapshot
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise ModelLoadError(
            f"model.name {name!r} is not a bundled name ({sorted(BUNDLED)}), a tiny-<family> model,"
            f" a local directory or a reachable hub id ({type(e).__name__}: {e})"
        ) from None


# Classification heads are new, trained and small: never quantized.
HEAD_MODULES = ("pre_classifier", "classifier", "score")


QUANTIZED_FORMAT = 1  # raise when what kept_quantized keeps changes


def kept_quantized(cfg: ModelConfig, path: Path, task: str) -> Path | None:
    """Where the quantized load of the model in ``path`` is kept, or None where none is kept.

    Quantizing SmolLM2 to NF4 on one AVX2 core takes 4.4 s of a 5.1 s load; reading the kept copy
    back, 0.5 s, with bit-identical logits (``tests/test_model.py``). Kept for NF4 causal LMs on a CPU
    (a GPU quantizes in a moment; a classifier's new head is its own; int8 is not kept). The name holds everything
    the quantized weights depend on: the source's files (path, size, modification time), the
    quantization, the compute dtype (the unquantized tensors' dtype) and the versions of the libraries
    that quantize and serialize; anything else is a new entry.
    """
    if cfg.quantization != "nf4" or cfg.device != "cpu" or task != "causal-lm":
        return None
    source = _source(path)
    versions = [importlib.metadata.version(d) for d in ("torch", "transformers", "bitsandbytes")]
    key = json.dumps([QUANTIZED_FORMAT, source["path"], source["files"], cfg.quantization, cfg.compute_dtype, versions])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(cfg) / "quantized" / f"{path.name}-{cfg.quantization}-{cfg.compute_dtype}-{digest}"


def _source(path: Path) -> dict[str, Any]:
    """What a kept copy's weights were quantized from: the model directory and its weight files'
    names, sizes and modification times (JSON-ready, as ``source.json`` in the entry records it)."""
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    stats = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    return {"path": str(path.resolve()), "files": stats}


def keep_quantized(model: Any, out: Path, source: Path, replace: bool = False) -> None:
    """Save a just-quantized model of the directory ``source`` to ``out`` (safetensors, atomically),
    then remove the kept copies no load can use any more (:func:`prune_kept_quantized`); a failure only
    costs the next load its quantizing again. ``replace``: over an entry that failed to load."""
    try:
        with atomic_dir(out, None if replace else is_complete) as tmp:
            model.save_pretrained(str(tmp))
            (tmp / "source.json").write_text(json.dumps(_source(source)))
            (tmp / ".complete").write_text(str(time.time()))
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("Could not keep the quantized model in %s (%s): the next load quantizes again", out, e)
        return
    prune_kept_quantized(out.parent)


def prune_kept_quantized(root: Path) -> list[Path]:
    """Remove the kept copies under ``root`` whose source model directory is gone or has other weights
    since (an entry's name holds its source's sizes and modification times, so no load reaches it
    again); returns them. Copies of other library versions stay: another environment sharing the
    cache (a venv of another Python) still loads them. Entries without ``source.json`` (kept before
    it was written) and unfinished ones are left alone."""
    removed, freed = [], 0
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith("."):  # another load's entry being written, or one being replaced
            continue
        try:
            recorded = json.loads((entry / "source.json").read_text())
            source = Path(recorded["path"])
            if source.is_dir() and _source(source) == recorded:
                continue
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            freed += size
    if removed:
        log.info(
            "Removed %d kept quantized cop%s of models changed or deleted since (%.0f MB) from %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            freed / 1e6,
            root,
        )
    return removed


def _load_kept(auto: Any, kept: Path, cfg: ModelConfig) -> Any:
    """The model of a complete kept entry, or None where it does not load (it is then rebuilt). Its
    4-bit weights and their quantization states are copied off the file's memory map (as
    :func:`own_unquantized_weights` does for the others): a tensor left there keeps the mapping alive."""
    try:
        model = auto.from_pretrained(str(kept), dtype=DTYPES[cfg.compute_dtype], device_map=cfg.device)
    except Exception as e:  # noqa: BLE001 - a damaged cache entry of any kind is rebuilt, not fatal
        log.warning("The quantized model kept in %s did not load (%s): quantizing again", kept, e)
        return None
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            p.data = p.data.clone()
            state.absmax, state.code = state.absmax.clone(), state.code.clone()
            if state.nested:
                state.offset, state.state2.absmax = state.offset.clone(), state.state2.absmax.clone()
                state.state2.code = state.state2.code.clone()
    return model


def quantization_config(cfg: ModelConfig) -> Any:
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", *HEAD_MODULES]
    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=skip,
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path
    task: str
    compute_dtype: str  # what model.compute_dtype resolved to on this machine (clients report it)


def resolve_hardware(cfg: ModelConfig, computes: bool = True) -> ModelConfig:
    """``cfg`` with ``device`` and ``compute_dtype`` resolved for this machine (see :mod:`fedslm.hardware`).

    Raises :class:`ModelLoadError` naming the key for a device this machine lacks, or float16 on a CPU
    (unless the model is only read: ``computes=False``).
    """
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_compute_dtype(cfg.compute_dtype, device, computes=computes)
    except HardwareError as e:
        raise ModelLoadError(str(e)) from None
    if (device, dtype) == (cfg.device, cfg.compute_dtype):
        return cfg
    return dataclasses.replace(cfg, device=device, compute_dtype=dtype)


def check_run_hardware(cfg: RunConfig, scope: str = "simulation") -> None:
    """Refuse, before anything starts, a device or dtype this machine cannot give (``fedslm check``).

    ``scope`` is the preflight's: a simulation trains here, so the device, dtype and the clients' GPU
    share are checked against this machine; a ServerApp evaluates here (device and dtype); ``config``
    (``fedslm run`` from a workstation) only submits, and each node resolves its own device, so only
    what no machine could give is refused (float16 on a CPU).
    """
    from .config import ConfigError

    try:
        if scope == "config":
            if cfg.model.device == "cpu":
                resolve_compute_dtype(cfg.model.compute_dtype, "cpu", cpu=probe_cpu())
            return
        device = resolve_device(cfg.model.device)
        dtype = resolve_compute_dtype(cfg.model.compute_dtype, device)
        if scope == "simulation":
            fed, cpus = cfg.federation, os.cpu_count() or 1
            resolve_client_gpus(fed.client_gpus, device, fed.clients_at_once(cpus), cluster=bool(fed.ray_address))
            if fed.resolve_backend(cpus) == "ray":
                check_ray_device(device)
            if fed.ray_address and cfg.model.compute_dtype == "auto":
                log.warning(
                    "model.compute_dtype: auto resolves on each machine of the Ray cluster (%s here, where the"
                    " server evaluates and an export rebuilds the base): a worker that resolves another dtype"
                    " trains on a base rounded differently; set model.compute_dtype to give all one base",
                    dtype,
                )
    except HardwareError as e:
        raise ConfigError(str(e)) from None


_announced: set[tuple[str, str]] = set()


def announce_hardware(cfg: ModelConfig, computes: bool = True) -> ModelConfig:
    """Resolve ``cfg`` for this machine and log the result once per process."""
    resolved = resolve_hardware(cfg, computes)
    key = (resolved.device, resolved.compute_dtype)
    if key not in _announced:
        _announced.add(key)
        log.info(
            "Device %s (model.device=%s, model.compute_dtype=%s)",
            describe(*key),
            cfg.device,
            cfg.compute_dtype,
        )
    return resolved


def load_base_model(
    cfg: ModelConfig, task: str = "causal-lm", labels: tuple[str, ...] = (), computes: bool = True
) -> LoadedModel:
    """Load the frozen, optionally quantized base model and its tokenizer.

    ``task="classification"`` loads a sequence-classification head with one output per name of
    ``labels``, started as ``model.head_init`` says (:func:`init_head_from_labels`, or seeded random);
    the server's initial adapter carries it to every client. ``computes=False``: only its weights are
    read (see :func:`fedslm.hardware.resolve_compute_dtype`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg = announce_hardware(cfg, computes)
    path = resolve_model_dir(cfg)
    map_large_blocks(LOAD_MMAP_THRESHOLD)
    t0 = time.perf_counter()
    tok_dir = path if (path / "tokenizer_config.json").is_file() else bundled_tokenizer_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Any: transformers' from_pretrained wrapper types its first argument as the model (mypy)
    auto: Any = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.compute_dtype]}
    qc = quantization_config(cfg)
    if qc is not None:  # bitsandbytes quantizes while loading, on the target device
        kwargs.update(quantization_config=qc, device_map=cfg.device)
    if task != "causal-lm":
        if len(labels) < 2:
            raise ModelLoadError(f"classification needs at least 2 labels, got {list(labels)}")
        kwargs.update(num_labels=len(labels), pad_token_id=tokenizer.pad_token_id)
    kept = kept_quantized(cfg, path, task)
    with torch.random.fork_rng(), quiet_loading():  # no bar from every Ray worker's load (run.log says "Loaded")
        torch.manual_seed(0)  # a new classification head is initialised identically everywhere
        model = _load_kept(auto, kept, cfg) if kept is not None and is_complete(kept) else None
        if model is None:
            model = auto.from_pretrained(str(path), **kwargs)
            if kept is not None:
                keep_quantized(model, kept, path, replace=kept.exists())
    if task != "causal-lm" and head_init(model_info(cfg), cfg) == "labels":
        init_head_from_labels(model, tokenizer, labels)
    if qc is None and cfg.device != "cpu":
        model.to(cfg.device)  # before get_peft_model, so LoRA is created on it (opacus issue 820)
    if qc is not None and cfg.device == "cpu":  # a GPU's copies are its own already
        own_unquantized_weights(model)
    model.requires_grad_(False)
    keep_4bit_layout_trainable(model)
    contiguous_head_input(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        # non-reentrant: the original graph is kept, so Opacus' backward hooks fire on it (fedslm.training)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    log.info(
        "Loaded %s (%s, %s, %s) in %.1f s",
        path.name,
        cfg.quantization,
        cfg.compute_dtype,
        cfg.device,
        time.perf_counter() - t0,
    )
    release_free_heap()  # quantizing leaves the full-precision weights' pages in glibc's free lists
    map_large_blocks()  # the steps' per-layer temporaries from the heap (no page faults)
    return LoadedModel(model, tokenizer, path, task, cfg.compute_dtype)


def init_head_from_labels(model: Any, tokenizer: Any, labels: tuple[str, ...]) -> None:
    """Start a decoder's classification head as its own answer among ``labels``.

    Row i of the head becomes the output embedding of the first token of ``labels[i]``, so on the
    chat prompt (which ends where the answer starts) the head's logits are the language model's
    next-token logits of the class names: the base model's zero-shot choice from round 0, and the
    fine-tuning objective stays the one it was pretrained on, as Li et al. (ICLR 2022) recommend for DP
    fine-tuning. Measured here (BENCHMARKS.md, issue 17): on the triage classification at epsilon 8,
    with the head frozen, 0.917 against 0.250 for a new random head trained with it. Names that share their
    first token take the mean of all their tokens' embeddings instead. A model whose output
    embeddings are not tied to its input ones (the classification model has no LM head) starts from
    the input embeddings, which is logged.
    """
    head = getattr(model, "score", None)
    if head is None:
        raise ModelLoadError(f"model.head_init: labels needs a decoder's 'score' head; {type(model).__name__} has none")
    ids = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in labels]
    empty = [name for name, i in zip(labels, ids, strict=True) if not i]
    if empty:
        raise ModelLoadError(f"model.head_init: labels: class names {empty} have no tokens")
    if not getattr(model.config, "tie_word_embeddings", False):
        log.info("model.head_init: labels: untied output embeddings; the head starts from the input embeddings")
    embeddings = model.get_input_embeddings().weight
    firsts = [i[0] for i in ids]
    with torch.no_grad():
        if len(set(firsts)) == len(firsts):
            rows = embeddings[firsts]
        else:
            rows = torch.stack([embeddings[i].mean(0) for i in ids])
        head.weight.copy_(rows.to(head.weight.dtype))


MMAP_THRESHOLD = 4 << 20  # bytes, once loaded; glibc's default starts at 128 KiB and rises up to 32 MiB
LOAD_MMAP_THRESHOLD = 1 << 20  # while loading: quantizing leaves fp32 temporaries of every size


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of ``threshold`` bytes and more from their own mappings; False where not set.

    glibc raises its mmap threshold each time a mapped block is freed, so after the first layers
    every temporary comes from the heap, which fragments and keeps growing: fixed at 1 MiB,
    ``bench/lean.py`` (NF4 + fp32 compute, DP at 4 x 128 tokens) measured a training peak of 1.91
    GB against 2.61 and a loading peak of 1.19 against 1.51. But then each per-layer temporary of
    a step (fp32 compute dequantizes each 4-bit weight: 576 x 1536 x 4 bytes = 3.5 MB for SmolLM2;
    a layer's activations are about as large) is a fresh mapping whose pages fault in zeroed:
    loading keeps 1 MiB (:data:`LOAD_MMAP_THRESHOLD`), training and evaluation 4 MiB, which served
    the demo's DP steps 14% faster (the same ten steps on one thread, two runs each, alternated:
    29.5 and 33.0 s against 36.1 and 36.5 s) for a training peak at 4 x 128 of 1.34 GB against
    1.16. A user's own ``MALLOC_MMAP_THRESHOLD_`` is kept.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def release_free_heap() -> bool:
    """Return the heap glibc keeps for reuse to the OS (``malloc_trim(0)``); False where there is no glibc.

    Once, after a load or a round, not per allocation: ``MALLOC_TRIM_THRESHOLD_=0`` has the same effect
    on RSS but makes every training step pay page faults (measured 2x slower, BENCHMARKS.md)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))


def own_unquantized_weights(model: Any) -> int:
    """Copy the floating-point tensors a quantized load left on the checkpoint's memory map; returns how many.

    When the compute dtype equals the checkpoint's (fp32 compute on the fp32 conversion cache),
    ``from_pretrained`` keeps the unquantized tensors (embedding, tied head, norms) zero-copy on the
    file's mmap. That keeps the whole mapping alive, and with it every page read while quantizing:
    SmolLM2 with NF4 + fp32 compute held 0.54 GB of file-backed RSS against 0.13 GB with bf16
    compute. Copying those 113 MB into the process's own memory lets the mapping go (0.97 -> 0.67
    GB RSS once loaded, 0.4 s). The quantized weights (integer storage) were built in memory already.
    """
    copied, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        tensor.data = tensor.data.clone()  # the same Parameter object: tied weights stay tied
        copied += 1
    return copied


def keep_4bit_layout_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers changed.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode rewrites its weight *in place*
    into an inference-only layout. A resident model that alternates between evaluation and
    training (a client that evaluates, the server, a simulated worker) would then train on
    scrambled weights: losses jump from ~4 to ~19 and Opacus' backward hooks receive no gradient.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def contiguous_head_input(model: Any) -> bool:
    """Make the output projection's input contiguous; returns False if the model has no such head.

    Generation projects only the last position (``logits_to_keep=1``): ``hidden[:, -1:, :]``, a
    strided view. ``torch.matmul`` folds a strided 3-d input into one matrix product only when the
    weight requires grad; for a frozen head (every LoRA model) it broadcasts the weight to a batched
    product and copies it once per sequence: batch x vocab x hidden values (16 x 49,152 x 576 in
    bf16 = 0.9 GB for SmolLM2 at the eval batch). A contiguous input of the same values is folded
    into one product (bit-identical logits, and a copy of batch x hidden values).
    """
    head = model.get_output_embeddings()
    if head is None:
        return False
    head.register_forward_pre_hook(_contiguous_first_input)
    return True


def _contiguous_first_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:]) if args else args


class ResidentModels:
    """Base models loaded once per process and reused (across rounds and simulated clients)."""

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], LoadedModel] = {}
        self._lock = threading.Lock()
        self.loads = 0  # how many real loads happened in this process (tests count them)

    def get(self, cfg: ModelConfig, task: str = "causal-lm", labels: tuple[str, ...] = ()) -> LoadedModel:
        cfg = resolve_hardware(cfg)
        key: tuple[Any, ...] = (cfg.name, cfg.quantization, cfg.compute_dtype, cfg.device, cfg.gradient_checkpointing)
        key += (cfg.head_init, task, labels)  # the classification head is part of the loaded model
        with self._lock:
            if key not in self._models:
                self._models.clear()  # one base per process: bounded memory
                self._models[key] = load_base_model(cfg, task, labels)
                self.loads += 1
            return self._models[key]


RESIDENT = ResidentModels()
