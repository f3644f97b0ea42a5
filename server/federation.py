"""The round driver: sample, send, receive, screen, aggregate, evaluate, record, checkpoint.

Flower's ``Strategy.start`` runs a fixed loop; fedslm drives the strategy's own
``configure_train``/``aggregate_train`` itself so that every round can (1) drop failed, declined
and invalid replies before aggregation, (2) skip a round that got too few replies while keeping the
global adapter, (3) count the bytes that really travelled, and (4) write metrics, the round's
adapter and a checkpoint before the next round starts.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fedslm.strategies import registry
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedslm import wire
from fedslm.adapters import arrays_to_numpy, from_arrayrecord, numpy_to_arrays, to_arrayrecord
from fedslm.config import RunConfig
from fedslm.fs import atomic_write
from fedslm.logs import get_logger
from fedslm.protocol import LR_SCALE_KEY
from fedslm.records import arrays_of, as_float, as_int, metrics_of

from . import checkpoint
from .checkpoint import Checkpoint
from .evaluation import CentralEvaluator
from .guard import LR_BACKOFF, all_finite, divergence_reason
from .validation import UpdateRejected, check_update

log = get_logger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: array bytes plus the JSON size of config/metric records."""
    total = 0
    for value in content.values():
        if isinstance(value, ArrayRecord):
            total += value.count_bytes()
        else:
            total += len(json.dumps({k: v for k, v in value.items()}, default=str))
    return total


@dataclass
class RoundReplies:
    ok: list[Message] = field(default_factory=list)
    failed: list[tuple[int, str | None]] = field(default_factory=list)
    declined: list[Message] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    invalid: list[Message] = field(default_factory=list)  # screened out by check_update
    no_reply: int = 0  # nodes that sent nothing within federation.round_timeout_s


