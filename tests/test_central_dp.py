"""Central (client-level) DP: clipping by key, equal weights, noise scale, accountant over rounds."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from slm.config import config_from_dict
from slm.privacy import ClientAccountant
from strategies import registry
from strategies.central_dp import CentralDP, add_noise, clip_update


def test_clip_update_hand_computed() -> None:
    ref = {"a": np.array([1.0, 1.0]), "b": np.array([0.0])}
    upd = {"a": np.array([4.0, 5.0]), "b": np.array([12.0])}  # delta (3, 4, 12): norm 13
    clipped, norm = clip_update(upd, ref, 2.6)  # scale 0.2 -> delta (0.6, 0.8, 2.4)
    assert norm == pytest.approx(13.0)
    np.testing.assert_allclose(clipped["a"], [1.6, 1.8], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [2.4], rtol=1e-6)
    same, _ = clip_update(upd, ref, 100.0)
    np.testing.assert_allclose(same["a"], upd["a"])


def test_noise_std_is_as_asked() -> None:
    rng = np.random.default_rng(0)
    noisy = add_noise({"x": np.zeros(200_000, dtype=np.float32)}, 0.25, rng)
    assert float(np.std(noisy["x"])) == pytest.approx(0.25, rel=0.01)


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [11, 12, 13, 14]


def _reply(msg: Message, arrays: dict[str, np.ndarray], n: int) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=msg.metadata.dst_node_id,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0}),
        }
    )
    return make_message(meta, content=content)


def test_wrapper_clips_weights_equally_and_accounts_per_round() -> None:
    cfg = config_from_dict(
        {
            "federation": {"num_clients": 4, "fraction_train": 0.5, "min_train_clients": 2},
            "privacy": {
                "mode": "central",
                "central_noise_multiplier": 0.0,
                "central_clipping_norm": 1.0,
                "central_delta": 1e-3,
            },
        }
    )
    strategy = registry.build(cfg)
    assert isinstance(strategy, CentralDP) and strategy.clients_per_round == 2
    glob = {"k.lora_B.weight": np.zeros(4, dtype=np.float32)}
    msgs = list(
        strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in glob.items()}), ConfigRecord(), _Grid())
    )
    assert len(msgs) == 2
    # client updates of norm 10 and 0.5, very unequal example counts: clipped to 1 and averaged equally
    r1 = _reply(msgs[0], {"k.lora_B.weight": np.array([10, 0, 0, 0], dtype=np.float32)}, 1000)
    r2 = _reply(msgs[1], {"k.lora_B.weight": np.array([0, 0.5, 0, 0], dtype=np.float32)}, 1)
    arrays, metrics = strategy.aggregate_train(1, [r1, r2])
    np.testing.assert_allclose(arrays["k.lora_B.weight"].numpy(), [0.5, 0.25, 0, 0], atol=1e-7)
    assert metrics["epsilon-central"] == float("inf")  # no noise: no privacy guarantee at all


def test_epsilon_central_matches_a_hand_run_of_the_accountant() -> None:
    inner = registry.build(config_from_dict({"federation": {"num_clients": 10, "fraction_train": 0.3}}))
    dp = CentralDP(inner, noise_multiplier=1.2, clipping_norm=0.5, clients_per_round=3, num_clients=10, delta=1e-3)
    for rnd in range(1, 6):
        glob = {"w": np.zeros(3, dtype=np.float32)}
        dp._current = {k: v.astype(np.float64) for k, v in glob.items()}
        fake = [Message(RecordDict(), dst_node_id=i, message_type="train") for i in (1, 2, 3)]
        replies = [_reply(m, {"w": np.ones(3, dtype=np.float32)}, 5) for m in fake]
        _, metrics = dp.aggregate_train(rnd, replies)
    expected = ClientAccountant("rdp", [(1.2, 0.3, 5)]).epsilon(1e-3)
    assert metrics["epsilon-central"] == pytest.approx(expected, abs=1e-12)
    assert dp.accountant.history == [(1.2, 0.3, 5)]


def test_wrapper_rejects_bad_parameters() -> None:
    inner = registry.build(config_from_dict({}))
    with pytest.raises(ValueError, match="clipping norm"):
        CentralDP(inner, noise_multiplier=1.0, clipping_norm=0.0, clients_per_round=2, num_clients=4, delta=1e-3)
    with pytest.raises(ValueError, match="clients per round 5"):
        CentralDP(inner, noise_multiplier=1.0, clipping_norm=1.0, clients_per_round=5, num_clients=4, delta=1e-3)
