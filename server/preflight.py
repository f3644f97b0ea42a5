"""A whole run checked before anything starts: what no single config section can check alone.

:mod:`fedslm.config` describes and checks settings one section at a time (and the few rules between
sections that need nothing else); a client reads its run config with it and nothing more. This
module checks the run as a whole against the strategy registry (name, parameter names, mixed ranks,
secure-aggregation and central-DP compatibility) and this machine's hardware. ``fedslm check``,
``fedslm simulate``, ``fedslm run`` and the ServerApp all go through :func:`validate_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedslm.strategies.registry import check_strategy_config

from fedslm.config import ConfigError, RunConfig, config_from_dict, load_config
from fedslm.model import check_run_hardware


def validate_run(cfg: RunConfig, source: str = "<config>") -> RunConfig:
    """Raise :class:`ConfigError` naming ``source`` and the key for anything that cannot run."""
    try:
        check_strategy_config(cfg)
        check_run_hardware(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_run(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """:func:`fedslm.config.load_config`, then :func:`validate_run`."""
    return validate_run(load_config(path, overrides), str(path))


def run_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """:func:`fedslm.config.config_from_dict`, then :func:`validate_run`."""
    return validate_run(config_from_dict(raw, source), source)
