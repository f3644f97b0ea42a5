"""Whole federations on the tiny model (Flower's simulation engine: on Ray, and in this process as
configs/tiny.yaml asks): the run directory, loss going down, honest cumulative epsilon, a
budget-exhausted client declining."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from fedslm.server.federation import sort_replies
from flower_fakes import reply
from flwr.app import Array, ArrayRecord, Error, MetricRecord, RecordDict

from fedslm.config import load_config
from fedslm.grid import payload_nbytes
from fedslm.model import cache_root
from fedslm.privacy import ClientAccountant, calibrate_noise, save_state

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def test_content_bytes_are_counted_from_the_serialized_arrays_and_protobuf_numbers() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    record = ArrayRecord({"a.lora_A.weight": Array(arr)})
    npy = len(record["a.lora_A.weight"].data)
    assert npy == 128 + 48  # numpy .npy header (128 bytes) + 12 float32
    metrics = MetricRecord({"num-examples": 5})
    content = RecordDict({"arrays": record, "metrics": metrics})
    # the one byte counter (also SecAgg+'s): a metric is its key and 8 bytes, as protobuf carries it
    assert payload_nbytes(content) == npy + len("a.lora_A.weight") + len("num-examples") + 8


def test_replies_are_sorted_into_ok_failed_declined_rejected() -> None:
    arrays = ArrayRecord({"k": Array(np.zeros(2, dtype=np.float32))})
    ok = reply(1, RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 3})}))
    declined = reply(2, RecordDict({"metrics": MetricRecord({"declined": 1, "num-examples": 0})}))
    empty = reply(3, RecordDict({"metrics": MetricRecord({"num-examples": 3})}))
    failed = reply(4, error=Error(code=0, reason="node died"))
    out = sort_replies([ok, declined, empty, failed])
    assert out.ok == [ok] and out.declined == [declined]
    assert out.rejected == [(3, "reply carries no adapter")] and out.failed == [(4, "node died")]


def _run(tmp_path: Path, overrides: list[str], run_name: str | None = None) -> tuple[list[dict], Path]:
    from fedslm.simulation.run import simulate

    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    out = tmp_path / "run"
    rows = simulate(cfg, out, run_name=run_name, progress=False)
    return rows, out


def test_tiny_federation_lowers_loss_and_writes_the_run_dir(tmp_path: Path) -> None:
    """On Ray with two workers; then the same federation in this process gives the same numbers."""
    recipe = [
        "federation.num_rounds=3",
        "train.local_steps=5",
        "train.learning_rate=0.05",
        "eval.per_client=true",
        "data.num_records=800",  # ~180 records a client, 18 held back for validation
    ]
    rows, out = _run(tmp_path, [*recipe, "federation.backend=ray", "federation.client_cpus=1"])
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.1, [r["eval_loss"] for r in rows]
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    assert all(r["clients"] == 4 for r in rows[1:])
    assert all(r["model_loads_max"] == 1 for r in rows[1:])  # one resident base model per worker, all rounds
    # the clients' time: optimizer steps within their whole message, and within the round's wall time
    # (clients that train at the same time on two workers may sum to more than wall_s, not to twice it)
    assert all(0 < r["train_s_sum"] < r["client_s_sum"] < 2 * r["wall_s"] for r in rows[1:]), rows
    # every client evaluated the global adapter on its own validation split, each round
    assert all(sorted(r["per_client"]) == ["0", "1", "2", "3"] for r in rows[1:])
    assert all(np.isfinite(m["eval_loss"]) and 0 <= m["eval_accuracy"] <= 1 for m in rows[-1]["per_client"].values())
    # on at most data.eval_size (16) of their 17-18 validation records, as the central evaluation
    assert all(m["eval_records"] == 16 for r in rows[1:] for m in r["per_client"].values()), rows[-1]["per_client"]
    # 4 clients x (1792 LoRA parameters in bf16) up; the same adapter + the run config down
    assert all(4 * 1792 * 2 < r["bytes_up"] < 4 * (1792 * 2 + 3000) for r in rows[1:])
    assert all(r["bytes_down"] > 2 * 4 * 1792 * 2 for r in rows[1:])  # train + per-client evaluation messages
    lines = (out / "metrics.jsonl").read_text().splitlines()
    keys = {"round", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "wall_s"}
    assert len(lines) == 4 and all(keys <= set(json.loads(line)) for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["first"]["round"] == 0 and summary["last"]["round"] == 3
    assert summary["totals"]["bytes_up"] == sum(r["bytes_up"] for r in rows)
    # tiny.yaml computes in float32: every client said so, through its Ray worker's reply
    assert all(r["compute_dtypes"] == ["float32"] for r in rows[1:]) and rows[0]["compute_dtypes"] == []
    assert (summary["compute_dtype"], summary["client_compute_dtypes"]) == ("float32", ["float32"])
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(out / "config.yaml").train.local_steps == 5
    for r in range(4):
        adapter = out / "adapters" / f"round-{r:03d}"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    # in this process, one client after another: the same losses, accuracies and uploads, round for round
    # (downloads carry the run config, which names the backend)
    same, here = _run(tmp_path / "inprocess", [*recipe, "federation.backend=inprocess"])
    for key in ("train_loss", "eval_loss", "eval_accuracy", "bytes_up", "clients"):
        assert [r.get(key) for r in same] == pytest.approx([r.get(key) for r in rows], rel=1e-5), key
    # where the clients ran: run.log's lines carry the process id (Ray's two workers; then this process)
    ray_workers = _client_pids(out)
    assert len(ray_workers) == 2 and os.getpid() not in ray_workers
    assert _client_pids(here) == {os.getpid()}


def _client_pids(run: Path) -> set[int]:
    """The process ids of run.log's client lines (``... <pid> INFO fedslm.client.runner: client 0 round 1: ...``)."""
    lines = (run / "run.log").read_text().splitlines()
    return {int(line.split()[2]) for line in lines if " INFO fedslm.client.runner: client " in line}


