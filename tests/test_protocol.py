"""The typed messages between server and client: each survives a round trip through the Flower
record it travels in, a missing key is named, and the one upload rule picks the right tensors."""

from __future__ import annotations

import ast
from pathlib import Path

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
        compute_dtype="bfloat16",
    )
    record = MetricRecord(sent.to_record())
    assert TrainReport.from_record(record) == sent
    assert record["budget-exhausted"] == 1 and record["num-examples"] == 12 and "declined" not in record
    assert record["compute-dtype"] == 1  # a metric holds numbers: the dtype's code
    with pytest.raises(MessageError, match="compute-dtype 3 is not one of 0-2"):
        TrainReport.from_record({**record, "compute-dtype": 3})
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


# -- every message key is spelled once: in fedslm/protocol.py ---------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("fedslm", "server", "client", "strategies", "simulation")
RECORDS = {"RecordDict", "ConfigRecord", "MetricRecord", "ArrayRecord"}


def protocol_keys(root: Path = ROOT) -> dict[str, str]:
    """The message keys ``fedslm/protocol.py`` defines: string value -> constant name."""
    keys = {}
    for node in ast.parse((root / "fedslm" / "protocol.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    keys[node.value.value] = target.id
    return keys


def _names_content(node: ast.expr) -> bool:
    """``content``, ``msg.content`` or ``msg.content[...]``: a message's records."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return (isinstance(node, ast.Name) and node.id == "content") or (
        isinstance(node, ast.Attribute) and node.attr == "content"
    )


def _key_positions(tree: ast.AST) -> list[ast.Constant]:
    """String literals where a message key goes: keys of a dict handed to a Flower record, the key
    of ``content[...]``, ``... in content`` and ``content.get(...)``, and parameter defaults."""
    found: list[ast.expr | None] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in RECORDS:
                found += [k for arg in node.args if isinstance(arg, ast.Dict) for k in arg.keys]
            elif name == "get" and isinstance(node.func, ast.Attribute) and _names_content(node.func.value):
                found += node.args[:1]
        elif isinstance(node, ast.Subscript) and _names_content(node.value):
            found.append(node.slice)
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            if any(_names_content(c) for c in node.comparators):
                found.append(node.left)
        elif isinstance(node, ast.arguments):
            found += [*node.defaults, *node.kw_defaults]
    return [n for n in found if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def spelled_out_keys(root: Path = ROOT) -> list[str]:
    """``file:line: 'key' (use protocol.NAME)`` for each message key written as a literal outside
    ``fedslm/protocol.py``. A hyphenated key (``client-id``) counts anywhere; a plain word
    (``arrays``, ``device``) only where a message key goes (a row's ``declined`` column is no key)."""
    keys = protocol_keys(root)
    out = []
    for folder in PACKAGE_FOLDERS:
        for path in sorted((root / folder).glob("*.py")):
            if path == root / "fedslm" / "protocol.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            hyphenated = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and "-" in str(n.value)]
            for node in {*hyphenated, *_key_positions(tree)}:
                if node.value in keys:
                    rel = path.relative_to(root)
                    out.append(f"{rel}:{node.lineno}: {node.value!r} (use protocol.{keys[node.value]})")
    return sorted(out)


def test_message_keys_are_spelled_only_in_the_protocol_module() -> None:
    assert spelled_out_keys() == []


def test_the_key_checker_finds_planted_literals(tmp_path: Path) -> None:
    for folder in PACKAGE_FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "fedslm" / "protocol.py").write_text((ROOT / "fedslm" / "protocol.py").read_text())
    (tmp_path / "server" / "planted.py").write_text(
        "from flwr.app import ConfigRecord, RecordDict\n"
        "def send(msg, key='metrics'):\n"
        "    msg.content['arrays'] = RecordDict({'config': ConfigRecord({'ask': 1})})\n"
        "    return 'decline' in msg.content, msg.content.get('reason')\n"
        "row = {'declined': 0, 'device': 'cpu'}  # a metrics.jsonl row, a summary: not message keys\n"
    )
    (tmp_path / "client" / "planted.py").write_text("WHO = {'client-id': 3}\n")
    assert spelled_out_keys(tmp_path) == [
        "client/planted.py:1: 'client-id' (use protocol.CLIENT_ID)",
        "server/planted.py:2: 'metrics' (use protocol.METRICS)",
        "server/planted.py:3: 'arrays' (use protocol.ARRAYS)",
        "server/planted.py:3: 'config' (use protocol.CONFIG)",
        "server/planted.py:4: 'decline' (use protocol.DECLINE)",
        "server/planted.py:4: 'reason' (use protocol.REASON)",
    ]
