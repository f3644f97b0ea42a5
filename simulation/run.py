"""``fedslm simulate``: a federation on Flower's simulation engine, with progress and a run dir."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedslm.config import FederationConfig, RunConfig
from fedslm.errors import FedslmError, Interrupted, RunFailedError
from fedslm.fs import check_out_dir, clear_dir
from fedslm.logs import get_logger, run_log

if TYPE_CHECKING:
    from fedslm.server.checkpoint import Checkpoint
    from fedslm.server.preflight import Preflight
    from flwr.app import ConfigRecordValues

log = get_logger(__name__)

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class SimulationError(RunFailedError, RuntimeError):
    """The simulated federation failed; the message carries the server's error."""


class RunDirError(FedslmError, ValueError):
    """A run directory that cannot be used as asked (names it and what to do instead)."""


def check_new_run_dir(
    out_dir: Path, cfg: RunConfig, force: bool = False, config_path: str | Path | None = None
) -> tuple[str, ...]:
    """Refuse an ``--out`` for a new run that is a file or not empty (unless ``force``); returns what
    ``force`` replaces. Never one that holds the config, the data or the model cache the run reads.

    Every run, simulated or deployed, writes ``metrics.jsonl``, ``summary.json`` and ``adapters/``
    into its own folder: a second run there would append to the first one's metrics.
    """
    from fedslm.server.resume import RUN_JSON

    out_dir = Path(out_dir)
    if (out_dir / RUN_JSON).is_file():
        hint = f"it holds a run: `fedslm simulate --resume {out_dir}` continues it; or choose a new folder"
    else:
        hint = "choose a new folder"
    reads = [p for p in (config_path, cfg.data.source, cfg.model.cache_dir, cfg.model.name) if p]
    return check_out_dir(out_dir, force, hint=hint, reads=[p for p in map(Path, reads) if p.exists()])


def read_run_name(run_dir: Path) -> str:
    """The run name recorded in ``run_dir/run.json`` (:mod:`fedslm.server.resume`): what ``--resume``
    continues under."""
    from fedslm.server.resume import RUN_JSON, ResumeError, run_name_of

    if not (Path(run_dir) / RUN_JSON).is_file():
        raise RunDirError(
            f"--resume {run_dir}: no {RUN_JSON}, so it is not a run of `fedslm simulate`;"
            " start a new run with --out NEW_FOLDER"
        )
    try:
        return run_name_of(Path(run_dir))
    except ResumeError as e:
        raise RunDirError(str(e)) from None


def quiet_environment() -> None:
    """No network here: switch off telemetry and update checks (inherited by Ray workers)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def default_out_dir(cfg_name: str) -> Path:
    return Path("runs") / f"{cfg_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def simulate(
    cfg: RunConfig,
    out_dir: Path,
    *,
    run_name: str | None = None,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run the federation described by ``cfg``; returns the per-round metrics rows.

    ``run_name`` keys the clients' persisted state (privacy history, local tensors); it defaults to
    the run directory's name plus a timestamp and is recorded in ``run.json``. ``resume`` continues
    the run in ``out_dir`` from its newest usable checkpoint (same config, same run name). A new run
    needs a new or empty ``out_dir`` (:func:`check_new_run_dir`); ``force`` empties one first.
    """
    quiet_environment()
    out_dir = Path(out_dir).resolve()
    ck = None
    if resume and cfg.security.secure:
        raise SimulationError("security.secure_aggregation runs keep no checkpoints, so they cannot be resumed")
    if resume:
        from fedslm.server.checkpoint import CheckpointError, latest

        run_name = read_run_name(out_dir)
        try:
            ck = latest(out_dir, cfg.to_yaml())
        except CheckpointError as e:
            raise SimulationError(str(e)) from None
        if ck is None:
            raise SimulationError(f"{out_dir} holds no usable checkpoint to resume from")
    else:
        replaced = check_new_run_dir(out_dir, cfg, force)
        if replaced:
            log.warning("--force: replacing %d entries of %s: %s", len(replaced), out_dir, ", ".join(replaced))
            clear_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_log(out_dir / "run.log"):  # every line of this process and of its Ray workers, at DEBUG
        result = _federate(cfg, out_dir, run_name, progress, ck)
    fed = cfg.federation
    if not (out_dir / "summary.json").is_file():
        raise SimulationError(
            f"the federation stopped after {max(len(result) - 1, 0)} of {fed.num_rounds} rounds;"
            f" see {out_dir / 'run.log'} for the server's error; `fedslm simulate --resume {out_dir}` continues it"
        )
    check_trained(result, out_dir)
    return result


