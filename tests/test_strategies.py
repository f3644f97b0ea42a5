"""Strategies: registry errors, one contract for all, hand-computed aggregates, robustness."""

from __future__ import annotations

import numpy as np
import pytest
from fedslm.server.preflight import run_from_dict
from fedslm.strategies import registry
from fedslm.strategies.aggregation import clip_update
from flower_fakes import FakeGrid, train_reply
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedslm.config import ConfigError, config_from_dict

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
GLOBAL = {A: np.full((2, 3), 0.5, dtype=np.float32), B: np.zeros((4, 2), dtype=np.float32)}
ALL = [s.name for s in registry.available()]


def _arrays(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()})


def _build(name: str, params: dict | None = None, n: int = 5):
    cfg = config_from_dict(
        {
            "federation": {"num_clients": n, "fraction_train": 1.0, "min_train_clients": 2},
            "strategy": {"name": name, "params": params or {}},
        }
    )
    return registry.build(cfg)


def _round(strategy, updates: list[dict[str, np.ndarray]], weights: list[int]):
    msgs = list(strategy.configure_train(1, _arrays(GLOBAL), ConfigRecord(), FakeGrid(len(updates))))
    replies = [train_reply(m.metadata.dst_node_id, u, w) for m, u, w in zip(msgs, updates, weights, strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return msgs, {k: v.numpy() for k, v in arrays.items()}


def test_registry_lists_every_strategy_and_refuses_unknowns() -> None:
    assert {
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "ffa-lora",
        "fedsa-lora",
        "krum",
        "multikrum",
        "median",
        "trimmed-mean",
        "norm-bound",
        "fedex-lora",
        "flora",
        "hetlora",
    } <= set(ALL)
    with pytest.raises(ConfigError, match=r"unknown strategy 'fedx'; valid names are: .*fedavg.*trimmed-mean"):
        run_from_dict({"strategy": {"name": "fedx"}})
    with pytest.raises(
        ConfigError, match=r"strategy.params.mu: not a parameter of 'fedprox'; allowed: \['proximal_mu'\]"
    ):
        run_from_dict({"strategy": {"name": "fedprox", "params": {"mu": 0.1}}})
    with pytest.raises(ConfigError, match="inner_params.*|not a parameter"):
        run_from_dict({"strategy": {"name": "norm-bound", "params": {"inner": "fedprox", "inner_params": {"x": 1}}}})
    with pytest.raises(registry.StrategyConfigError, match="registered twice"):
        registry.register("fedavg", description="again")(type("X", (), {}))


def _updates(name: str, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(5):
        u = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in GLOBAL.items()}
        if name == "ffa-lora":
            u.pop(A)  # A stays at the shared init: only B travels
        if name == "fedsa-lora":
            u.pop(B)  # B stays on the client: only A travels
        out.append(u)
    return out


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_honours_the_contract(name: str) -> None:
    strategy = _build(name)
    rng = np.random.default_rng(0)
    updates = _updates(name, rng)
    msgs, agg = _round(strategy, updates, [1, 2, 3, 4, 5])
    assert [m.metadata.dst_node_id for m in msgs] == [100, 101, 102, 103, 104]  # all 5, in node order
    # fedex-lora and flora also send a frozen dense residual per LoRA module (out x in)
    residual = {"m.q_proj.frozen_residual"} if name in ("fedex-lora", "flora") else set()
    assert set(agg) == set(updates[0]) | residual
    for k, v in agg.items():
        if k in residual:
            assert v.shape == (4, 3) and np.isfinite(v).all() and np.abs(v).max() < 0.1
            continue
        assert v.shape == GLOBAL[k].shape and np.isfinite(v).all()
        # every strategy lands within the spread of the clients' values (plus the server step)
        assert np.abs(v - GLOBAL[k]).max() < 0.1
    config = msgs[0].content["config"]
    expected = {
        "fedprox": ("proximal-mu", 0.01),
        "ffa-lora": ("train-lora-a", False),
        "fedsa-lora": ("upload-lora-b", False),
    }
    if name in expected:
        key, value = expected[name]
        assert config[key] == value


def test_fedavg_is_the_example_weighted_mean() -> None:
    u1 = {A: np.ones((2, 3)), B: np.full((4, 2), 2.0)}
    u2 = {A: np.full((2, 3), 4.0), B: np.full((4, 2), -1.0)}
    _, agg = _round(_build("fedavg"), [u1, u2], [1, 3])
    np.testing.assert_allclose(agg[A], np.full((2, 3), (1 + 3 * 4) / 4))
    np.testing.assert_allclose(agg[B], np.full((4, 2), (2 - 3) / 4))


def test_fedavgm_momentum_hand_computed() -> None:
    """Round 1: momentum v = delta, w = w0 + lr * v (delta = mean - w0 = 0.5 on A)."""
    u = {A: np.full((2, 3), 1.0), B: np.zeros((4, 2))}
    _, agg = _round(_build("fedavgm", {"server_learning_rate": 2.0, "server_momentum": 0.9}), [u, u], [1, 1])
    np.testing.assert_allclose(agg[A], np.full((2, 3), 0.5 + 2.0 * 0.5), rtol=1e-6)


def test_fedadam_first_step_hand_computed() -> None:
    """delta = 0.5; m = (1-b1) delta; v = (1-b2) delta^2; Flower's FedAdam bias-corrects with
    eta * sqrt(1-b2^t)/(1-b1^t) with t = round + 1; w = w0 + eta_t * m / (sqrt(v) + tau)."""
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    u = {A: np.full((2, 3), 1.0), B: np.zeros((4, 2))}
    _, agg = _round(_build("fedadam", {"eta": eta, "beta_1": b1, "beta_2": b2, "tau": tau}), [u, u], [1, 1])
    m, v = (1 - b1) * 0.5, (1 - b2) * 0.25
    t = 2  # Flower's FedAdam bias-corrects with t = server_round + 1
    eta_t = eta * np.sqrt(1 - b2**t) / (1 - b1**t)
    np.testing.assert_allclose(agg[A], np.full((2, 3), 0.5 + eta_t * m / (np.sqrt(v) + tau)), rtol=1e-5)


@pytest.mark.parametrize("attack", ["scaled x100", "sign-flipped"])
@pytest.mark.parametrize("name", ["krum", "multikrum", "median", "trimmed-mean", "norm-bound"])
def test_robust_aggregators_recover_the_honest_mean(name: str, attack: str) -> None:
    rng = np.random.default_rng(1)
    honest = [
        {k: v + 0.1 + rng.normal(0, 0.005, v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(4)
    ]
    delta = {k: honest[0][k] - GLOBAL[k] for k in GLOBAL}
    bad = {k: GLOBAL[k] + (100 * delta[k] if attack == "scaled x100" else -10 * delta[k]) for k in GLOBAL}
    updates = [*honest, bad]
    mean = {k: np.mean([u[k] for u in honest], axis=0) for k in GLOBAL}
    params = {"max_norm": 0.5} if name == "norm-bound" else {}
    _, robust = _round(_build(name, params), updates, [1, 1, 1, 1, 1])
    _, plain = _round(_build("fedavg"), updates, [1, 1, 1, 1, 1])
    err_robust = max(float(np.abs(robust[k] - mean[k]).max()) for k in GLOBAL)
    err_plain = max(float(np.abs(plain[k] - mean[k]).max()) for k in GLOBAL)
    assert err_plain > 0.2  # plain FedAvg is dragged away by the one bad update
    assert err_robust < 0.06, (name, attack, err_robust)


def test_clip_update_hand_computed() -> None:
    ref = {"a": np.array([1.0, 1.0]), "b": np.array([0.0])}
    clipped, norm = clip_update({"a": np.array([4.0, 5.0]), "b": np.array([12.0])}, ref, 2.6)
    assert norm == pytest.approx(13.0)  # delta (3, 4, 12)
    np.testing.assert_allclose(clipped["a"], [1.6, 1.8], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [2.4], rtol=1e-6)


def test_bad_parameters_are_refused() -> None:
    for name, params in (
        ("fedprox", {"proximal_mu": -1}),
        ("trimmed-mean", {"beta": 0.6}),
        ("krum", {"num_malicious_nodes": -1}),
        ("norm-bound", {"max_norm": 0}),
        ("fedadam", {"tau": 0}),
    ):
        with pytest.raises(registry.StrategyConfigError):
            _build(name, params)


def test_capability_flags_say_what_each_strategy_can_run_with() -> None:
    specs = registry.available()
    assert {s.name for s in specs if s.secure_aggregation} == {"fedavg", "fedprox", "ffa-lora", "fedsa-lora"}
    assert {s.name for s in specs if not s.central_dp} == {"fedex-lora", "flora", "hetlora"}
    assert {s.name for s in specs if s.heterogeneous_ranks} == {"flora", "hetlora"}
    assert not any(s.secure_aggregation and s.needs_individual_updates for s in specs)


def test_the_flag_not_a_name_list_decides_secure_aggregation() -> None:
    from fedslm.strategies.checks import check_central_dp, check_secure_aggregation
    from fedslm.strategies.spec import StrategyConfigError, StrategySpec

    fed = {"num_clients": 4, "fraction_train": 1.0, "min_train_clients": 2}
    cfg = config_from_dict({"federation": fed, "security": {"secure_aggregation": "secagg+"}})
    fedavg = registry.get("fedavg").cls
    check_secure_aggregation(StrategySpec("newcomer", fedavg, "a new mean", secure_aggregation=True), cfg)
    with pytest.raises(StrategyConfigError, match="'newcomer' is not implemented on it.*use one of fedavg, fedprox"):
        check_secure_aggregation(StrategySpec("newcomer", fedavg, "a new mean"), cfg)
    central = config_from_dict({"federation": fed, "privacy": {"mode": "central"}})
    check_central_dp(StrategySpec("newcomer", fedavg, "a new mean"), central)
    with pytest.raises(StrategyConfigError, match="'newcomer' aggregates products"):
        check_central_dp(StrategySpec("newcomer", fedavg, "a new mean", central_dp=False), central)
