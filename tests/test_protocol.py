"""The typed messages between server and client: each survives a round trip through the Flower
record it travels in, a missing key is named, and the one upload rule picks the right tensors."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, MetricRecord

from fedslm import protocol, secagg
from fedslm.protocol import LoRAPlan, MessageError, NodeConfig, PrivacyReport, TrainInstructions, TrainReport

NAMES = ["m.lora_A.weight", "m.lora_B.weight", "n.lora_A.weight", "n.lora_B.weight"]


def test_train_instructions_round_trip_through_a_config_record() -> None:
    sent = TrainInstructions(
        "seed: 3\n", "exp", 4, LoRAPlan(train_lora_a=False, upload_lora_b=False, proximal_mu=0.25), '["a", "b"]'
    )
    record = ConfigRecord(sent.to_record())
    assert TrainInstructions.from_record(record) == sent
    assert dict(record) == {
        "run-config": "seed: 3\n",
        "run-name": "exp",
        "server-round": 4,
        "adapter-keys": '["a", "b"]',
        "train-lora-a": False,
        "upload-lora-b": False,
        "proximal-mu": 0.25,
    }


def test_default_instructions_send_only_the_run_config_and_name() -> None:
    # what Flower's configure_train then adds (server-round, FedProx's proximal-mu) is read back too
    record = TrainInstructions("x: 1\n", "run").to_record()
    assert record == {"run-config": "x: 1\n", "run-name": "run"}
    got = TrainInstructions.from_record({**record, "server-round": 2, "proximal-mu": 0.01})
    assert (got.server_round, got.plan) == (2, LoRAPlan(proximal_mu=0.01))


def test_instructions_without_the_run_config_name_the_key() -> None:
    with pytest.raises(MessageError, match="train instructions: the record has no 'run-config' key"):
        TrainInstructions.from_record(ConfigRecord({"run-name": "exp", "server-round": 1}))


def test_a_train_report_round_trips_through_a_metric_record() -> None:
    privacy = PrivacyReport(1.5, True, 1e-5, 0.9, 0.04, 1.0)
    sent = TrainReport(
        num_examples=12,
        client_id=3,
        lora_rank=8,
        privacy=privacy,
        train_loss=2.5,
        train_loss_first=3.0,
        train_loss_last=2.0,
        train_seconds=0.5,
        train_steps=4,
        samples_seen=16,
        model_loads=1,
        client_seconds=0.75,
        process_messages=2,
    )
    record = MetricRecord(sent.to_record())
    assert TrainReport.from_record(record) == sent
    assert record["budget-exhausted"] == 1 and record["num-examples"] == 12 and "declined" not in record
    assert privacy.summary() == {"epsilon": 1.5, "noise-multiplier": 0.9, "sample-rate": 0.04, "delta": 1e-5}


def test_a_declined_report_carries_no_training_figures() -> None:
    sent = TrainReport(num_examples=0, client_id=1, lora_rank=4, declined=True, privacy=PrivacyReport(7.9))
    assert sent.to_record() == {
        "client-id": 1,
        "lora-rank": 4,
        "num-examples": 0,
        "declined": 1,
        "epsilon": 7.9,
        "budget-exhausted": 0,
    }
    assert TrainReport.from_record(MetricRecord(sent.to_record())) == sent


def test_a_report_without_num_examples_or_with_a_bad_value_names_the_key() -> None:
    with pytest.raises(MessageError, match="train report: the record has no 'num-examples' key"):
        TrainReport.from_record(MetricRecord({"client-id": 2, "train-loss": 1.0}))
    with pytest.raises(MessageError, match="train report: 'train-loss' is a list, expected a number"):
        TrainReport.from_record(MetricRecord({"num-examples": 2, "train-loss": [1.0, 2.0]}))


def test_node_configs_round_trip_and_name_their_client() -> None:
    deployed = NodeConfig(client_id=5, data_path="/data/site.jsonl", state_dir="/state", profile="phone")
    assert NodeConfig.from_record(deployed.to_record()) == deployed
    assert deployed.to_record() == {
        "client-id": 5,
        "data-path": "/data/site.jsonl",
        "state-dir": "/state",
        "profile": "phone",
    }
    simulated = NodeConfig.from_record({"partition-id": 2, "num-partitions": 4})
    assert (simulated.client, simulated.num_partitions) == (2, 4)
    assert protocol.node_client_id({}) == 0 and protocol.node_client_id({"client-id": 5}) == 5
    with pytest.raises(MessageError, match="node config: 'partition-id' is a str"):
        NodeConfig.from_record({"partition-id": "two"})


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (LoRAPlan(), NAMES),
        (LoRAPlan(upload_lora_b=False), ["m.lora_A.weight", "n.lora_A.weight"]),  # FedSA-LoRA
        (LoRAPlan(train_lora_a=False), ["m.lora_B.weight", "n.lora_B.weight"]),  # FFA-LoRA
        (LoRAPlan(train_lora_a=False, upload_lora_b=False), []),
    ],
)
def test_the_one_upload_rule(plan: LoRAPlan, expected: list[str]) -> None:
    assert plan.uploads(NAMES) == expected
    assert secagg.upload_keys(NAMES, plan.to_record()) == expected  # the SecAgg+ path applies the same rule
