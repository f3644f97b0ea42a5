"""fedslm: federated, differentially private LoRA fine-tuning of quantized small language models.

This folder is the shared core (what server and clients both use: config, model loading and
quantization, LoRA adapters and their wire format, data, training and privacy); it imports nothing
else of ours. The sides live in the top-level folders ``server/``, ``client/``, ``strategies/`` and
``simulation/`` and are imported as ``fedslm.server`` and so on. An installed wheel maps them here
(``[tool.setuptools.package-dir]``); in a source tree, or a Flower app bundle unpacked on a
SuperLink, they sit beside this folder, and the package path below finds them there.
"""

from __future__ import annotations

from pathlib import Path

_SIDES = ("server", "client", "strategies", "simulation")
_root = Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and all((_root / s / "__init__.py").is_file() for s in _SIDES):
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821 - a package's own __path__
