"""Adapters on the wire: compact dtypes, compressed deltas with error feedback, and the checks every
update passes on the server (a bad update is rejected, the round goes on)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fedslm.server.validation import UpdateRejected, check_update
from flower_fakes import FakeGrid, reply
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedslm import wire
from fedslm.config import SecurityConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q_proj.lora_A.weight": torch.randn(4, 64, generator=g),
        "m.q_proj.lora_B.weight": torch.randn(64, 4, generator=g) * 0.01,
    }


@pytest.mark.parametrize(
    ("dtype", "bytes_per", "rel"), [("bfloat16", 2, 2**-8), ("float16", 2, 2**-11), ("float32", 4, 0)]
)
def test_dtypes_round_trip_within_their_precision_and_count_real_bytes(dtype: str, bytes_per: int, rel: float) -> None:
    state = _state()
    record = wire.encode(state, dtype)
    back = wire.decode(record)
    for k, t in state.items():
        assert back[k].dtype == torch.float32 and back[k].shape == t.shape
        assert torch.all((back[k] - t).abs() <= rel * t.abs() + 1e-12)
    assert wire.nbytes(record) == 512 * bytes_per  # 2 x 256 values, raw bytes, no header
    assert record.count_bytes() >= wire.nbytes(record)  # Flower counts the same data (+ its metadata)


def test_numpy_records_still_decode() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert torch.equal(wire.decode(ArrayRecord({"k": Array(arr)}))["k"], torch.from_numpy(arr))


def test_int8_delta_error_is_at_most_half_a_step_per_row() -> None:
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.01, 0.02, -0.03, 0.0]])
    q, scale = wire.quantize_int8(x)
    assert torch.allclose(scale, torch.tensor([1 / 127, 0.03 / 127]))
    assert q.tolist()[0] == [127, -64, 32, 0]  # round(-63.5) = -64 (half to even), round(31.75) = 32
    err = (wire.dequantize_int8(q, scale) - x).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-9)


def test_topk_keeps_exactly_the_largest_entries() -> None:
    d = {"k": torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])}
    record, seen = wire.compress_delta(d, dtype="float32", int8=False, topk=1 / 3)
    assert wire.from_array(record["k::mask"]).tolist() == [0b01010000]  # entries 1 and 3 of 6, MSB first
    assert torch.equal(seen["k"], torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]))
    ref = {"k": torch.ones(2, 3)}
    assert torch.equal(wire.decode_update(record, ref)["k"], ref["k"] + seen["k"])


@pytest.mark.parametrize(("int8", "topk"), [(True, 0.0), (False, 0.1), (True, 0.1)])
def test_error_feedback_loses_nothing_over_rounds(int8: bool, topk: float) -> None:
    """Sum of what the server decoded over R rounds = sum of true deltas - the residual still held."""
    g = torch.Generator().manual_seed(1)
    residual = {"k": torch.zeros(8, 16)}
    sent_total, true_total = torch.zeros(8, 16), torch.zeros(8, 16)
    for _ in range(5):
        true = {"k": torch.randn(8, 16, generator=g)}
        delta = {"k": true["k"] + residual["k"]}
        record, seen = wire.compress_delta(delta, dtype="bfloat16", int8=int8, topk=topk)
        decoded = wire.decode_update(record, {"k": torch.zeros(8, 16)})["k"]
        assert torch.equal(decoded, seen["k"])  # the client knows exactly what the server will see
        residual = {"k": delta["k"] - seen["k"]}
        sent_total += decoded
        true_total += true["k"]
    assert torch.allclose(sent_total + residual["k"], true_total, atol=1e-5)
    if topk:
        assert wire.nbytes(record) < 0.15 * 8 * 16 * 4  # a 16-byte mask + 13 of 128 values


def test_compressed_uplink_is_an_eighth_of_fp32_at_the_demo_shape() -> None:
    """SmolLM2 r=8 on q,v: A is 8x576, B is 576x8 (q) / 192x8 (v); int8 + top-10% is < 1/8 of fp32."""
    g = torch.Generator().manual_seed(2)
    delta = {"q.lora_A": torch.randn(8, 576, generator=g), "q.lora_B": torch.randn(576, 8, generator=g)}
    fp32 = sum(t.numel() * 4 for t in delta.values())
    int8_only, _ = wire.compress_delta(delta, dtype="bfloat16", int8=True, topk=0.0)
    both, _ = wire.compress_delta(delta, dtype="bfloat16", int8=True, topk=0.1)
    assert wire.nbytes(int8_only) / fp32 == pytest.approx((9216 + 4 * (8 + 576)) / (9216 * 4))  # ~0.31
    # per tensor: a 576-byte mask, 461 int8 values and one fp32 scale
    assert wire.nbytes(both) / fp32 == pytest.approx(2 * (576 + 461 + 4) / (9216 * 4))  # ~0.056 < 1/8


# ------------------------------------------------------------------------------------------------
# checks on the server


def test_bad_updates_are_rejected_with_the_reason() -> None:
    ref = _state()
    sec = SecurityConfig(max_update_mb=0.01, update_norm_bound=5.0)

    def rec(state: dict[str, torch.Tensor], dtype: str = "bfloat16") -> ArrayRecord:
        return wire.encode(state, dtype)

    ok = check_update(rec({k: v + 0.01 for k, v in ref.items()}), ref, sec)
    assert set(ok) == set(ref)
    nan = {
        **ref,
        "m.q_proj.lora_A.weight": ref["m.q_proj.lora_A.weight"].clone().index_fill_(1, torch.tensor([3]), float("nan")),
    }
    cases = {
        "non-finite": rec(nan),
        "shape": rec({**ref, "m.q_proj.lora_B.weight": torch.zeros(64, 8)}),
        "unknown tensor": rec({**ref, "m.k_proj.lora_A.weight": torch.zeros(4, 64)}),
        "exceeds security.max_update_mb": rec({"m.q_proj.lora_A.weight": torch.zeros(4, 4000)}, "float32"),
        "update norm": rec({k: v + 1.0 for k, v in ref.items()}),
        "undecodable": ArrayRecord(
            {"m.q_proj.lora_A.weight": Array(dtype="complex7", shape=(4,), stype=wire.RAW, data=b"0000")}
        ),
        "empty update": ArrayRecord(),
    }
    for reason, record in cases.items():
        with pytest.raises(UpdateRejected, match=reason):
            check_update(record, ref, sec)
    # a heterogeneous-rank strategy may see another rank, never another layer width
    r8 = {"m.q_proj.lora_A.weight": torch.zeros(8, 64), "m.q_proj.lora_B.weight": torch.zeros(64, 8)}
    assert check_update(rec(r8), ref, SecurityConfig(), flexible_rank=True)["m.q_proj.lora_A.weight"].shape == (8, 64)
    with pytest.raises(UpdateRejected, match="shape"):
        check_update(rec({"m.q_proj.lora_A.weight": torch.zeros(8, 65)}), ref, SecurityConfig(), flexible_rank=True)


def _honest_bad_lost_silent(msg: Message, rnd: int) -> Message | None:
    """Eight nodes: 1 and 2 honest; 3-6 send a NaN, a wrong shape, an unknown key, an oversized
    update; 7 dies mid-round (an error reply); 8 never answers (the round's timeout)."""
    node = msg.metadata.dst_node_id
    glob = wire.decode(msg.content["arrays"])
    if node == 7:
        return reply(node, error=Error(code=0, reason="node lost its connection"))
    if node == 8:
        return None
    update = {k: v + 0.01 * node for k, v in glob.items()}
    key = next(iter(glob))
    if node == 3:
        update[key] = torch.full_like(update[key], float("nan"))
    elif node == 4:
        update[key] = torch.zeros(3, 3)
    elif node == 5:
        update["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    elif node == 6:
        update[key] = torch.zeros(1, 40_000)
    n = {1: 10, 2: 30}.get(node, 20)
    metrics = MetricRecord({"num-examples": n, "train-loss": 1.0, "client-id": node - 1})
    return reply(node, RecordDict({"arrays": wire.encode(update, "float32"), "metrics": metrics}))


def _grid() -> FakeGrid:
    return FakeGrid(range(1, 9), _honest_bad_lost_silent)


def test_federation_rejects_bad_updates_and_aggregates_the_honest_ones(tmp_path: Path) -> None:
    from fedslm.server.federation import Federation

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            "federation.num_clients=8",
            "federation.num_rounds=1",
            "communication.dtype=float32",
            "security.max_update_mb=0.1",
        ],
    )
    fed = Federation(cfg, tmp_path / "run", "reject")
    grid = _grid()
    rows = fed.run(grid)
    row = rows[1]
    assert (row["clients"], row["rejected"], row["failed"], row["no_reply"], row["skipped"]) == (2, 4, 1, 1, False)
    sent = wire.decode(grid.sent[0][1].content["arrays"])  # what node 1 got in round 1
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "run" / "adapters" / "round-001" / "adapter_model.safetensors"))
    for k, v in sent.items():  # (10 x 0.01 + 30 x 0.02) / 40 = 0.0175 on every entry
        assert torch.allclose(final[k], v + 0.0175, atol=1e-6), k
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert line["rejected"] == 4


def test_too_few_usable_replies_skip_the_round_and_keep_the_global_adapter(tmp_path: Path) -> None:
    from fedslm.server.federation import Federation
    from safetensors.torch import load_file

    overrides = ["federation.num_clients=8", "federation.num_rounds=1", "federation.min_train_clients=3"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, "security.max_update_mb=0.1"])
    rows = Federation(cfg, tmp_path / "run", "skip").run(_grid())
    assert rows[1]["clients"] == 2 and rows[1]["skipped"]  # 2 usable < 3
    adapters = tmp_path / "run" / "adapters"
    before, after = (load_file(str(adapters / f"round-00{r}" / "adapter_model.safetensors")) for r in (0, 1))
    assert all(torch.equal(before[k], after[k]) for k in before)
