"""Central (client-level) DP: clipping by key, equal weights, noise scale, accountant over rounds."""

from __future__ import annotations

import numpy as np
import pytest
from fedslm.strategies import registry
from fedslm.strategies.aggregation import add_noise
from fedslm.strategies.central_dp import CentralDP
from flower_fakes import FakeGrid, train_reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedslm.config import config_from_dict
from fedslm.privacy import ClientAccountant


def test_noise_std_is_as_asked() -> None:
    rng = np.random.default_rng(0)
    noisy = add_noise({"x": np.zeros(200_000, dtype=np.float32)}, 0.25, rng)
    assert float(np.std(noisy["x"])) == pytest.approx(0.25, rel=0.01)


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
        strategy.configure_train(
            1, ArrayRecord({k: Array(v) for k, v in glob.items()}), ConfigRecord(), FakeGrid([11, 12, 13, 14])
        )
    )
    assert len(msgs) == 2
    # client updates of norm 10 and 0.5, very unequal example counts: clipped to 1 and averaged equally
    r1 = train_reply(msgs[0].metadata.dst_node_id, {"k.lora_B.weight": np.array([10, 0, 0, 0], dtype=np.float32)}, 1000)
    r2 = train_reply(msgs[1].metadata.dst_node_id, {"k.lora_B.weight": np.array([0, 0.5, 0, 0], dtype=np.float32)}, 1)
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
        replies = [train_reply(m.metadata.dst_node_id, {"w": np.ones(3, dtype=np.float32)}, 5) for m in fake]
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
