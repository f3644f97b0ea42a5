"""Logging for fedslm: one logger tree under ``fedslm``, lazy ``%s`` arguments, no prints."""

from __future__ import annotations

import logging
import os

_ROOT = "fedslm"


def get_logger(name: str) -> logging.Logger:
    """A child of the ``fedslm`` logger (``name`` is usually ``__name__``)."""
    return logging.getLogger(name if name == _ROOT or name.startswith(f"{_ROOT}.") else f"{_ROOT}.{name}")


def setup_logging(level: str | int | None = None) -> None:
    """Console logging for the CLI (library code never calls this). ``FEDSLM_LOG`` sets the level."""
    level = level or os.environ.get("FEDSLM_LOG", "INFO")
    root = logging.getLogger(_ROOT)
    if not any(getattr(h, "_fedslm", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._fedslm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
