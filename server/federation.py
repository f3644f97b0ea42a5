"""The round driver: sample, send, receive, screen, aggregate, evaluate, record, checkpoint.

Flower's ``Strategy.start`` runs a fixed loop; fedslm drives the strategy's own
``configure_train``/``aggregate_train`` itself so that every round can (1) drop failed, declined
and invalid replies before aggregation, (2) skip a round that got too few replies while keeping the
global adapter, (3) count the bytes that really travelled, and (4) write metrics, the round's
adapter and a checkpoint before the next round starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fedslm.strategies import registry
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedslm import wire
from fedslm.adapters import arrays_to_numpy, from_arrayrecord, numpy_to_arrays, to_arrayrecord
from fedslm.config import RunConfig
from fedslm.grid import GridView
from fedslm.logs import get_logger
from fedslm.protocol import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    DECLINE,
    EPSILON_CENTRAL,
    METRICS,
    REASON,
    TRAIN_LOSS,
    LoRAPlan,
    MessageError,
    TrainInstructions,
    TrainReport,
)
from fedslm.records import arrays_of, as_float, as_int, metrics_of

from . import checkpoint
from .checkpoint import Checkpoint
from .evaluation import CentralEvaluator
from .guard import LR_BACKOFF, Kept, all_finite, divergence_reason
from .recording import Recorded, Recorder, RoundCallback, RoundRecord, evaluate_centrally, failure_line
from .validation import UpdateRejected, check_update

log = get_logger(__name__)


@dataclass
class RoundReplies:
    ok: list[Message] = field(default_factory=list)
    failed: list[tuple[int, str | None]] = field(default_factory=list)
    declined: list[Message] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    invalid: list[Message] = field(default_factory=list)  # screened out by check_update
    no_reply: int = 0  # nodes that sent nothing within federation.round_timeout_s


def report_of(msg: Message) -> TrainReport:
    """A train reply's :class:`TrainReport` (``MessageError`` naming the key that is missing)."""
    if METRICS not in msg.content:
        raise MessageError(f"train reply: no {METRICS!r} record")
    return TrainReport.from_record(metrics_of(msg.content, METRICS))


def sort_replies(replies: list[Message]) -> RoundReplies:
    out = RoundReplies()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.failed.append((node, msg.error.reason))
            continue
        try:
            report = report_of(msg)
        except MessageError as err:
            if ARRAYS in msg.content:
                out.rejected.append((node, str(err)))
                continue
            report = None
        if ARRAYS not in msg.content:
            if report is not None and report.declined:
                out.declined.append(msg)
            else:
                out.rejected.append((node, "reply carries no adapter"))
        else:
            out.ok.append(msg)
    return out


def client_id(msg: Message, client_of: dict[int, int]) -> int:
    """The client id a reply speaks for (its ``client-id`` metric, else the node's known id)."""
    node = msg.metadata.src_node_id
    if msg.has_content() and METRICS in msg.content and CLIENT_ID in msg.content[METRICS]:
        return as_int(msg.content[METRICS][CLIENT_ID], CLIENT_ID)
    return client_of.get(node, node)