def _federate(
    cfg: RunConfig, out_dir: Path, run_name: str | None, progress: bool, ck: Checkpoint | None
) -> list[dict[str, Any]]:
    """Flower's simulation engine on the run directory, on Ray or in this process
    (``federation.backend``); the rows of every round (``ck``'s first)."""
    from fedslm.client.app import app as client_app
    from fedslm.server.app import make_server_app
    from flwr.simulation import run_simulation

    secure = cfg.security.secure
    if secure:  # Flower's SecAgg+ runs in its legacy API: its own server and client apps
        from fedslm.client.secagg import app as client_app
        from fedslm.server.secagg import make_server_app as make_secure_server_app

    fed = cfg.federation
    rows: queue.Queue[dict[str, Any]] = queue.Queue()
    bar = _progress(fed.num_rounds + 1, progress, initial=0 if ck is None else ck.round + 1)
    errors: list[BaseException] = []

    def on_round(row: dict[str, Any]) -> None:
        rows.put(row)
        if bar is not None:
            bar.set_postfix_str(_postfix(row))
            bar.update(1)

    run_name = run_name or f"{out_dir.name}-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    if ck is None:  # a new run claims its folder and names itself once (a resumed one keeps its run.json)
        from fedslm.server.resume import start_run

        start_run(out_dir, run_name, fed.num_clients)
    stop = threading.Event()  # Ctrl-C: the ServerApp stops at its next wait for replies
    if secure:
        server_app = make_secure_server_app(cfg, out_dir, run_name, _guard(on_round, errors))
    else:
        server_app = make_server_app(cfg, out_dir, run_name, _guard(on_round, errors), resume=ck, stop=stop)
    backend = fed.resolve_backend(local_cpus())
    engine: contextlib.AbstractContextManager[Any]
    if backend == "ray":
        backend_config, engine = ray_backend_config(cfg), contextlib.nullcontext()
    else:
        from .inprocess import inprocess_engine

        backend_config, engine = {}, inprocess_engine()
    log.info(
        "Simulating %d clients for %d rounds, %s (run dir %s)",
        fed.num_clients,
        fed.num_rounds,
        engine_line(fed),
        out_dir,
    )
    try:
        with interrupt_stops(stop), engine:
            try:
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=fed.num_clients,
                    backend_config=backend_config,
                )
            except KeyboardInterrupt:
                stop.set()
                raise Interrupted(stopped_message(cfg, out_dir)) from None
    finally:
        if bar is not None:
            bar.close()
    if errors:
        raise SimulationError(f"progress callback failed: {errors[0]}") from errors[0]
    return ([] if ck is None else list(ck.state["rows"])) + list(rows.queue)


@contextlib.contextmanager
def interrupt_stops(stop: threading.Event) -> Iterator[None]:
    """While the block runs, Ctrl-C sets ``stop`` (the ServerApp ends at its next wait for replies)
    and then raises KeyboardInterrupt in the main thread, where Flower's engine shuts Ray down.

    The messages in flight then fail with the actors Ray kills, and Flower logs each one with a
    traceback: that is the interrupt's doing, not news, so Flower's log is quiet until the block
    ends. Where SIGINT is ignored (a background job) or this is not the main thread, nothing changes.
    """
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level

    def on_sigint(signum: int, frame: Any) -> None:
        stop.set()
        flwr_log.setLevel(logging.CRITICAL)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    installed = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, on_sigint) if installed else None
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
        flwr_log.setLevel(level)


