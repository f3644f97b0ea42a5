"""Cache directories written whole or not at all: a temp dir beside the target, moved into place.

Used by the model cache (converted GGUFs, tiny random models); it imports nothing else of ours, so
``model`` and ``tiny`` can both use it without importing each other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def atomic_dir(target: Path) -> tuple[Path, Any]:
    """A temp dir beside ``target`` and a function that moves it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))

    def commit() -> None:
        (tmp / ".complete").write_text(str(time.time()))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)

    return tmp, commit


def is_complete(path: Path) -> bool:
    """Whether ``path`` was moved into place by :func:`atomic_dir`'s commit."""
    return (path / ".complete").is_file()
