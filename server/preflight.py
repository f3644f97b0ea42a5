"""The one preflight: a whole run checked before Ray, Flower or a model process starts.

:mod:`fedslm.config` describes and checks settings one section at a time (and the few rules between
sections that need nothing else); a client reads its run config with it and nothing more. This
module checks the run as a whole, cheapest first, each error naming the config file and the key
(or the data file and line) and what is allowed:

1. the strategy: its name, its parameters' names and types against its constructor, then the
   strategy is built (its constructor checks the values), secure-aggregation and central-DP rules;
2. the data, loaded and partitioned for every simulated client by the code the clients run
   (:func:`fedslm.data.client_partitions`): a client left without training records is refused,
   naming it and the partitioner setting;
3. the model, located and its architecture read from its config or GGUF header (never its
   weights), and the LoRA target modules checked against that architecture;
4. this machine's hardware (imports torch, so it comes last).

``fedslm check`` and ``fedslm simulate`` run all of it (``scope="simulation"``), the ServerApp of a
deployed run all but the client partitions (``"server"``: each node brings its own file),
``fedslm run`` the config part (``"config"``: data and model live on the SuperLink machine), and
``fedslm node`` :func:`preflight_node` on its own data file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedslm.strategies.registry import check_strategy_config

from fedslm import data as data_mod
from fedslm.config import ConfigError, RunConfig, client_profile, config_from_dict, load_config
from fedslm.data import DataError
from fedslm.modelinfo import ModelInfo, ModelLoadError, cache_root, check_lora_targets, head_init, model_info
from fedslm.plan import ClientPlan, check_privacy_plan, plan_line

Scope = Literal["config", "server", "simulation"]


@dataclass(frozen=True)
class Preflight:
    """What the preflight checked, for ``fedslm check`` to show."""

    cfg: RunConfig
    model: ModelInfo | None = None
    lora_targets: tuple[str, ...] = ()
    client_records: tuple[int, ...] = ()  # training records of each simulated client, by id
    test_records: int = 0  # the server's held-out split
    privacy_plans: tuple[ClientPlan, ...] = ()  # local DP: each simulated client's calibration

    def summary(self) -> list[str]:
        lines = []
        if self.model is not None:
            lines.append(f"model {self.model.name}: {self.model.model_type}, LoRA on {list(self.lora_targets)}")
        if self.client_records:
            counts = ", ".join(str(n) for n in self.client_records)
            lines.append(f"training records per client: {counts}; held-out test records: {self.test_records}")
        if self.privacy_plans:
            lines.append(f"local DP: {plan_line(list(self.privacy_plans), self.cfg.privacy)}")
        return lines


def preflight(cfg: RunConfig, source: str = "<config>", scope: Scope = "simulation") -> Preflight:
    """Check ``cfg`` as a run; raise a :class:`fedslm.errors.FedslmError` naming ``source`` and the key."""
    try:
        check_strategy_config(cfg)
        report = Preflight(cfg)
        if scope != "config":
            report = _check_data(cfg, scope)
            info = model_info(cfg.model)
            targets = check_lora_targets(info, cfg.lora, cfg.task)
            if cfg.task == "classification":
                head_init(info, cfg.model)
            report = dataclasses.replace(report, model=info, lora_targets=tuple(targets))
        if scope == "simulation":  # an infeasible budget or batch, per client (the data, no model)
            report = dataclasses.replace(report, privacy_plans=tuple(check_privacy_plan(cfg, cache_root(cfg.model))))
        from fedslm.model import check_run_hardware  # torch

        check_run_hardware(cfg, scope)
    except (ConfigError, DataError, ModelLoadError) as e:
        raise type(e)(f"{source}: {e}") from None
    return report


def _check_data(cfg: RunConfig, scope: Scope) -> Preflight:
    d = cfg.data
    records = data_mod.load_records(d, cache_root(cfg.model))
    train_idx, test_idx = data_mod.split(records, d)
    if cfg.task == "classification":
        _check_labels(cfg, records)
    parts: list[list[dict[str, Any]]] = []
    if scope == "simulation":
        parts = data_mod.client_partitions(d, cache_root(cfg.model), cfg.federation.num_clients, records)
        if cfg.audit.enabled:
            from fedslm.audit import check_canary_cap  # numpy, scipy: only for an audited run

            check_canary_cap(cfg, [len(p) for p in parts])
    test = min(len(test_idx), d.eval_size) if d.eval_size else len(test_idx)
    return Preflight(cfg, client_records=tuple(len(p) for p in parts), test_records=test)


def _check_labels(cfg: RunConfig, records: list[dict[str, Any]]) -> None:
    """Classification: every record's label is one of the class names (what the clients would refuse)."""
    d = cfg.data
    names = set(data_mod.label_names(d, records))
    for number, rec in enumerate(records, start=1):
        if str(rec.get(d.label_column)) not in names:
            raise DataError(
                f"data.source {d.source!r}, record {number}: label {rec.get(d.label_column)!r} of column"
                f" {d.label_column!r} (data.label_column) is not one of data.labels {sorted(names)}"
            )


def preflight_node(
    data: Path, cfg: RunConfig | None = None, source: str = "<config>", client_id: int = 0, profile: str = ""
) -> int:
    """``fedslm node``: its data file read as its clients will read it; returns its record count.

    With the run's config (``fedslm node --config``) the file is checked against the run's columns,
    the profile against ``clients.profiles`` and the model and LoRA targets as the node will load
    them; without it, the file is parsed (JSONL/CSV lines, file:line errors) and must hold records.
    """
    if cfg is None:
        records, _ = data_mod.read_records(str(data))
        if not records:
            raise DataError(f"--data {data}: no records")
        return len(records)
    try:
        client_profile(cfg, client_id, profile)
        node_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(data)))
        records = data_mod.load_records(node_cfg.data, cache_root(cfg.model))
        if cfg.task == "classification":
            _check_labels(node_cfg, records)
        info = model_info(cfg.model)
        check_lora_targets(info, cfg.lora, cfg.task)
        if cfg.task == "classification":
            head_init(info, cfg.model)
    except (ConfigError, DataError, ModelLoadError) as e:
        raise type(e)(f"{source}: {e}") from None
    return len(records)


def validate_run(cfg: RunConfig, source: str = "<config>", scope: Scope = "simulation") -> RunConfig:
    """:func:`preflight`, returning the config."""
    return preflight(cfg, source, scope).cfg


def load_run(path: str | Path, overrides: list[str] | None = None, scope: Scope = "simulation") -> RunConfig:
    """:func:`fedslm.config.load_config`, then :func:`preflight`."""
    return validate_run(load_config(path, overrides), str(path), scope)


def run_from_dict(raw: dict[str, Any], source: str = "<dict>", scope: Scope = "simulation") -> RunConfig:
    """:func:`fedslm.config.config_from_dict`, then :func:`preflight`."""
    return validate_run(config_from_dict(raw, source), source, scope)
