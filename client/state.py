"""Per-client state that must outlive a round and a process: privacy history, local LoRA tensors.

Simulation actors are recycled and real nodes restart, so this lives in files (one directory per
client and run), written atomically: tensors as safetensors here, the privacy history as JSON
(:mod:`fedslm.privacy`). Never pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedslm.errors import FedslmError
from fedslm.fs import atomic_file


class ClientStateError(FedslmError, RuntimeError):
    """A client's saved state is unreadable (it is never silently reset: that could reset a budget)."""


class ClientStore:
    """Tensor files of one client in one run: ``<root>/<name>.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _atomic(self, path: Path, write: Any) -> None:
        with atomic_file(path) as tmp:
            write(str(tmp))

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self._atomic(self.root / f"{name}.safetensors", lambda t: save_file(data, t))

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.root / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ClientStateError(f"{path} is corrupt ({e}); restore it or start a new run") from None
