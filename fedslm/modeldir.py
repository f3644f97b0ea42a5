"""Cache directories written whole or not at all (fs.atomic_dir) carry a ``.complete`` marker.

It imports nothing else of ours, so ``model`` and ``tiny`` can both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path


def is_complete(path: Path) -> bool:
    """Whether ``path`` was moved into place whole (its builder wrote the marker last)."""
    return (path / ".complete").is_file()
