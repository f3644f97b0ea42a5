"""The one round recorder: a metrics.jsonl row has the same keys on both round loops, the figures it
derives from the clients' reports are the hand-computed ones, and the writer appends, saves, tells,
and on resume drops the rows of a round that had not checkpointed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedslm.server.recording import Recorder, RoundRecord
from flwr.app import ArrayRecord

from fedslm.protocol import PrivacyReport, TrainReport

MAIN_KEYS = [
    "round", "train_loss", "eval_loss", "perplexity", "eval_accuracy", "bytes_up", "bytes_down", "wall_s",
    "clients", "failed", "errors", "no_reply", "declined", "rejected", "skipped", "epsilon_max", "epsilon_mean",
    "epsilon_central", "diverged", "lr_scale", "best_round", "train_s_sum", "client_s_sum", "model_loads_max",
    "process_messages_min", "compute_dtypes",
]  # fmt: skip


def test_a_row_derives_its_figures_from_the_reports() -> None:
    reports = [
        TrainReport(10, train_seconds=1.5, client_seconds=2.0, model_loads=1, process_messages=3),
        TrainReport(
            20, train_seconds=0.5, client_seconds=1.0, model_loads=2, process_messages=2, compute_dtype="float32"
        ),
        TrainReport(0, process_messages=2, compute_dtype="bfloat16"),
    ]
    rec = RoundRecord(
        2, t0=0.0, ev={"eval_loss": 1.25, "eval_f1": 0.5}, train_loss=0.75, reports=reports, clients=2,
        failed=2, errors=["OSError: disk full", "DataError: no records", "OSError: disk full"],
    )  # fmt: skip
    row = rec.row([1.0, 3.0])
    assert list(row) == [*MAIN_KEYS, "eval_f1"]
    assert (row["train_s_sum"], row["client_s_sum"]) == (2.0, 3.0)
    assert (row["model_loads_max"], row["process_messages_min"]) == (2, 2)
    assert row["compute_dtypes"] == ["bfloat16", "float32"]  # a report without one (an older client) adds none
    assert (row["epsilon_max"], row["epsilon_mean"]) == (3.0, 2.0)
    assert row["errors"] == ["DataError: no records", "OSError: disk full"]
    assert row["eval_loss"] == 1.25 and row["perplexity"] is None and row["wall_s"] > 0
    # the SecAgg+ path: the same row, and which secure aggregation ran
    assert list(RoundRecord(0, 0.0).row([], "secagg+")) == [*MAIN_KEYS, "secure_aggregation"]
    empty = RoundRecord(0, 0.0).row([])
    assert (empty["model_loads_max"], empty["epsilon_max"], empty["errors"]) == (None, None, [])
    assert empty["compute_dtypes"] == []
    assert (empty["diverged"], empty["lr_scale"], empty["best_round"]) == (None, 1.0, None)  # the guard's


def test_the_recorder_writes_tells_and_resumes(tmp_path: Path) -> None:
    saved: list[Path] = []
    told: list[int] = []
    recorder = Recorder(tmp_path, lambda arrays, out: saved.append(out), lambda row: told.append(row["round"]))
    recorder.note_privacy(3, PrivacyReport(0.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.1))
    recorder.note_privacy(3, PrivacyReport(1.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.1))  # latest wins
    recorder.note_privacy(4, PrivacyReport(2.5))
    for rnd in range(3):
        recorder.record(RoundRecord(rnd, 0.0), ArrayRecord())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == told == [0, 1, 2]
    assert lines[2]["epsilon_max"] == 2.5 and lines[2]["epsilon_mean"] == pytest.approx(2.0)
    assert saved == [tmp_path / "adapters" / f"round-{r:03d}" for r in range(3)]
    assert recorder.privacy_by_client[3] == {"epsilon": 1.5, "noise-multiplier": 1.1, "sample-rate": 0.1, "delta": 1e-5}
    # resumed after round 1 had checkpointed: round 2's row is dropped, JSON keys come back as ints
    resumed = Recorder(tmp_path, lambda arrays, out: None)
    resumed.restore(lines[:2], {"3": 1.5}, {"3": recorder.privacy_by_client[3]})
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert resumed.epsilon_by_client == {3: 1.5} and resumed.rows == lines[:2]


def test_the_recorder_warns_once_of_each_dtype_other_than_the_servers(
    tmp_path: Path, fedslm_log: pytest.LogCaptureFixture
) -> None:
    """A GPU hospital's bf16 beside the server's fp32: its base was rounded differently before NF4."""
    recorder = Recorder(tmp_path, lambda arrays, out: None, evaluates_in="float32")
    for rnd in (1, 2):  # the same clients again: warned of once
        reports = [TrainReport(5, client_id=0, compute_dtype="float32"),
                   TrainReport(5, client_id=3, compute_dtype="bfloat16"), TrainReport(5, client_id=4)]  # fmt: skip
        recorder.record(RoundRecord(rnd, 0.0, reports=reports), ArrayRecord())
    warned = {r.getMessage() for r in fedslm_log.records if "computed in" in r.getMessage()}
    assert len(warned) == 1 and warned.pop().startswith("client 3 computed in bfloat16, the server in float32")
    fedslm_log.clear()
    quiet = Recorder(tmp_path, lambda arrays, out: None)  # no server dtype given (a test's recorder): no check
    quiet.record(RoundRecord(3, 0.0, reports=[TrainReport(5, compute_dtype="float16")]), ArrayRecord())
    assert not [r for r in fedslm_log.records if "computed in" in r.getMessage()]