def test_per_client_last_evaluates_on_the_clients_after_the_last_round_only(tmp_path: Path) -> None:
    rows, _ = _run(tmp_path, ["federation.num_rounds=2", "train.local_steps=1", "eval.per_client=last"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "per_client" not in rows[0] and "per_client" not in rows[1]
    assert sorted(rows[2]["per_client"]) == ["0", "1", "2", "3"]


def test_compressed_uplink_sends_an_eighth_of_fp32_and_still_learns(tmp_path: Path) -> None:
    common = ["federation.num_rounds=3", "train.local_steps=5", "train.learning_rate=0.05"]
    rows, out = _run(tmp_path, [*common, "communication.quantize_delta=true", "communication.topk=0.25"])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.1, [r["eval_loss"] for r in rows]
    # tiny r=4 adapter: 8 tensors, 1792 values; per client a 224-byte mask, 448 int8 values, 8 scales
    arrays = 224 + 448 + 8 * 4
    assert arrays / (1792 * 4) < 1 / 8
    keys = sum(len(k) * 3 + len("::mask::q8::scale") for k in _adapter(out, 0))  # Flower counts key names
    per_client = [r["bytes_up"] / 4 - arrays - keys for r in rows[1:]]
    assert all(0 < m < 1500 for m in per_client), per_client  # what is left is the metric record


def test_dp_federation_reports_cumulative_epsilon_and_a_spent_client_declines(tmp_path: Path) -> None:
    run_name = f"dp-{uuid.uuid4().hex[:8]}"
    overrides = ["privacy.mode=local", "privacy.target_epsilon=4.0", "federation.num_rounds=2"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    spent = ClientAccountant("pld", [(0.5, 0.5, 1000)])  # client 0 has already spent its budget
    save_state(cache_root(cfg.model) / "client-state" / run_name / "client-0" / "privacy.json", spent)
    rows, out = _run(tmp_path, overrides, run_name=run_name)
    # client 0 declines once and says its budget is spent; the server then stops sampling it
    assert [r["declined"] for r in rows[1:]] == [1, 0]
    assert [r["clients"] for r in rows[1:]] == [3, 3]  # the rounds continued with the others
    # hand calculation for client 3 (natural split: county-general): n train records, q = 4/n
    from fedslm import data

    n = len(data.client_records(cfg.data, cache_root(cfg.model), 3, 4).records)
    n_train = n - int(n * 0.1)
    q = 4 / n_train
    sigma = calibrate_noise(4.0, 1e-5, q, 2 * 3)  # 2 rounds x 3 local steps
    expected = ClientAccountant("pld", [(sigma, q, 6)]).epsilon(1e-5)  # privacy.accountant defaults to pld
    state = json.loads((cache_root(cfg.model) / "client-state" / run_name / "client-3" / "privacy.json").read_text())
    assert state["history"] == [[sigma, q, 6]]
    assert 0.98 * 4.0 <= expected <= 4.0
    # epsilon_max includes the spent client 0's epsilon, the mean of the 4 is below it
    assert rows[-1]["epsilon_max"] == pytest.approx(spent.epsilon(1e-5), abs=1e-9)
    assert rows[1]["epsilon_mean"] < rows[2]["epsilon_mean"] < rows[-1]["epsilon_max"]


def test_central_dp_federation_reports_epsilon_central_per_round(tmp_path: Path) -> None:
    overrides = [
        "privacy.mode=central",
        "privacy.central_noise_multiplier=0.8",
        "privacy.central_clipping_norm=0.5",
        "federation.num_rounds=3",
        "federation.fraction_train=0.5",
    ]
    rows, out = _run(tmp_path, overrides)
    assert [r["clients"] for r in rows[1:]] == [2, 2, 2]
    for rnd in (1, 2, 3):  # q = 2 of 4 clients, one composition per round
        expected = ClientAccountant("rdp", [(0.8, 0.5, rnd)]).epsilon(1e-3)
        assert rows[rnd]["epsilon_central"] == pytest.approx(expected, abs=1e-9)
    assert rows[-1]["epsilon_max"] is None  # no local DP in this run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["central_noise_multiplier"] == 0.8 and summary["privacy"]["central_clipping_norm"] == 0.5
    assert all(np.isfinite(r["eval_loss"]) for r in rows)


def test_thirty_clients_ten_per_round_share_one_model(tmp_path: Path) -> None:
    """The scale-100 shape, reduced: 30 clients, 10 sampled per round, clients' state on disk; in this
    process, every client on the one resident model."""
    from fedslm.model import RESIDENT

    overrides = [
        "federation.num_clients=30",
        "federation.fraction_train=0.34",
        "federation.min_train_clients=8",
        "federation.num_rounds=2",
        "data.partitioner=iid",
        "data.num_records=600",
        "train.local_steps=2",
        "privacy.mode=local",
    ]
    run_name = f"scale-{uuid.uuid4().hex[:8]}"
    loads = RESIDENT.loads
    rows, _ = _run(tmp_path, overrides, run_name=run_name)
    assert RESIDENT.loads - loads <= 1  # the server's and all 20 clients' (none if this process had it)
    # the noise is calibrated for ceil(2 x 10/30) = 1 round per client: after round 1 the 10 clients
    # say their budget is spent, so round 2 samples 10 of the other 20 and nobody declines
    assert [r["clients"] for r in rows[1:]] == [10, 10]
    assert [r["declined"] for r in rows[1:]] == [0, 0]
    assert 0.97 * 8.0 <= rows[-1]["epsilon_max"] <= 8.0
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    states = list((cache_root(cfg.model) / "client-state" / run_name).glob("client-*/privacy.json"))
    assert len(states) == 20  # one file per client that trained, and only those


def _adapter(out: Path, rnd: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapters" / f"round-{rnd:03d}" / "adapter_model.safetensors"))


def test_ffa_lora_never_changes_a_and_uploads_only_b(tmp_path: Path) -> None:
    rows, out = _run(tmp_path, ["strategy.name=ffa-lora", "train.learning_rate=0.05"])
    first, last = _adapter(out, 0), _adapter(out, 2)
    a_keys = [k for k in first if "lora_A" in k]
    b_keys = [k for k in first if "lora_B" in k]
    assert a_keys and all(np.array_equal(first[k], last[k]) for k in a_keys)
    assert all(not np.array_equal(first[k], last[k]) for k in b_keys)
    # tiny r=4: B holds 768 of the 1792 LoRA parameters; 4 clients upload B only, bf16 (+ metrics)
    assert all(4 * 768 * 2 < r["bytes_up"] < 4 * (768 * 2 + 2500) for r in rows[1:])


def test_fedsa_lora_keeps_each_clients_b_at_home(tmp_path: Path) -> None:
    run_name = f"fedsa-{uuid.uuid4().hex[:8]}"
    overrides = ["strategy.name=fedsa-lora", "train.learning_rate=0.05"]
    rows, out = _run(tmp_path, overrides, run_name=run_name)
    first, last = _adapter(out, 0), _adapter(out, 2)
    assert all(not np.array_equal(first[k], last[k]) for k in first if "lora_A" in k)  # A is aggregated
    assert all(np.array_equal(first[k], last[k]) for k in first if "lora_B" in k)  # global B never moves
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    from safetensors.torch import load_file

    local = [
        load_file(str(p))
        for p in sorted((cache_root(cfg.model) / "client-state" / run_name).glob("*/local-lora-b.safetensors"))
    ]
    assert len(local) == 4  # every client kept its own B
    key = next(iter(local[0]))
    assert not np.array_equal(local[0][key], local[1][key])  # personal, not shared