def _message_worker(thread: threading.Thread) -> bool:
    """One of the thread pool's workers in which Flower's engine waits on Ray for a client's reply.

    After Ctrl-C, Ray is shut down under it and ``ray.get`` never returns: such a thread writes
    nothing of ours and is not worth waiting for (see :func:`fedslm.simulation.cli.console_main`)."""
    return thread.name.startswith("ThreadPoolExecutor")


def stuck_message_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.is_alive() and not t.daemon and _message_worker(t)]


def stopped_message(cfg: RunConfig, out_dir: Path, wait_s: float = 30.0) -> str:
    """After Ctrl-C: stop Ray, let the ServerApp thread end (a round it was finishing writes its
    checkpoint; one whose replies had not come is dropped), and say what was kept."""
    try:
        import ray

        if ray.is_initialized():  # Flower's engine shuts it down when the interrupt reached its loop
            ray.shutdown()
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: do not wait for Ray
    deadline = time.monotonic() + wait_s
    for thread in threading.enumerate():  # the ServerApp's: it may be writing a checkpoint
        if thread is not threading.main_thread() and not thread.daemon and not _message_worker(thread):
            thread.join(max(0.0, deadline - time.monotonic()))
    if cfg.security.secure:
        return f"stopped; secure-aggregation runs keep no checkpoints, so {out_dir} cannot be resumed"
    from fedslm.server.checkpoint import CheckpointError, latest

    try:
        ck = latest(out_dir, cfg.to_yaml())
    except CheckpointError:
        ck = None
    if ck is None:
        return f"stopped before round 0 was complete; nothing in {out_dir} to resume, start the run again"
    return (
        f"stopped after round {ck.round} of {cfg.federation.num_rounds}; its checkpoint {ck.path} is kept;"
        f" `fedslm simulate --resume {out_dir}` continues from it"
    )


