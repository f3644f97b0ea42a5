"""The fedslm ServerApp (``flwr run .`` loads ``app``; ``fedslm simulate`` builds its own).

``[tool.flwr.app.config]`` in pyproject.toml names the run's YAML (``config``) and the run
directory (``out-dir``); ``flwr run . --run-config 'config="configs/tiny.yaml"'`` picks another.
``resume`` (``fedslm run --resume RUN_DIR``) continues the run in that directory from its last
complete checkpoint, under the run name of its ``run.json``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedslm.config import ConfigError, RunConfig
from fedslm.errors import RunFailedError
from fedslm.grid import GridView
from fedslm.logs import get_logger, run_log

from . import audit
from .checkpoint import Checkpoint
from .federation import Federation
from .preflight import load_run
from .recording import RoundCallback
from .report import no_round_trained, write_results
from .resume import note_flower_run, resume_point, start_run

log = get_logger(__name__)


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    out_dir: Path,
    run_name: str,
    on_round: RoundCallback | None = None,
    resume: Checkpoint | None = None,
) -> list[dict[str, Any]]:
    """One federation on ``grid``: its rounds, results and audit; returns the metrics rows."""
    if cfg.security.secure:
        raise ConfigError(
            f"security.secure_aggregation {cfg.security.secure_aggregation!r} runs on Flower's legacy SecAgg+"
            " workflow, not on this ServerApp: use `fedslm simulate`, or for `flwr run` set"
            ' [tool.flwr.app.components] serverapp = "fedslm.server.secagg:app" and'
            ' clientapp = "fedslm.client.secagg:app"'
        )
    federation = Federation(cfg, out_dir, run_name, on_round)
    audit.start(out_dir, cfg)
    rows = federation.run(grid, resume)
    write_results(out_dir, cfg, rows, clients=federation.privacy_by_client)
    if cfg.audit.enabled:
        audit.score(out_dir)
    return rows


def make_server_app(
    cfg: RunConfig,
    out_dir: Path,
    run_name: str,
    on_round: RoundCallback | None = None,
    resume: Checkpoint | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp bound to an already validated config (the simulation engine passes no run config);
    setting ``stop`` ends it at its next wait for replies (:class:`fedslm.grid.GridView`)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        view = grid if stop is None else cast(Grid, GridView(grid, stop=stop))
        run_federation(view, cfg, out_dir, run_name, on_round, resume)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out, run_name, resume = deployed_run(context)
    with run_log(out / "run.log"):  # the deployed ServerApp's every line, as a simulation's (appended on resume)
        rows = run_federation(grid, cfg, out, run_name, resume=resume)
        why = no_round_trained(rows, out)
        if why:  # the run ends failed (Flower: finished:failed), with the clients' reason, not as a result
            log.error("%s", why)
            raise RunFailedError(why)


def deployed_run(context: Context) -> tuple[RunConfig, Path, str, Checkpoint | None]:
    """(config, run directory, run name, checkpoint to continue from) of a ``flwr run``.

    A new run claims its directory (one that holds a run is refused) and writes ``run.json`` once;
    with ``resume`` the run's own config, name and last complete checkpoint are used, and a
    ``config`` given with it must be the run's (:func:`fedslm.server.resume.resume_point`).
    """
    rc = context.run_config
    resume = str(rc.get("resume", "")).strip()
    if not resume:
        cfg, out, run_name = config_from_context(context)
        start_run(out, run_name, cfg.federation.num_clients, context.run_id)
        return cfg, out, run_name, None
    out = _run_dir(resume)
    given = config_from_context(context)[0] if str(rc.get("config", "")).strip() else None
    point = resume_point(out, given, source=f"run config {rc.get('config')!r}")
    note_flower_run(out, context.run_id)  # `fedslm run --resume` stops this one if it dies in turn
    return point.cfg, out, point.run_name, point.checkpoint


def config_from_context(context: Context) -> tuple[RunConfig, Path, str]:
    """(config, run directory, a new run name) from ``[tool.flwr.app.config]`` / ``--run-config``."""
    rc = context.run_config
    here = Path(__file__).resolve().parent.parent
    path = Path(str(rc.get("config", "configs/demo.yaml")))
    if not path.is_absolute():
        path = here / path
    overrides = [s for s in str(rc.get("set", "")).split(",") if s.strip()]
    cfg = load_run(path, overrides, scope="server")  # the nodes bring their own data files
    out = _run_dir(str(rc.get("out-dir", "runs/flwr-run")))
    return cfg, out, f"{out.name}-{int(time.time())}"


def _run_dir(value: str) -> Path:
    out = Path(value).expanduser()
    return out if out.is_absolute() else Path.cwd() / out