class Federation(Recorded):
    """Runs ``cfg.federation.num_rounds`` rounds of the configured strategy and writes ``out_dir``."""

    grid: GridView  # the grid of the run (set by :meth:`run`)

    def __init__(self, cfg: RunConfig, out_dir: Path, run_name: str, on_round: RoundCallback | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.run_name = run_name
        self.strategy = registry.build(cfg)
        self.evaluator = CentralEvaluator(cfg)
        self.recorder = Recorder(self.out, self.evaluator.save, on_round, evaluates_in=self.evaluator.compute_dtype)
        self.exhausted: set[int] = set()  # client ids whose privacy budget is spent
        self.client_of: dict[int, int] = {}  # node id -> client id, learnt at the start
        self.lr_scale = 1.0  # halved by each round the divergence guard rejects
        self.kept = Kept()  # the centrally evaluated rounds kept: the guard's bests and the best round
        self.global_ev: dict[str, Any] | None = None  # the central evaluation of the global adapter, if run

    def _train_config(self, server_round: int = 0, plan: LoRAPlan | None = None) -> ConfigRecord:
        instructions = TrainInstructions(
            self.cfg.to_yaml(), self.run_name, server_round, plan or LoRAPlan(), lr_scale=self.lr_scale
        )
        return ConfigRecord(instructions.to_record())

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        return evaluate_centrally(self.evaluator, rnd, arrays)

    def _identify(self) -> None:
        """Ask every node once for its client id (a tiny QUERY message, no model involved)."""
        nodes = self.grid.all_node_ids()
        messages = [
            Message(
                content=RecordDict(),  # the query handler needs no content
                message_type=MessageType.QUERY,
                dst_node_id=n,
            )
            for n in nodes
        ]
        for msg in self.grid.send_and_receive(messages, timeout=min(self.cfg.federation.round_timeout_s, 600.0)):
            if not msg.has_error() and METRICS in msg.content and CLIENT_ID in msg.content[METRICS]:
                self.client_of[msg.metadata.src_node_id] = as_int(msg.content[METRICS][CLIENT_ID], CLIENT_ID)
        unknown = len(nodes) - len(self.client_of)
        log.info(
            "%d nodes, client ids %s%s",
            len(nodes),
            sorted(self.client_of.values()),
            f" ({unknown} unknown)" if unknown else "",
        )

    def _restore(self, ck: Checkpoint) -> ArrayRecord:
        self.strategy.load_state_dict(ck.strategy)
        self.exhausted = set(ck.state["exhausted"])
        self.recorder.restore(ck.state["rows"], ck.state["epsilon_by_client"], ck.state["privacy_by_client"])
        self.lr_scale = float(ck.state.get("lr_scale", 1.0))  # absent in checkpoints of older versions
        self.kept = Kept.restore(ck.state)
        log.info("resumed from %s: round %d done, continuing", ck.path, ck.round)
        return numpy_to_arrays(ck.adapter)

    def _checkpoint(self, rnd: int, arrays: ArrayRecord) -> None:
        state = {
            "config_digest": checkpoint.config_digest(self.cfg.to_yaml()),
            "rows": self.rows,
            "exhausted": sorted(self.exhausted),
            "epsilon_by_client": self.recorder.epsilon_by_client,
            "privacy_by_client": self.recorder.privacy_by_client,
            "lr_scale": self.lr_scale,
            "kept": self.kept.state(),
        }
        checkpoint.save(self.out, rnd, arrays_to_numpy(arrays), self.strategy.state_dict(), state)

    # -- the run: round 0, then one round at a time (as Flower's ``Strategy.start``) ----------------
    def run(self, grid: Grid, resume: Checkpoint | None = None) -> list[dict[str, Any]]:
        self.grid = GridView.of(grid)  # counts the bytes that travel (a ServerApp's view also stops on Ctrl-C)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(self.cfg.to_yaml())
        self.strategy.summary()
        self._identify()
        t_start = time.perf_counter()
        arrays, first = (self._round_zero(), 1) if resume is None else (self._restore(resume), resume.round + 1)
        for rnd in range(first, self.cfg.federation.num_rounds + 1):
            log.info("---- round %d/%d ----", rnd, self.cfg.federation.num_rounds)
            if not self._available().get_node_ids():
                log.warning("every client has spent its privacy budget: stopping before round %d", rnd)
                break
            arrays = self.run_round(rnd, arrays)
        log.info("Federation finished in %.1f s", time.perf_counter() - t_start)
        return self.rows

    def _round_zero(self) -> ArrayRecord:
        """The initial adapter, evaluated, recorded and checkpointed: a later round must beat it."""
        t0 = time.perf_counter()
        arrays = self.evaluator.initial_arrays()
        ev = self._evaluate(0, arrays)
        self.kept.add(0, ev["eval_loss"], ev.get("eval_accuracy"))
        self.global_ev = dict(ev)
        self._record(0, arrays, ev, {}, RoundReplies(), t0, skipped=False)
        self._checkpoint(0, arrays)
        return arrays

    def run_round(self, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round: sample and send, screen, aggregate, guard and evaluate, record, checkpoint.
        Returns the global adapter the next round starts from."""
        t0 = time.perf_counter()
        replies = self._send_train(rnd, arrays)
        self._screen(rnd, replies, arrays)
        candidate, train, skipped = self._aggregate(rnd, arrays, replies)
        last = self._last_round(rnd)  # asks the grid for its nodes: once a round
        arrays, ev, diverged = self._guard(rnd, arrays, candidate, last)
        per_client = self.cfg.eval.per_client
        if ev and (per_client is True or (per_client == "last" and last)):
            ev["per_client"] = self._evaluate_on_clients(rnd, arrays)
        train["diverged"] = diverged or None
        self._record(rnd, arrays, ev, train, replies, t0, skipped)
        self._checkpoint(rnd, arrays)
        return arrays

    # -- the steps of a round ------------------------------------------------------------------------
    def _available(self) -> GridView:
        return self.grid.available(self.client_of, self.exhausted)

    def _send_train(self, rnd: int, arrays: ArrayRecord) -> RoundReplies:
        """The strategy samples from the available clients and writes their train messages; the
        adapter goes on the wire; the replies come back sorted (ok, failed, declined, rejected)."""
        fed = self.cfg.federation
        # a Grid view: its own node list, everything else delegated to the grid
        messages = list(self.strategy.configure_train(rnd, arrays, self._train_config(), cast(Grid, self._available())))
        self._to_wire(messages)
        received = list(self.grid.send_and_receive(messages, timeout=fed.round_timeout_s))
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
        return replies

    def _aggregate(
        self, rnd: int, arrays: ArrayRecord, replies: RoundReplies
    ) -> tuple[ArrayRecord, dict[str, Any], bool]:
        """(the candidate adapter, the strategy's train metrics, skipped): a round with fewer usable
        replies than ``federation.min_train_clients`` is skipped and keeps the global adapter."""
        if len(replies.ok) < self.cfg.federation.min_train_clients:
            log.warning(
                "round %d skipped: %d usable replies < federation.min_train_clients=%d; global adapter kept",
                rnd,
                len(replies.ok),
                self.cfg.federation.min_train_clients,
            )
            return arrays, {}, True
        new_arrays, metrics = self.strategy.aggregate_train(rnd, replies.ok)
        candidate = arrays if new_arrays is None else self._merge(arrays, new_arrays)
        return candidate, dict(metrics or {}), False

    def _guard(
        self, rnd: int, kept: ArrayRecord, candidate: ArrayRecord, last: bool
    ) -> tuple[ArrayRecord, dict[str, Any], str]:
        """(the adapter kept, its central evaluation if due, why the candidate was rejected or "").
        The divergence guard rejects a non-finite candidate, or one whose loss blew up; the previous
        adapter is then kept and the clients' learning rate lowered from now on. ``last``: the last round
        run, always evaluated."""
        due = rnd % self.cfg.eval.every == 0 or last
        finite = all_finite(candidate)
        ev = self._evaluate(rnd, candidate) if finite and due else {}
        fed = self.cfg.federation
        diverged = divergence_reason(
            ev.get("eval_loss"),
            self.kept.loss,
            fed.divergence_factor,
            finite,
            ev.get("eval_accuracy"),
            self.kept.accuracy,
            fed.accuracy_drop,
        )
        if diverged:
            self.lr_scale *= LR_BACKOFF
            log.warning(
                "round %d rejected: %s; the previous global adapter is kept, learning rate x%g from now on",
                rnd,
                diverged,
                self.lr_scale,
            )
            # the row describes the adapter kept: its evaluation when it has one (the same numbers again)
            if not due:
                return kept, {}, diverged
            return kept, dict(self.global_ev) if self.global_ev else self._evaluate(rnd, kept), diverged
        if ev:
            self.kept.add(rnd, ev["eval_loss"], ev.get("eval_accuracy"))
        self.global_ev = dict(ev) if ev else None
        return candidate, ev, diverged

    def _last_round(self, rnd: int) -> bool:
        """Whether ``rnd`` is the last round run: the configured count, or every client has spent its budget."""
        return rnd == self.cfg.federation.num_rounds or not self._available().get_node_ids()

    def _to_wire(self, messages: list[Message]) -> None:
        """Adapters travel in ``communication.dtype``: encode each distinct record once."""
        dtype = self.cfg.communication.dtype
        encoded: dict[int, ArrayRecord] = {}
        for msg in messages:
            if ARRAYS in msg.content:
                record = arrays_of(msg.content)
                if any(record is e for e in encoded.values()):
                    continue  # messages of one round may share their content
                if id(record) not in encoded:
                    encoded[id(record)] = wire.encode(from_arrayrecord(record), dtype)
                msg.content[ARRAYS] = encoded[id(record)]

    def _screen(self, rnd: int, replies: RoundReplies, arrays: ArrayRecord) -> None:
        """Decode and check every update; a bad one is rejected (logged, counted), the round goes on.
        What remains in ``replies.ok`` carries plain float32 arrays for the strategy. Failures and
        declines are logged, and the clients' privacy reports noted (a spent client is left out from
        now on)."""
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
            msg.content[ARRAYS] = to_arrayrecord(update)
            ok.append(msg)
        replies.ok = ok
        for node, error in replies.failed:
            log.warning("round %d: node %s failed: %s", rnd, node, error)
        for msg in replies.declined:
            reason = str(msg.content[DECLINE][REASON]) if DECLINE in msg.content else "no reason given"
            log.warning("round %d: node %s declined to train: %s", rnd, msg.metadata.src_node_id, reason)
        self._note_epsilons(replies.ok + replies.declined)

    def _evaluate_on_clients(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Every client evaluates the global adapter on its own validation split (never leaves it)."""
        # what the strategy asks of the clients holds for evaluation too (FedSA-LoRA: with its own B)
        config = self._train_config(rnd, LoRAPlan.from_record(self.strategy.client_config(rnd)))
        on_wire = wire.encode(from_arrayrecord(arrays), self.cfg.communication.dtype)
        messages = [
            Message(
                content=RecordDict({ARRAYS: on_wire, CONFIG: config}),
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
            )
            for node in self.grid.available(self.client_of).all_node_ids()
        ]
        out: dict[str, Any] = {}
        for msg in self.grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout_s):
            if msg.has_error():
                log.warning("round %d: node %s failed to evaluate: %s", rnd, msg.metadata.src_node_id, msg.error.reason)
                continue
            m = metrics_of(msg.content)
            out[str(as_int(m[CLIENT_ID], CLIENT_ID))] = {
                k: as_float(v, k) for k, v in m.items() if k.startswith("eval_")
            }
        accs = ", ".join(f"client {k}: {v.get('eval_accuracy', float('nan')):.3f}" for k, v in sorted(out.items()))
        log.info("round %d per-client accuracy on own validation data: %s", rnd, accs)
        return out

    @staticmethod
    def _merge(old: ArrayRecord, new: ArrayRecord) -> ArrayRecord:
        """Keys a strategy does not aggregate (e.g. FFA-LoRA's frozen A) keep their global value."""
        merged = ArrayRecord({k: v for k, v in old.items()})
        for k, v in new.items():
            merged[k] = v
        return merged

    def _note_epsilons(self, msgs: list[Message]) -> None:
        for msg in msgs:
            privacy = report_of(msg).privacy
            if privacy is None:
                continue
            if privacy.budget_exhausted:
                self.exhausted.add(client_id(msg, self.client_of))
            self.recorder.note_privacy(client_id(msg, {}), privacy)  # the client-id it reports, else its node

    def _record(
        self,
        rnd: int,
        arrays: ArrayRecord,
        ev: dict[str, float],
        train: dict[str, Any],
        replies: RoundReplies,
        t0: float,
        skipped: bool,
    ) -> None:
        up, down = self.grid.take()  # everything sent and received since the last round's record
        record = RoundRecord(
            rnd,
            t0,
            ev,
            train_loss=train.get(TRAIN_LOSS),
            epsilon_central=train.get(EPSILON_CENTRAL),
            reports=[report_of(m) for m in replies.ok],
            bytes_up=up,
            bytes_down=down,
            clients=len(replies.ok),
            failed=len(replies.failed),
            errors=[failure_line(reason) for _, reason in replies.failed],
            no_reply=replies.no_reply,
            declined=len(replies.declined),
            rejected=len(replies.rejected),
            skipped=skipped,
            diverged=train.get("diverged"),
            lr_scale=self.lr_scale,
            best_round=self.kept.best_round,
        )
        self.recorder.record(record, arrays)
