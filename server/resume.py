"""A run directory's identity and the point a stopped run continues from.

``run.json`` names the run once, when it starts (``run_name`` keys every client's persisted state:
its privacy ledger, its local tensors). A resumed run reads the same name back, so the clients find
their ledgers and their epsilon continues instead of starting again at 0. :func:`resume_point`
checks, before anything is started, that the directory holds a run, that a config given for the
resume is the run's own (a difference is refused, naming the first key) and that a complete
checkpoint exists. ``run.json`` also lists the Flower run ids that worked on the run (a deployed
run's ServerApp adds its own), so that a resume can stop the one a crash left behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedslm.config import ConfigError, RunConfig
from fedslm.errors import FedslmError
from fedslm.fs import atomic_write

from .checkpoint import Checkpoint, latest
from .preflight import Scope, load_run

RUN_JSON = "run.json"


class ResumeError(FedslmError, RuntimeError):
    """A run directory that cannot be started into or resumed; the message says which and why."""


@dataclass(frozen=True)
class ResumePoint:
    cfg: RunConfig  # the run's own config (``config.yaml`` of the run directory)
    checkpoint: Checkpoint  # the last complete round
    run_name: str  # from ``run.json``: the clients' state is kept under it


def start_run(out: Path, run_name: str, num_clients: int, flower_run: int | None = None) -> None:
    """Claim ``out`` for a new run: refuse one that already holds a run, write ``run.json`` once
    (``flower_runs``: the Flower run ids that have worked on it, this one first)."""
    if (out / "metrics.jsonl").exists() or (out / RUN_JSON).exists():
        raise ResumeError(f"{out} already holds a run; pass another --out, or continue it with --resume {out}")
    out.mkdir(parents=True, exist_ok=True)
    body = {"run_name": run_name, "num_clients": num_clients, "flower_runs": [] if flower_run is None else [flower_run]}
    atomic_write(out / RUN_JSON, json.dumps(body))


def _run_json(out: Path) -> dict[str, Any]:
    path = out / RUN_JSON
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        name = body["run_name"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if not isinstance(name, str) or not name:
        raise ResumeError(
            f"{path}: no run_name in it; it is damaged, so this run cannot be resumed (the name keys the"
            " clients' privacy ledgers: restore the file)"
        )
    return dict(body)


def run_name_of(out: Path) -> str:
    return str(_run_json(out)["run_name"])


def last_flower_run(out: Path) -> int | None:
    """The Flower run id that worked on ``out`` last (a deployed run's; None for a simulation's)."""
    runs = _run_json(out).get("flower_runs") or []
    return int(runs[-1]) if runs else None


def note_flower_run(out: Path, flower_run: int) -> None:
    """Record that Flower run ``flower_run`` now continues the run in ``out`` (its name unchanged)."""
    body = _run_json(out)
    body["flower_runs"] = [*body.get("flower_runs", []), flower_run]
    atomic_write(out / RUN_JSON, json.dumps(body))


def config_differences(run_yaml: str, given_yaml: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in the run, value given) for every key where two configs' YAML differ."""
    return sorted(_diff(yaml.safe_load(run_yaml) or {}, yaml.safe_load(given_yaml) or {}, ""))


def _diff(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def resume_point(
    out: Path, given: RunConfig | None = None, source: str = "CONFIG", scope: Scope = "server"
) -> ResumePoint:
    """Where the run in ``out`` continues; ``given`` (a config passed with the resume) must be the run's."""
    config = out / "config.yaml"
    if not config.is_file():
        raise ResumeError(f"--resume {out}: no config.yaml there; give the directory of a run that was started")
    cfg = load_run(config, scope=scope)
    if given is not None:
        diffs = config_differences(cfg.to_yaml(), given.to_yaml())
        if diffs:
            key, was, now = diffs[0]
            more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
            raise ConfigError(
                f"{source}: {key} is {now!r}, the run in {out} has {was!r}{more}; a run cannot change its"
                f" config halfway: resume with the run's settings, or leave CONFIG and --set out to use {config}"
            )
    if cfg.security.secure:
        raise ResumeError(f"{out}: security.secure_aggregation runs keep no checkpoints, so they cannot be resumed")
    run_name = run_name_of(out)
    ck = latest(out, cfg.to_yaml())
    if ck is None:
        raise ResumeError(f"{out} holds no complete checkpoint (checkpoints/round-NNN) to resume from; start it again")
    return ResumePoint(cfg, ck, run_name)
