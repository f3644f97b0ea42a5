"""The ``fedslm`` command: one subcommand per job; each lives in the module that does the work."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from fedslm.server.preflight import load_run, preflight

from fedslm.config import load_config
from fedslm.errors import FedslmError, Interrupted, UsageError
from fedslm.logs import VERBOSE_ENV, get_logger, setup_logging

Handler = Callable[[argparse.Namespace], int]
log = get_logger(__name__)


def _simulate(args: argparse.Namespace) -> int:
    from .run import check_new_run_dir, default_out_dir, plan_block, read_run_name, results_table, simulate

    # every check below fails before anything heavy starts
    if args.resume:  # the run's own config; --set is not allowed to change a run halfway
        if args.config or args.set or args.out or args.ray_address or args.force:
            drop = "CONFIG/--set/--out/--ray-address/--force"
            raise UsageError(f"--resume RUN_DIR takes the run's config.yaml; drop {drop}")
        out = Path(args.resume)
        cfg = load_config(out / "config.yaml")
        read_run_name(out)
        checked = preflight(cfg, str(out / "config.yaml"))
    else:
        if not args.config:
            raise UsageError("give a CONFIG (e.g. configs/demo.yaml) or --resume RUN_DIR")
        sets = list(args.set) + ([f"federation.ray_address={args.ray_address}"] if args.ray_address else [])
        cfg = load_config(args.config, sets)
        out = Path(args.out) if args.out else default_out_dir(Path(args.config).stem)
        check_new_run_dir(out, cfg, args.force, args.config)
        checked = preflight(cfg, args.config)
    cfg = checked.cfg
    print(plan_block(checked, out.resolve()), flush=True)
    rows = simulate(cfg, out, progress=not args.no_progress, resume=bool(args.resume), force=args.force)
    print()
    print(results_table(rows))
    first, last = rows[0], rows[-1]
    print(
        f"\naccuracy {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f}, "
        f"eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}"
        + (f", epsilon (max client) {last['epsilon_max']:.3f}" if last.get("epsilon_max") is not None else "")
    )
    if last.get("per_client"):
        sites = ", ".join(f"client {k} {v['eval_accuracy']:.3f}" for k, v in sorted(last["per_client"].items()))
        print(f"global adapter on each client's own validation data (accuracy): {sites}")
    if (out / "audit.json").is_file():
        from fedslm.server.audit import table_line

        print(table_line(json.loads((out / "audit.json").read_text())))
    print(f"run directory: {out} (metrics.jsonl, summary.json, metrics.png, adapters/)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedslm.server.audit import score, table_line

    # main prints an AuditError (missing, partial or unaudited run) as one line, exit 2, and a
    # PrivacyAuditFailure (the bound exceeds the accountant's epsilon) as one line, exit 1
    result = score(Path(args.run_dir))
    print(table_line(result))
    print(f"written: {Path(args.run_dir) / 'audit.json'}, {Path(args.run_dir) / 'audit-roc.png'}")
    return 0


def _strategies(args: argparse.Namespace) -> int:
    from fedslm.strategies.registry import available

    specs = available()
    width = max(len(s.name) for s in specs)
    for s in specs:
        params = ", ".join(s.params()) or "-"
        print(f"{s.name.ljust(width)}  {s.description}\n{' ' * width}  params: {params}")
    return 0


def _check(args: argparse.Namespace) -> int:
    checked = preflight(load_config(args.config, args.set), args.config)  # what `simulate` checks
    cfg = checked.cfg
    print(cfg.to_yaml())
    for line in checked.summary():
        print(f"# {line}")
    from fedslm.model import resolve_hardware  # torch: after the checks

    hw = resolve_hardware(cfg.model)
    print(f"# on this machine: model.device -> {hw.device}, model.compute_dtype -> {hw.compute_dtype}")
    return 0


def _privacy_plan_cli(args: argparse.Namespace) -> int:
    from fedslm.plan import plan_report

    checked = preflight(load_config(args.config, args.set), args.config)  # the plans are part of it
    if not checked.cfg.privacy.local:
        print(f"{args.config}: privacy.mode is {checked.cfg.privacy.mode!r}, no local DP: nothing to plan")
        return 0
    from fedslm.strategies.registry import build

    from fedslm.modelinfo import lora_parameter_count, model_info
    from fedslm.protocol import LoRAPlan

    cfg = checked.cfg
    train_a = LoRAPlan.from_record(build(cfg).client_config(1)).train_lora_a  # FFA-LoRA trains B only
    info = checked.model if checked.model is not None else model_info(cfg.model)
    targets = list(checked.lora_targets)
    trainable = lora_parameter_count(info, cfg.lora.r, targets, cfg.task, train_a, cfg.lora.last_layers)
    print("\n".join(plan_report(cfg, list(checked.privacy_plans), trainable, train_a)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedslm.export import export

    result = export(Path(args.run_dir), Path(args.out), args.format, args.round, args.quant, args.force)
    if result.replaced:
        print(f"--force: replaced {len(result.replaced)} entries of {args.out}: {', '.join(result.replaced)}")
    print(f"{result.format} export written to {result.path}")
    print(
        f"verified against the trained model (quantized base + adapter): max |logit difference|"
        f" {result.max_abs_logit_diff:.3g} (tolerance {result.tolerance})"
    )
    if result.original_base_diff is not None:
        print(f"(merged into the original float base instead, it would be {result.original_base_diff:.3g})")
    return 0 if args.no_task_check else _export_task_check(args, result)


def _export_task_check(args: argparse.Namespace, result: Any) -> int:
    """Score the export by task in its runtime; exit 1 (one line, both numbers) when it differs from the run's."""
    from fedslm.export_runtime import RuntimeMissing, check_task

    assert result.round is not None  # set by export()
    try:
        task = check_task(Path(args.run_dir), result.format, result.quant, result.path, result.round)
    except RuntimeMissing as e:
        print(f"task check skipped (the logit check above passed): {e}")
        return 0
    if not task.ok:
        print(f"fedslm export: {task.line()} (the export is kept at {result.path})", file=sys.stderr)
        return 1
    print(task.line())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedslm.chat import ChatModel

    model = ChatModel(Path(args.run_dir), args.round)
    for piece in model.stream([{"role": "user", "content": args.prompt}], args.max_new_tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from fedslm.chat import ChatModel

    model = ChatModel(Path(args.run_dir), args.round)
    history: list[dict[str, str]] = []
    print("fedslm chat: empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        answer = ""
        for piece in model.stream(history, args.max_new_tokens):
            print(piece, end="", flush=True)
            answer += piece
        print()
        history.append({"role": "assistant", "content": answer})
    return 0


# -- real deployment on Flower's runtime (fedslm/deploy.py, client/node.py) --------------------


def _certs(args: argparse.Namespace) -> int:
    from fedslm.deploy import write_certificates

    paths = write_certificates(Path(args.out), args.nodes, args.host, args.days, args.force)
    print(f"CA, SuperLink certificate and {args.nodes} node keys written to {paths.root}")
    print(f"SuperLink machine: {paths.root} (keep ca.key there, or offline); node K: ca.crt and nodes/node-K.key")
    return 0


def _server(args: argparse.Namespace) -> int:
    from fedslm.deploy import (
        CertPaths,
        connect_address,
        deploy_env,
        flwr_home,
        register_nodes,
        superlink_argv,
        wait_for_port,
        write_connection,
    )

    paths = CertPaths(Path(args.certs).resolve()) if args.certs else None
    if paths is not None and not args.insecure:
        paths.check_server()
    argv = superlink_argv(paths.root if paths else None, args.address, args.insecure, args.database)
    env = deploy_env()
    env["FLWR_HOME"] = str(flwr_home(env))
    local = connect_address(args.address)

    def after_start(proc: subprocess.Popen[bytes]) -> None:
        wait_for_port(local, args.start_timeout, alive=lambda: proc.poll() is None)
        ca = paths.ca_cert if paths and not args.insecure else None
        config = write_connection(Path(env["FLWR_HOME"]), args.connection, local, ca, args.insecure)
        if paths is not None and not args.insecure and not args.no_register:
            register_nodes(paths.public_keys, args.connection, env)
        log.info("SuperLink up on %s; `flwr ... %s` uses it (%s)", args.address, args.connection, config)

    return run_foreground_cli(argv, env, after_start)


def _register(args: argparse.Namespace) -> int:
    from fedslm.deploy import deploy_env, flwr_home, register_nodes

    env = deploy_env()
    env["FLWR_HOME"] = str(flwr_home(env))
    for key in args.public_key:
        register_nodes(Path(key), args.connection, env)
    return 0


def _node(args: argparse.Namespace) -> int:
    from fedslm.client.node import NodeSpec, check_node_files, client_id_from_key, resident_worker, supernode_argv

    from fedslm.deploy import CertPaths, deploy_env

    key = Path(args.key).resolve() if args.key else None
    client_id = args.client_id if args.client_id is not None else client_id_from_key(key) if key else 0
    spec = NodeSpec(
        key=key,
        data=Path(args.data),
        client_id=client_id,
        root_certificates=CertPaths(Path(args.certs).resolve()).ca_cert if args.certs else None,
        superlink=args.superlink,
        profile=args.profile,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        runtime_port=args.runtime_port,
        insecure=args.insecure,
        resident=not args.no_resident,
        device=args.device,
    )
    check_node_files(spec)
    _preflight_node(args, spec)
    env = deploy_env()
    if not spec.resident:
        return run_foreground_cli(supernode_argv(spec), env)
    with resident_worker(spec, env):
        return run_foreground_cli(supernode_argv(spec), env)


def _preflight_node(args: argparse.Namespace, spec: Any) -> None:
    """The node's data file (and, with --config, the run's columns, profile and model) before it starts."""
    from fedslm.server.preflight import preflight_node

    cfg = load_config(args.config, args.set) if args.config else None
    n = preflight_node(spec.data, cfg, args.config or "", spec.client_id, spec.profile)
    log.info("node %d: %d records in %s", spec.client_id, n, spec.data)


def _run(args: argparse.Namespace) -> int:
    from fedslm.config import ConfigError
    from fedslm.deploy import (
        CertPaths,
        deploy_env,
        flwr_home,
        run_argv,
        stage_app,
        stop_stale_run,
        write_connection,
    )

    if args.resume and args.out:
        raise ConfigError("fedslm run: --resume RUN_DIR continues the run in RUN_DIR; drop --out")
    if not args.config and (args.set or not args.resume):
        raise ConfigError("fedslm run: give a CONFIG (e.g. configs/demo.yaml), or --resume RUN_DIR alone")
    # fails here, before anything is submitted; the data and the model are checked on the SuperLink machine
    given = load_run(args.config, args.set, scope="config") if args.config else None
    resume, stale = _check_resume(Path(args.resume), given, args.config) if args.resume else (None, None)
    app = Path(args.app).resolve()
    rel = ""  # with --resume and no CONFIG: the run's own config.yaml, read by the ServerApp
    if args.config:
        config = Path(args.config).resolve()
        if not config.is_relative_to(app):
            log.warning("%s is outside the app (%s): the SuperLink machine must have it at this path", config, app)
        rel = str(config.relative_to(app)) if config.is_relative_to(app) else str(config)
    env = deploy_env()
    env["FLWR_HOME"] = str(flwr_home(env))
    if args.address:
        ca = CertPaths(Path(args.certs).resolve()).ca_cert if args.certs else None
        write_connection(Path(env["FLWR_HOME"]), args.connection, args.address, ca, args.insecure)
    if stale is not None:
        stop_stale_run(stale, args.connection, env)
    with tempfile.TemporaryDirectory(prefix="fedslm-app-") as staged:
        fab = stage_app(app, Path(staged))
        argv = run_argv(fab, args.connection, rel, args.out, args.set, stream=not args.no_stream, resume=resume)
        return subprocess.run(argv, env=env, cwd=app).returncode


def _check_resume(run_dir: Path, given: Any, config: str | None) -> tuple[str, int | None]:
    """(the run directory for the ServerApp, the Flower run that last worked on it). Where RUN_DIR is on
    this machine too it is checked first (its config against CONFIG, run.json, a checkpoint); else the
    ServerApp checks it, and a dead Flower run of it is for the operator to stop (README)."""
    from fedslm.server.resume import last_flower_run, resume_point

    if not (run_dir / "config.yaml").is_file():
        log.warning(
            "%s is not on this machine: the ServerApp checks it on the SuperLink machine; stop the interrupted"
            " Flower run first if the SuperLink still lists it as running (`flwr ls`, `flwr stop RUN_ID`)",
            run_dir,
        )
        return str(run_dir), None
    point = resume_point(run_dir.resolve(), given, source=config or "CONFIG", scope="config")
    log.info("resuming %s after round %d (run %s)", run_dir, point.checkpoint.round, point.run_name)
    return str(run_dir.resolve()), last_flower_run(run_dir)


def run_foreground_cli(
    argv: list[str], env: dict[str, str], after_start: Callable[[subprocess.Popen[bytes]], None] | None = None
) -> int:
    from fedslm.deploy import run_foreground

    return run_foreground(argv, env, after_start)  # a DeployError is reported by main()


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error (exit 2), naming the --help to read."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fedslm: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedslm", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    verbose_help = "the libraries' lines too: Flower's INFO, deprecation warnings, loading bars (run.log has them)"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("simulate", help="run a simulated federation from a YAML config")
    p.add_argument("config", nargs="?", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.local_steps=5")
    p.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last complete round")
    p.add_argument("--force", action="store_true", help="empty a non-empty --out first (its entries are named)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    p.add_argument(
        "--ray-address", metavar="HOST:PORT", help="attach to a running Ray cluster (sets federation.ray_address)"
    )
    p.set_defaults(func=_simulate, quiet=True)  # the plan, the progress bar and the table; warnings

    p = sub.add_parser("audit", help="score a finished run's canaries: exposure, ROC, empirical epsilon bound")
    p.add_argument("run_dir")
    p.set_defaults(func=_audit)

    p = sub.add_parser("check", help="validate a config and print it resolved")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_check)

    p = sub.add_parser("privacy", help="local DP before anything trains: `fedslm privacy plan CONFIG`")
    psub = p.add_subparsers(dest="privacy_command", required=True, parser_class=_Parser)
    p = psub.add_parser("plan", help="per client: records, q, steps, noise; epsilon after each round (PLD and RDP)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_privacy_plan_cli)

    p = sub.add_parser(
        "export", help="export a run's adapter: peft | merged | gguf | onnx (checked vs the trained model, by task)"
    )
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["peft", "merged", "gguf", "onnx"])
    p.add_argument("--out", required=True)
    p.add_argument("--round", type=int, default=None, help="default: best_round of metrics.jsonl")
    p.add_argument(
        "--quant",
        "--gguf-dtype",
        default=None,
        choices=["f16", "f32", "q8_0", "q4_k_m", "int4", "int8", "fp32"],
        help="gguf: f16 (default) | f32 | q8_0 | q4_k_m (needs llama.cpp); onnx: int4 (default) | int8 | fp32",
    )
    p.add_argument(
        "--no-task-check",
        action="store_true",
        help="skip scoring the export on the run's eval records in its runtime (the logit check still runs)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out (never the run)")
    p.set_defaults(func=_export)

    for name, func, helptext in (
        ("generate", _generate, "answer one prompt with a run's fine-tuned model (streams tokens)"),
        ("chat", _chat, "chat with a run's fine-tuned model (streams tokens)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_dir")
        if name == "generate":
            p.add_argument("prompt")
        p.add_argument("--round", type=int, default=None, help="default: best_round of metrics.jsonl")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.set_defaults(func=func)

    p = sub.add_parser("strategies", help="list the aggregation strategies and their parameters")
    p.set_defaults(func=_strategies)
    _add_deploy_parsers(sub)
    _accept_debug_anywhere(sub)
    return parser


def _accept_debug_anywhere(sub: argparse._SubParsersAction) -> None:
    """``--debug`` after the subcommand too (``fedslm simulate CONFIG --debug``); not given there, the
    value given before the subcommand (or False) stands."""
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_debug_anywhere(action)


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    from fedslm.deploy import DEFAULT_SUPERLINK

    p = sub.add_parser("certs", help="deploy: a CA, the SuperLink's TLS certificate and N node keys")
    p.add_argument("--out", required=True, help="directory to write (see fedslm/deploy.py for its layout)")
    p.add_argument("--nodes", type=int, required=True, help="node key pairs to create (nodes/node-K.key)")
    p.add_argument("--host", action="append", default=[], help="extra SAN of the SuperLink (DNS name or IP)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (its CA, keys and every entry)")
    p.set_defaults(func=_certs)

    p = sub.add_parser("server", help="deploy: start a SuperLink (TLS, SuperNode authentication) and register nodes")
    p.add_argument("--certs", help="directory from `fedslm certs`")
    p.add_argument("--address", default=DEFAULT_SUPERLINK, help="host:port to serve on (0.0.0.0:PORT: other machines)")
    p.add_argument("--connection", default="fedslm", help="name of the $FLWR_HOME/config.toml entry written for it")
    p.add_argument("--database", help="SQLite file keeping runs and registered nodes across restarts")
    p.add_argument("--no-register", action="store_true", help="do not register the keys of <certs>/public-keys.csv")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the SuperLink to listen")
    p.add_argument("--insecure", action="store_true", help="NO TLS, NO node authentication (local tests only)")
    p.set_defaults(func=_server)

    p = sub.add_parser("register", help="deploy: let more nodes join (their OpenSSH public keys)")
    p.add_argument("public_key", nargs="+", help="files of OpenSSH EC public keys, one per line")
    p.add_argument("--connection", default="fedslm")
    p.set_defaults(func=_register)

    p = sub.add_parser("node", help="deploy: start a SuperNode on this machine's private data")
    p.add_argument("--certs", help="directory holding ca.crt (the CA that signed the SuperLink's certificate)")
    p.add_argument("--key", help="this node's private key (nodes/node-K.key)")
    p.add_argument("--data", required=True, help="this node's data file (.jsonl/.csv/.parquet); it is never sent")
    p.add_argument("--client-id", type=int, help="default: K of node-K.key")
    p.add_argument(
        "--profile",
        default="",
        help="one of the run config's clients.profiles, e.g. phone | hospital (default: assigned)",
    )
    p.add_argument("--superlink", default=DEFAULT_SUPERLINK, help="the SuperLink's host:port")
    p.add_argument("--state-dir", help="per-client state (DP history); default <fedslm cache>/node-state")
    p.add_argument("--runtime-port", type=int, help="local port of the node's Runtime API (default 9094 + client id)")
    p.add_argument("--insecure", action="store_true", help="NO TLS (local tests only)")
    p.add_argument("--device", default="", help="this node's device: auto | cpu | cuda | cuda:N (default: the run's)")
    p.add_argument("--config", help="the run's YAML config: check --data against its columns, profiles and model first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: an override")
    p.add_argument(
        "--no-resident",
        action="store_true",
        help="no resident worker: every message loads the base model in its own ClientApp process",
    )
    p.set_defaults(func=_node)

    p = sub.add_parser("run", help="deploy: submit a run to a SuperLink (flwr run), or resume one")
    p.add_argument("config", nargs="?", help="YAML run config inside the app, e.g. configs/demo.yaml")
    p.add_argument("--connection", default="fedslm", help="the $FLWR_HOME/config.toml entry to use")
    p.add_argument("--address", help="write the connection first: the SuperLink's host:port")
    p.add_argument("--certs", help="with --address: directory holding ca.crt")
    p.add_argument("--insecure", action="store_true", help="with --address: connect without TLS")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.local_steps=5")
    p.add_argument("--out", help="run directory on the SuperLink machine (absolute path recommended)")
    p.add_argument("--app", default=".", help="the app directory (holds pyproject.toml)")
    p.add_argument("--no-stream", action="store_true", help="submit and return without streaming the logs")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (on the SuperLink machine) from its last complete round; CONFIG, if"
        " given, must be the run's",
    )
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a :class:`FedslmError` is one line on stderr and exit 2 (1: a failed run)."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the simulation's Ray workers inherit it
    quiet = getattr(args, "quiet", False) and not args.verbose
    setup_logging(args.log_level or os.environ.get("FEDSLM_LOG") or ("WARNING" if quiet else "INFO"))
    try:
        return int(args.func(args))
    except FedslmError as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fedslm: {'interrupted' if isinstance(e, Interrupted) else 'error'}: {message}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("fedslm: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The ``fedslm`` command: :func:`main`, then exit with its code.

    After Ctrl-C, threads of Flower's engine can still wait on a Ray that is gone (their ``ray.get``
    never returns), and the interpreter joins every pool thread at exit: the process would print
    "interrupted" and then hang. The checkpoint is written and the line printed by then, so the
    process leaves at once instead; so does one whose clients ran in this process
    (:func:`fedslm.simulation.inprocess.interrupted`)."""
    code = main()
    if code == 130:
        from .inprocess import interrupted
        from .run import stuck_message_workers

        if stuck_message_workers() or interrupted():
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
