"""A deployed node's resident worker: the frame format, and a worker process that keeps one base model
across messages and answers exactly as the ClientApp would in-process."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fedslm.client.app import evaluate, train
from fedslm.client.handlers import handle
from fedslm.client.node import NodeSpec, node_config, resident_argv
from fedslm.client.resident import ResidentError, read_frame, wait_until_listening, write_frame
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedslm import wire
from fedslm.adapters import PEFT_CACHE
from fedslm.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_frames_round_trip_arrays_byte_for_byte() -> None:
    record = ArrayRecord(
        {
            "a.lora_A": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
            "b.lora_B": Array(dtype="bfloat16", shape=(2, 3), stype="torch.raw", data=bytes(range(12))),
            "empty": Array(np.zeros((0, 5), dtype=np.float16)),
        }
    )
    buf = io.BytesIO()
    write_frame(buf, {"kind": "train", "config": {"server-round": 3, "run-name": "r"}}, record)
    header, back = read_frame(io.BytesIO(buf.getvalue()))
    assert header == {"kind": "train", "config": {"server-round": 3, "run-name": "r"}}
    assert list(back.keys()) == list(record.keys())
    for key, arr in record.items():
        got = back[key]
        assert (got.dtype, tuple(got.shape), got.stype, got.data) == (arr.dtype, tuple(arr.shape), arr.stype, arr.data)
    np.testing.assert_array_equal(back["a.lora_A"].numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_truncated_or_oversized_frames_are_refused() -> None:
    buf = io.BytesIO()
    write_frame(buf, {"kind": "train"}, ArrayRecord({"x": Array(np.ones(4, dtype=np.float32))}))
    with pytest.raises(ResidentError, match="closed after"):
        read_frame(io.BytesIO(buf.getvalue()[:-3]))
    with pytest.raises(ResidentError, match="not a fedslm worker frame"):
        read_frame(io.BytesIO((1 << 40).to_bytes(8, "big") + b"{}"))


def test_node_config_names_the_socket_unless_disabled(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    spec = NodeSpec(key=None, data=tmp_path / "d.jsonl", client_id=2, insecure=True, runtime_port=9321)
    parsed = parse_config_args([node_config(spec)])
    assert parsed["resident-socket"] == str(spec.resident_socket) and spec.resident_socket.name == "node-9321.sock"
    assert len(str(spec.resident_socket).encode()) < 108  # a Unix socket path's limit
    assert (spec.resident_socket.parent.stat().st_mode & 0o077) == 0
    off = NodeSpec(key=None, data=tmp_path / "d.jsonl", client_id=2, insecure=True, resident=False)
    assert "resident-socket" not in parse_config_args([node_config(off)])


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Path]:
    spec = NodeSpec(
        key=None, data=tmp_path / "d.jsonl", client_id=0, insecure=True, runtime_port=40000 + os.getpid() % 20000
    )
    # as many torch threads as this process: the bit-for-bit comparison below needs the same sum order
    env = {**os.environ, "FEDSLM_LOG": "WARNING", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(resident_argv(spec), env=env)
    try:
        wait_until_listening(spec.resident_socket, alive=lambda: proc.poll() is None)
        yield spec.resident_socket
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # SIGTERM: a clean exit that removes the socket file
    assert not spec.resident_socket.exists()


def _message(cfg_yaml: str, rnd: int, arrays: ArrayRecord, kind: str = "train") -> Message:
    config = ConfigRecord({"run-config": cfg_yaml, "run-name": "resident-test", "server-round": rnd})
    return Message(content=RecordDict({"arrays": arrays, "config": config}), message_type=kind, dst_node_id=1)


def _context(client: int, state: Path, socket: Path | None) -> Context:
    node = {"partition-id": client, "num-partitions": 2, "state-dir": str(state)}
    if socket is not None:
        node["resident-socket"] = str(socket)
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


@pytest.mark.timeout(300)
def test_worker_keeps_one_model_and_replies_as_the_app_would(worker: Path, tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.local_steps=2"])
    start = wire.encode(dict(PEFT_CACHE.get(cfg.model, cfg.lora).initial), cfg.communication.dtype)
    loads, served = [], []
    for rnd in (1, 2):
        for client in (0, 1):
            msg = _message(cfg.to_yaml(), rnd, start)
            remote = train(msg, _context(client, tmp_path / "remote", worker))
            local = handle(
                "train", msg.content["config"], start, _context(client, tmp_path / "local", None).node_config
            )
            assert local.arrays is not None and remote.content["arrays"].keys() == local.arrays.keys()
            for key, arr in local.arrays.items():  # the same seeded training: bit-identical
                assert remote.content["arrays"][key].data == arr.data, key
            m = remote.content["metrics"]
            assert m["train-loss"] == pytest.approx(local.metrics["train-loss"], abs=0) and m["client-id"] == client
            loads.append(m["model-loads"])
            served.append(m["process-messages"])
    ev = evaluate(_message(cfg.to_yaml(), 2, start, "evaluate"), _context(1, tmp_path / "remote", worker))
    assert ev.content["metrics"]["client-id"] == 1 and np.isfinite(ev.content["metrics"]["eval_loss"])
    assert loads == [1, 1, 1, 1]  # the worker loaded the base model once, for 4 messages of 2 clients
    assert served == [1, 2, 3, 4] and ev.content["metrics"]["process-messages"] == 5


def test_app_without_a_worker_warns_and_trains_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.local_steps=1"])
    start = wire.encode(dict(PEFT_CACHE.get(cfg.model, cfg.lora).initial), cfg.communication.dtype)
    logger = logging.getLogger("fedslm")
    logger.addHandler(caplog.handler)
    try:
        reply = train(_message(cfg.to_yaml(), 1, start), _context(0, tmp_path / "s", tmp_path / "none.sock"))
    finally:
        logger.removeHandler(caplog.handler)
    assert reply.content["metrics"]["num-examples"] > 0
    assert any("no resident worker" in r.getMessage() for r in caplog.records)