def check_trained(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Refuse a run in which no round trained (:func:`fedslm.server.report.no_round_trained`)."""
    from fedslm.server.report import no_round_trained

    why = no_round_trained(rows, out_dir)
    if why:
        raise SimulationError(why)


def ray_backend_config(cfg: RunConfig) -> dict[str, dict[str, ConfigRecordValues]]:
    """Flower's Ray backend settings: each client's CPU and GPU share, and where Ray runs.

    With ``federation.ray_address`` the simulation attaches to that cluster (``ray start --head``
    on one machine, ``ray start --address=HEAD:PORT`` on the others) and uses its resources; the
    address is checked first, so an unreachable one fails in seconds instead of Ray's long retry.
    """
    fed = cfg.federation
    cpus = local_cpus()
    gpus = fed.client_gpus
    if gpus == "auto":  # the preflight refused an explicit share this machine cannot give
        from fedslm.hardware import resolve_client_gpus, resolve_device  # torch

        at_once = fed.clients_per_round if fed.ray_address else fed.clients_at_once(cpus)
        gpus = resolve_client_gpus("auto", resolve_device(cfg.model.device), at_once)
    resources: dict[str, ConfigRecordValues] = {"num_cpus": fed.client_cpus, "num_gpus": gpus}
    init: dict[str, ConfigRecordValues] = {"include_dashboard": False, "logging_level": "warning"}
    if fed.ray_address:
        check_reachable(fed.ray_address, "federation.ray_address")
        init = {"address": fed.ray_address, "logging_level": "warning"}
    else:
        resources["num_cpus"] = min(fed.client_cpus, cpus)
        init["num_cpus"] = cpus
    return {"client_resources": resources, "init_args": init}


def check_reachable(address: str, key: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`SimulationError` naming ``key`` unless something listens at ``host:port``."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as e:
        raise SimulationError(
            f"{key}: nothing answers at {address} ({e.strerror or e}); start the cluster with"
            f" `ray start --head --port={port}` or clear the key to run Ray locally"
        ) from None


def _guard(fn: Any, errors: list[BaseException]) -> Any:
    def wrapped(row: dict[str, Any]) -> None:
        try:
            fn(row)
        except Exception as e:  # noqa: BLE001 - a progress bar must never kill the run
            errors.append(e)

    return wrapped


def _progress(total: int, enabled: bool, initial: int = 0) -> Any:
    """The one progress display: rounds done (round 0 is the initial evaluation), time left, and the
    last round's loss, accuracy and epsilon."""
    if not enabled:
        return None
    from tqdm import tqdm

    fmt = "{desc} {bar:20} {n_fmt}/{total_fmt} [{elapsed}, {remaining} left]{postfix}"
    return tqdm(total=total, initial=initial, desc=f"rounds 0-{total - 1}", unit="round", bar_format=fmt)


def _postfix(row: dict[str, Any]) -> str:
    parts = [f"round {row['round']}:"]
    if row.get("eval_loss") is not None:
        parts.append(f"loss {row['eval_loss']:.3f}")
    if row.get("eval_accuracy") is not None:
        parts.append(f"accuracy {row['eval_accuracy']:.3f}")
    if row.get("epsilon_max") is not None:
        parts.append(f"epsilon {row['epsilon_max']:.2f}")
    return " ".join(parts)


def plan_block(checked: Preflight, out_dir: Path) -> str:
    """The plan at start, in one block: model, device and compute dtype, clients, rounds and strategy,
    privacy (the budget and noise), and where the run directory and its ``run.log`` are."""
    from fedslm.hardware import describe
    from fedslm.model import resolve_hardware  # torch

    cfg, info = checked.cfg, checked.model
    hw = resolve_hardware(cfg.model)
    fed, lora = cfg.federation, cfg.lora
    model = f"{info.name} ({info.model_type})" if info is not None else cfg.model.name
    targets = ", ".join(checked.lora_targets) or "-"
    if lora.last_layers:
        targets += f" of the last {lora.last_layers} layers"
    records = ", ".join(str(n) for n in checked.client_records) or "-"
    rows = [
        ("model", f"{model}, quantization {cfg.model.quantization}, LoRA r={lora.r} on {targets}"),
        ("device", describe(hw.device, hw.compute_dtype)),
        (
            "clients",
            f"{fed.num_clients} (training records {records}; {checked.test_records} held out for evaluation),"
            f" {engine_line(fed)}",
        ),
        ("rounds", f"{fed.num_rounds}, strategy {cfg.strategy.name}, at least {fed.min_train_clients} clients a round"),
        ("privacy", _privacy_line(checked)),
        ("run dir", f"{out_dir} (every log line: run.log)"),
    ]
    return "\n".join(f"{key:<8} {value}" for key, value in rows)


def local_cpus() -> int:
    """The CPUs a simulation on this machine has (Ray's default, and what ``auto`` resolves by)."""
    return os.cpu_count() or 2


def engine_line(fed: FederationConfig) -> str:
    """Where the clients run (``federation.backend`` resolved on this machine), for the plan."""
    cpus = local_cpus()
    if fed.resolve_backend(cpus) == "inprocess":
        return "one at a time in this process"
    if fed.ray_address:
        return f"on the Ray cluster at {fed.ray_address}"
    return f"up to {fed.clients_at_once(cpus)} at a time in Ray workers"


def _privacy_line(checked: Preflight) -> str:
    from fedslm.plan import plan_line

    p = checked.cfg.privacy
    parts = []
    if p.local and checked.privacy_plans:
        parts.append(f"local DP, {plan_line(list(checked.privacy_plans), p)}")
    if p.central:
        parts.append(
            f"central DP, noise multiplier {p.central_noise_multiplier:g}, clipping norm"
            f" {p.central_clipping_norm:g}, delta {p.central_delta:g}"
        )
    return "; ".join(parts) or "none (no differential privacy)"


def results_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the per-round metrics."""
    cols = [
        ("round", "{:d}"),
        ("train_loss", "{:.4f}"),
        ("eval_loss", "{:.4f}"),
        ("eval_accuracy", "{:.3f}"),
        ("epsilon_max", "{:.3f}"),
        ("clients", "{:d}"),
        ("bytes_up", "{:,d}"),
        ("bytes_down", "{:,d}"),
        ("wall_s", "{:.1f}"),
    ]
    cells = [[name for name, _ in cols]]
    for r in rows:
        cells.append(["-" if r.get(n) is None else f.format(r[n]) for n, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
