"""The one recorder of a run's rounds: what a ``metrics.jsonl`` row holds, the one writer of that file
(and of ``adapters/round-NNN``) and the clients' privacy ledger. The bytes a row reports are counted
by the one grid view (:class:`fedslm.grid.GridView`) both loops send through.

Both round loops record through it: the main loop (:mod:`fedslm.server.federation`) and the SecAgg+
workflow (:mod:`fedslm.server.secagg`), so their rows cannot drift apart.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedslm.fs import atomic_write
from fedslm.logs import get_logger
from fedslm.protocol import PrivacyReport, TrainReport

log = get_logger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]

CLASSIFICATION_KEYS = ("eval_precision", "eval_recall", "eval_f1")


# ------------------------------------------------------------------------------------------------
# one round


def evaluate_centrally(
    evaluate: Callable[[ArrayRecord], dict[str, Any]], rnd: int, arrays: ArrayRecord
) -> dict[str, Any]:
    """``evaluate(arrays)`` (the central evaluator on the held-out split), logged in one line."""
    t0 = time.perf_counter()
    m = evaluate(arrays)
    generated = f", {m['eval_generated']:.0%} of answers generated" if "eval_generated" in m else ""
    log.info(
        "round %d central eval: loss %.4f, perplexity %.2f, accuracy %.3f (%.1f s%s)",
        rnd,
        m["eval_loss"],
        m["perplexity"],
        m["eval_accuracy"],
        time.perf_counter() - t0,
        generated,
    )
    return m


def failure_line(reason: object) -> str:
    """The line that says what went wrong in a client's error: a traceback's last line, without Ray's
    wrapper text or terminal colours, at most 300 characters."""
    text = str(reason).removesuffix("'>")  # Flower's wrapper: "<class '...'>:<'" + the error + "'>"
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^~ ")]
    return (lines[-1] if lines else "no reason given")[:300]


@dataclass
class RoundRecord:
    """What one round did, as both loops know it; :meth:`row` is the ``metrics.jsonl`` row."""

    round: int
    t0: float  # perf_counter at the round's start
    ev: Mapping[str, Any] = field(default_factory=dict)  # central (and per-client) evaluation, if run
    train_loss: float | None = None
    epsilon_central: float | None = None
    reports: list[TrainReport] = field(default_factory=list)  # the replies aggregated (or screened in)
    bytes_up: int = 0
    bytes_down: int = 0
    clients: int = 0
    failed: int = 0
    # what the clients said when they failed or declined: a run that trained nothing ends on these
    errors: list[str] = field(default_factory=list)
    no_reply: int = 0
    declined: int = 0
    rejected: int = 0
    skipped: bool = False
    # the divergence guard: why this round's aggregate was rejected (None: kept), the clients'
    # learning-rate factor from now on, and the best kept round so far (highest accuracy, then lowest loss)
    diverged: str | None = None
    lr_scale: float = 1.0
    best_round: int | None = None

    def row(self, epsilons: list[float], secure_aggregation: str | None = None) -> dict[str, Any]:
        ev, reports = self.ev, self.reports
        row: dict[str, Any] = {
            "round": self.round,
            "train_loss": self.train_loss,
            "eval_loss": ev.get("eval_loss"),
            "perplexity": ev.get("perplexity"),
            "eval_accuracy": ev.get("eval_accuracy"),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "wall_s": time.perf_counter() - self.t0,
            "clients": self.clients,
            "failed": self.failed,
            "errors": sorted(set(self.errors)),
            "no_reply": self.no_reply,
            "declined": self.declined,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "epsilon_max": max(epsilons) if epsilons else None,
            "epsilon_mean": sum(epsilons) / len(epsilons) if epsilons else None,
            "epsilon_central": self.epsilon_central,
            "diverged": self.diverged,
            "lr_scale": self.lr_scale,
            "best_round": self.best_round,
            # seconds the clients spent in their optimizer steps, and on the whole message (model, data,
            # privacy accounting, upload); the rest of wall_s is messaging, loading and evaluation
            "train_s_sum": sum(r.train_seconds or 0.0 for r in reports),
            "client_s_sum": sum(r.client_seconds or 0.0 for r in reports),
            "model_loads_max": max((r.model_loads or 0 for r in reports), default=None),
            # messages the process that trained had handled by then, fewest over the clients: 1 when
            # every message gets a fresh process, growing when the base model stays resident
            "process_messages_min": min((r.process_messages or 0 for r in reports), default=None),
            # what the clients computed in, each resolving model.compute_dtype: auto on its own machine
            "compute_dtypes": sorted({r.compute_dtype for r in reports if r.compute_dtype is not None}),
        }
        if secure_aggregation is not None:
            row["secure_aggregation"] = secure_aggregation
        row.update({k: ev[k] for k in CLASSIFICATION_KEYS if k in ev})
        if "per_client" in ev:
            row["per_client"] = ev["per_client"]  # client-id -> metrics on its own validation split
        return row


# ------------------------------------------------------------------------------------------------
# the run


class Recorder:
    """Writes ``metrics.jsonl`` (one row per round) and the round's adapter, keeps every client's
    latest privacy report, and tells ``on_round``."""

    def __init__(
        self,
        out: Path,
        save_adapter: Callable[[ArrayRecord, Path], Any],
        on_round: RoundCallback | None = None,
        secure_aggregation: str | None = None,  # written in each row of the SecAgg+ path
        evaluates_in: str | None = None,  # the server's compute dtype: a client's other one is warned of
    ) -> None:
        self.out = Path(out)
        self.save_adapter = save_adapter
        self.on_round = on_round
        self.secure_aggregation = secure_aggregation
        self.evaluates_in = evaluates_in
        self._warned: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self.epsilon_by_client: dict[int, float] = {}
        self.privacy_by_client: dict[int, dict[str, float]] = {}

    def note_privacy(self, client: int, privacy: PrivacyReport) -> None:
        self.epsilon_by_client[client] = privacy.epsilon
        self.privacy_by_client[client] = privacy.summary()

    def record(self, rec: RoundRecord, arrays: ArrayRecord) -> dict[str, Any]:
        row = rec.row(list(self.epsilon_by_client.values()), self.secure_aggregation)
        self._warn_of_other_dtypes(rec)
        self.rows.append(row)
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.save_adapter(arrays, self.out / "adapters" / f"round-{rec.round:03d}")
        if self.on_round is not None:
            self.on_round(row)
        return row

    def _warn_of_other_dtypes(self, rec: RoundRecord) -> None:
        """Once per dtype: clients that computed in another dtype than the server trained on a base
        rounded differently before quantizing than the one the server evaluates (and an export rebuilds)."""
        for report in rec.reports:
            dtype = report.compute_dtype
            if self.evaluates_in is None or dtype in (None, self.evaluates_in) or dtype in self._warned:
                continue
            self._warned.add(dtype)
            log.warning(
                "client %s computed in %s, the server in %s (each resolved model.compute_dtype: auto on its own"
                " machine): their bases are rounded differently before quantizing, and the server evaluates"
                " (an export rebuilds) its own; set model.compute_dtype to give all one base",
                report.client_id,
                dtype,
                self.evaluates_in,
            )

    def restore(self, rows: list[dict[str, Any]], epsilons: Mapping[Any, float], privacy: Mapping[Any, Any]) -> None:
        """Continue a run from a checkpoint: its rows (those of a round that had not checkpointed are
        dropped from ``metrics.jsonl``) and its clients' privacy."""
        self.rows = list(rows)
        self.epsilon_by_client = {int(k): v for k, v in epsilons.items()}
        self.privacy_by_client = {int(k): v for k, v in privacy.items()}
        atomic_write(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))


class Recorded:
    """For a round loop that records through ``self.recorder``: its rows and its clients' privacy."""

    recorder: Recorder

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` rows so far."""
        return self.recorder.rows

    @property
    def privacy_by_client(self) -> dict[int, dict[str, float]]:
        """Each client's latest privacy report (what ``summary.json`` keeps)."""
        return self.recorder.privacy_by_client


__all__ = [
    "Recorded",
    "Recorder",
    "RoundCallback",
    "RoundRecord",
    "evaluate_centrally",
    "failure_line",
]
