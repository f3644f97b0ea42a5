"""Server checkpoints: everything needed to continue a run after the last complete round.

One directory per round under ``<run>/checkpoints/``, written to a temporary directory and renamed
into place (a killed write leaves no ``round-NNN``), holding

- ``tensors.safetensors``: the global adapter (``adapter/<key>``) and the strategy's arrays
  (server optimizer moments ...), never pickled;
- ``state.json``: round, strategy state (sampling RNG ...), who has spent their privacy budget,
  per-client epsilons, the metrics rows so far and the config's digest;
- ``MANIFEST.json``: the SHA-256 of both files.

:func:`latest` returns the newest checkpoint whose manifest matches; a corrupt or partial one is
refused with a warning and the one before it used. The two newest are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedslm.errors import FedslmError
from fedslm.logs import get_logger

log = get_logger(__name__)

FORMAT = 1
KEEP = 2


class CheckpointError(FedslmError, RuntimeError):
    """A checkpoint that cannot be used (missing file, digest mismatch, other config)."""


@dataclass
class Checkpoint:
    round: int
    adapter: dict[str, np.ndarray]
    strategy: dict[str, Any]  # arrays restored in place of their placeholders
    state: dict[str, Any]  # federation bookkeeping (rows, epsilons, exhausted clients)
    path: Path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_digest(cfg_yaml: str) -> str:
    return hashlib.sha256(cfg_yaml.encode()).hexdigest()[:16]


def _split(obj: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """Replace every numpy array in a nested dict/list by ``{"__array__": name}``."""
    if isinstance(obj, np.ndarray):
        name = f"strategy/{prefix}"
        arrays[name] = np.ascontiguousarray(obj)
        return {"__array__": name}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", arrays) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            if obj["__array__"] not in arrays:
                raise CheckpointError(f"strategy array {obj['__array__']!r} missing from tensors.safetensors")
            return arrays[obj["__array__"]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def save(
    run_dir: Path, rnd: int, adapter: dict[str, np.ndarray], strategy: dict[str, Any], state: dict[str, Any]
) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    arrays = {f"adapter/{k}": np.ascontiguousarray(v) for k, v in adapter.items()}
    strategy_json = _split(strategy, "s", arrays)
    tmp = Path(tempfile.mkdtemp(prefix=f".round-{rnd:03d}.", dir=root))
    try:
        save_file(arrays, str(tmp / "tensors.safetensors"))
        body = {"format": FORMAT, "round": rnd, "strategy": strategy_json, "state": state}
        (tmp / "state.json").write_text(json.dumps(body, allow_nan=True))
        manifest = {name: _sha256(tmp / name) for name in ("tensors.safetensors", "state.json")}
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest))
        final = root / f"round-{rnd:03d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(root.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        manifest = json.loads((path / "MANIFEST.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no readable MANIFEST.json ({e})") from None
    for name in ("tensors.safetensors", "state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{name} is missing")
        if _sha256(path / name) != manifest.get(name):
            raise CheckpointError(f"{name} does not match its SHA-256 in MANIFEST.json")
    body = json.loads((path / "state.json").read_text())
    if body.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {body.get('format')!r}, this fedslm reads {FORMAT}")
    arrays = load_file(str(path / "tensors.safetensors"))
    adapter = {k.removeprefix("adapter/"): v for k, v in arrays.items() if k.startswith("adapter/")}
    return Checkpoint(int(body["round"]), adapter, _join(body["strategy"], arrays), body["state"], path)


def latest(run_dir: Path, cfg_yaml: str) -> Checkpoint | None:
    """The newest usable checkpoint of ``run_dir`` for this config, or None if there is none."""
    root = Path(run_dir) / "checkpoints"
    for path in sorted(root.glob("round-*"), reverse=True):
        try:
            ck = load(path)
        except CheckpointError as e:
            log.warning("checkpoint %s refused: %s; trying the one before", path.name, e)
            continue
        if ck.state.get("config_digest") != config_digest(cfg_yaml):
            raise CheckpointError(f"{path} was written by another run config; resume with that run's config.yaml")
        return ck
    return None