def failure_line(reason: object) -> str:
    """The line that says what went wrong in a client's error: a traceback's last line, without Ray's
    wrapper text or terminal colours, at most 300 characters."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(reason).splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^~ ")]
    return (lines[-1] if lines else "no reason given")[:300]


def sort_replies(replies: list[Message]) -> RoundReplies:
    out = RoundReplies()
    for msg in replies:
        if msg.has_error():
            out.failed.append((msg.metadata.src_node_id, msg.error.reason))
        elif "arrays" not in msg.content:
            declined = msg.content["metrics"].get("declined", 0) if "metrics" in msg.content else 0
            if declined:
                out.declined.append(msg)
            else:
                out.rejected.append((msg.metadata.src_node_id, "reply carries no adapter"))
        else:
            out.ok.append(msg)
    return out


class AvailableGrid:
    """A view of a Grid: nodes in the order of their client ids (Flower's node ids are random per
    run, client ids are not: sampling is then the same in every run with the same seed, and after a
    resume), without the clients that said their privacy budget is spent."""

    def __init__(self, grid: Grid, client_of: dict[int, int], exclude: set[int]) -> None:
        self._grid = grid
        self._client_of = client_of
        self._exclude = exclude

    def all_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        return sorted(nodes, key=lambda n: (n not in self._client_of, self._client_of.get(n, 0), n))

    def get_node_ids(self) -> list[int]:
        return [n for n in self.all_node_ids() if self._client_of.get(n, -1 - n) not in self._exclude]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def client_id(msg: Message, client_of: dict[int, int]) -> int:
    """The client id a reply speaks for (its ``client-id`` metric, else the node's known id)."""
    node = msg.metadata.src_node_id
    if msg.has_content() and "metrics" in msg.content and "client-id" in msg.content["metrics"]:
        return as_int(msg.content["metrics"]["client-id"], "client-id")
    return client_of.get(node, node)


class Federation:
    """Runs ``cfg.federation.num_rounds`` rounds of the configured strategy and writes ``out_dir``."""

    def __init__(self, cfg: RunConfig, out_dir: Path, run_name: str, on_round: RoundCallback | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.run_name = run_name
        self.on_round = on_round
        self.strategy = registry.build(cfg)
        self.evaluator = CentralEvaluator(cfg)
        self.epsilon_by_client: dict[int, float] = {}
        self.privacy_by_client: dict[int, dict[str, float]] = {}
        self.exhausted: set[int] = set()  # client ids whose privacy budget is spent
        self.client_of: dict[int, int] = {}  # node id -> client id, learnt at the start
        self.rows: list[dict[str, Any]] = []
        self.lr_scale = 1.0  # halved by each round the divergence guard rejects
        self.best: tuple[float, int] | None = None  # (central eval loss, round) of the best kept round

    def _train_config(self) -> ConfigRecord:
        config = {"run-config": self.cfg.to_yaml(), "run-name": self.run_name, LR_SCALE_KEY: self.lr_scale}
        return ConfigRecord(config)

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        t0 = time.perf_counter()
        m = self.evaluator(arrays)
        log.info(
            "round %d central eval: loss %.4f, perplexity %.2f, accuracy %.3f (%.1f s)",
            rnd,
            m["eval_loss"],
            m["perplexity"],
            m["eval_accuracy"],
            time.perf_counter() - t0,
        )
        return m

    def _identify(self, grid: Grid) -> None:
        """Ask every node once for its client id (a tiny QUERY message, no model involved)."""
        nodes = list(grid.get_node_ids())
        messages = [
            Message(
                content=RecordDict({"config": ConfigRecord({"ask": "client-id"})}),
                message_type=MessageType.QUERY,
                dst_node_id=n,
            )
            for n in nodes
        ]
        for msg in grid.send_and_receive(messages, timeout=min(self.cfg.federation.round_timeout_s, 600.0)):
            if not msg.has_error() and "metrics" in msg.content and "client-id" in msg.content["metrics"]:
                self.client_of[msg.metadata.src_node_id] = as_int(msg.content["metrics"]["client-id"], "client-id")
        unknown = len(nodes) - len(self.client_of)
        log.info(
            "%d nodes, client ids %s%s",
            len(nodes),
            sorted(self.client_of.values()),
            f" ({unknown} unknown)" if unknown else "",
        )

    def _restore(self, ck: Checkpoint) -> ArrayRecord:
        self.strategy.load_state_dict(ck.strategy)
        self.rows = list(ck.state["rows"])
        self.exhausted = set(ck.state["exhausted"])
        self.epsilon_by_client = {int(k): v for k, v in ck.state["epsilon_by_client"].items()}
        self.privacy_by_client = {int(k): v for k, v in ck.state["privacy_by_client"].items()}
        self.lr_scale = float(ck.state.get("lr_scale", 1.0))  # absent in checkpoints of older versions
        self.best = tuple(ck.state["best"]) if ck.state.get("best") else None  # type: ignore[assignment]
        # rows of a round that had not checkpointed are dropped
        atomic_write(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        log.info("resumed from %s: round %d done, continuing", ck.path, ck.round)
        return numpy_to_arrays(ck.adapter)

    def _checkpoint(self, rnd: int, arrays: ArrayRecord) -> None:
        state = {
            "config_digest": checkpoint.config_digest(self.cfg.to_yaml()),
            "rows": self.rows,
            "exhausted": sorted(self.exhausted),
            "epsilon_by_client": self.epsilon_by_client,
            "privacy_by_client": self.privacy_by_client,
            "lr_scale": self.lr_scale,
            "best": list(self.best) if self.best else None,
        }
        checkpoint.save(self.out, rnd, arrays_to_numpy(arrays), self.strategy.state_dict(), state)

    def run(self, grid: Grid, resume: Checkpoint | None = None) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(self.cfg.to_yaml())
        fed = self.cfg.federation
        self.strategy.summary()
        self._identify(grid)
        t_start = time.perf_counter()
        if resume is None:
            arrays = self.evaluator.initial_arrays()
            ev0 = self._evaluate(0, arrays)
            self.best = (float(ev0["eval_loss"]), 0)  # the base adapter: a later round must beat it
            self._record(0, arrays, ev0, {}, RoundReplies(), 0, 0, t_start, skipped=False)
            self._checkpoint(0, arrays)
            first = 1
        else:
            arrays, first = self._restore(resume), resume.round + 1
        for rnd in range(first, fed.num_rounds + 1):
            log.info("---- round %d/%d ----", rnd, fed.num_rounds)
            t0 = time.perf_counter()
            available = AvailableGrid(grid, self.client_of, self.exhausted)
            if not available.get_node_ids():
                log.warning("every client has spent its privacy budget: stopping before round %d", rnd)
                break
            # a Grid view: its own node list, everything else delegated to the grid
            messages = list(self.strategy.configure_train(rnd, arrays, self._train_config(), cast(Grid, available)))
            self._to_wire(messages)
            down = sum(content_nbytes(m.content) for m in messages)
            received = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
            # arrival order varies; aggregate in client order so that a run is reproducible bit for bit
            replies = sort_replies(sorted(received, key=lambda m: client_id(m, self.client_of)))
            replies.no_reply = len(messages) - len(received)
            if replies.no_reply:
                log.warning(
                    "round %d: %d of %d nodes sent no reply within federation.round_timeout_s=%s",
                    rnd,
                    replies.no_reply,
                    len(messages),
                    fed.round_timeout_s,
                )
            up = sum(content_nbytes(m.content) for m in replies.ok + replies.declined + replies.invalid)
            self._screen(rnd, replies, arrays)
            for node, reason in replies.failed:
                log.warning("round %d: node %s failed: %s", rnd, node, reason)
            for msg in replies.declined:
                reason = str(msg.content["decline"]["reason"]) if "decline" in msg.content else "no reason given"
                log.warning("round %d: node %s declined to train: %s", rnd, msg.metadata.src_node_id, reason)
            self._note_epsilons(replies.ok + replies.declined)
            train_metrics: dict[str, Any] = {}
            skipped = len(replies.ok) < fed.min_train_clients
            if skipped:
                log.warning(
                    "round %d skipped: %d usable replies < federation.min_train_clients=%d; global adapter kept",
                    rnd,
                    len(replies.ok),
                    fed.min_train_clients,
                )
            kept = arrays
            if not skipped:
                new_arrays, agg = self.strategy.aggregate_train(rnd, replies.ok)
                if new_arrays is not None:
                    arrays = self._merge(arrays, new_arrays)
                train_metrics = dict(agg or {})
            # the last round run: the configured count, or every client has spent its budget
            last = rnd == fed.num_rounds or not AvailableGrid(grid, self.client_of, self.exhausted).get_node_ids()
            finite = all_finite(arrays)
            ev: dict[str, Any] = {}
            if finite and (rnd % self.cfg.eval.every == 0 or last):
                ev = self._evaluate(rnd, arrays)
            best = self.best[0] if self.best else None
            diverged = divergence_reason(ev.get("eval_loss"), best, fed.divergence_factor, finite)
            if diverged:
                self.lr_scale *= LR_BACKOFF
                log.warning(
                    "round %d rejected: %s; the previous global adapter is kept, learning rate x%g from now on",
                    rnd,
                    diverged,
                    self.lr_scale,
                )
                arrays = kept
                evaluate = rnd % self.cfg.eval.every == 0 or last
                ev = self._evaluate(rnd, arrays) if evaluate else {}  # the row describes the adapter kept
            elif ev and (self.best is None or ev["eval_loss"] < self.best[0]):
                self.best = (float(ev["eval_loss"]), rnd)
            if ev and self.cfg.eval.per_client:
                per_client, sent = self._evaluate_on_clients(rnd, arrays, grid)
                ev["per_client"] = per_client
                down += sent
            train_metrics["diverged"] = diverged or None
            self._record(rnd, arrays, ev, train_metrics, replies, up, down, t0, skipped)
            self._checkpoint(rnd, arrays)
        log.info("Federation finished in %.1f s", time.perf_counter() - t_start)
        return self.rows

    def _to_wire(self, messages: list[Message]) -> None:
        """Adapters travel in ``communication.dtype``: encode each distinct record once."""
        dtype = self.cfg.communication.dtype
        encoded: dict[int, ArrayRecord] = {}
        for msg in messages:
            if "arrays" in msg.content:
                record = arrays_of(msg.content)
                if any(record is e for e in encoded.values()):
                    continue  # messages of one round may share their content
                if id(record) not in encoded:
                    encoded[id(record)] = wire.encode(from_arrayrecord(record), dtype)
                msg.content["arrays"] = encoded[id(record)]

    def _screen(self, rnd: int, replies: RoundReplies, arrays: ArrayRecord) -> None:
        """Decode and check every update; a bad one is rejected (logged, counted), the round goes on.
        What remains in ``replies.ok`` carries plain float32 arrays for the strategy."""
        for node, reason in replies.rejected:
            log.warning("round %d: reply of node %s rejected: %s", rnd, node, reason)
        reference = from_arrayrecord(arrays)
        flexible = registry.get(self.cfg.strategy.name).heterogeneous_ranks
        ok: list[Message] = []
        for msg in replies.ok:
            node = msg.metadata.src_node_id
            try:
                update = check_update(arrays_of(msg.content), reference, self.cfg.security, flexible_rank=flexible)
            except UpdateRejected as e:
                log.warning("round %d: update of node %s rejected: %s", rnd, node, e)
                replies.rejected.append((node, str(e)))
                replies.invalid.append(msg)
                continue
            msg.content["arrays"] = to_arrayrecord(update)
            ok.append(msg)
        replies.ok = ok

    def _evaluate_on_clients(self, rnd: int, arrays: ArrayRecord, grid: Grid) -> tuple[dict[str, Any], int]:
        """Every client evaluates the global adapter on its own validation split (never leaves it)."""
        config = self._train_config()
        config["server-round"] = rnd
        for key, value in self.strategy.client_config(rnd).items():  # e.g. FedSA-LoRA: evaluate with own B
            config[key] = value
        on_wire = wire.encode(from_arrayrecord(arrays), self.cfg.communication.dtype)
        messages = [
            Message(
                content=RecordDict({"arrays": on_wire, "config": config}),
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
            )
            for node in AvailableGrid(grid, self.client_of, set()).all_node_ids()
        ]
        sent = sum(content_nbytes(m.content) for m in messages)
        out: dict[str, Any] = {}
        for msg in grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout_s):
            if msg.has_error():
                log.warning("round %d: node %s failed to evaluate: %s", rnd, msg.metadata.src_node_id, msg.error.reason)
                continue
            m = metrics_of(msg.content)
            out[str(as_int(m["client-id"], "client-id"))] = {
                k: as_float(v, k) for k, v in m.items() if k.startswith("eval_")
            }
        accs = ", ".join(f"client {k}: {v.get('eval_accuracy', float('nan')):.3f}" for k, v in sorted(out.items()))
        log.info("round %d per-client accuracy on own validation data: %s", rnd, accs)
        return out, sent

    @staticmethod
    def _merge(old: ArrayRecord, new: ArrayRecord) -> ArrayRecord:
        """Keys a strategy does not aggregate (e.g. FFA-LoRA's frozen A) keep their global value."""
        merged = ArrayRecord({k: v for k, v in old.items()})
        for k, v in new.items():
            merged[k] = v
        return merged

    def _note_epsilons(self, msgs: list[Message]) -> None:
        for msg in msgs:
            m = metrics_of(msg.content)
            if m.get("budget-exhausted", 0):
                self.exhausted.add(client_id(msg, self.client_of))
            if "epsilon" in m:
                client = as_int(m.get("client-id", msg.metadata.src_node_id), "client-id")
                self.epsilon_by_client[client] = as_float(m["epsilon"], "epsilon")
                self.privacy_by_client[client] = {
                    k: as_float(m[k], k) for k in ("epsilon", "noise-multiplier", "sample-rate", "delta") if k in m
                }

    def _record(
        self,
        rnd: int,
        arrays: ArrayRecord,
        ev: dict[str, float],
        train: dict[str, Any],
        replies: RoundReplies,
        up: int,
        down: int,
        t0: float,
        skipped: bool,
    ) -> None:
        eps = list(self.epsilon_by_client.values())
        row: dict[str, Any] = {
            "round": rnd,
            "train_loss": train.get("train-loss"),
            "eval_loss": ev.get("eval_loss"),
            "perplexity": ev.get("perplexity"),
            "eval_accuracy": ev.get("eval_accuracy"),
            "bytes_up": up,
            "bytes_down": down,
            "wall_s": time.perf_counter() - t0,
            "clients": len(replies.ok),
            "failed": len(replies.failed),
            # what the clients said when they failed or declined: a run that trained nothing ends on these
            "errors": sorted({failure_line(reason) for _, reason in replies.failed}),
            "no_reply": replies.no_reply,
            "declined": len(replies.declined),
            "rejected": len(replies.rejected),
            "skipped": skipped,
            "epsilon_max": max(eps) if eps else None,
            "epsilon_mean": sum(eps) / len(eps) if eps else None,
            "epsilon_central": train.get("epsilon-central"),
            # the divergence guard: why this round's aggregate was rejected (None: kept), the clients'
            # learning-rate factor from now on, and the best kept round so far (lowest central eval loss)
            "diverged": train.get("diverged"),
            "lr_scale": self.lr_scale,
            "best_round": self.best[1] if self.best else None,
            # seconds the clients spent in their optimizer steps, and on the whole message (model, data,
            # privacy accounting, upload); the rest of wall_s is messaging, loading and evaluation
            "train_s_sum": sum(
                as_float(m.content["metrics"].get("train-seconds", 0.0), "train-seconds") for m in replies.ok
            ),
            "client_s_sum": sum(
                as_float(m.content["metrics"].get("client-seconds", 0.0), "client-seconds") for m in replies.ok
            ),
            "model_loads_max": max(
                (as_int(m.content["metrics"].get("model-loads", 0), "model-loads") for m in replies.ok), default=None
            ),
            # messages the process that trained had handled by then, fewest over the clients: 1 when
            # every message gets a fresh process, growing when the base model stays resident
            "process_messages_min": min(
                (as_int(m.content["metrics"].get("process-messages", 0), "process-messages") for m in replies.ok),
                default=None,
            ),
        }
        row.update({k: ev[k] for k in ("eval_precision", "eval_recall", "eval_f1") if k in ev})  # classification
        if "per_client" in ev:
            row["per_client"] = ev["per_client"]  # client-id -> metrics on its own validation split
        self.rows.append(row)
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.evaluator.save(arrays, self.out / "adapters" / f"round-{rnd:03d}")
        if self.on_round is not None:
            self.on_round(row)
