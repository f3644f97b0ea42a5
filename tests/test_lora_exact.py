"""FedEx-LoRA, FLoRA and HetLoRA: hand-computed maths, exactness through the Flower shells, frozen
residuals on a real PEFT model, heterogeneous client profiles (schema, assignment, rejection)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedslm.server.preflight import run_from_dict
from fedslm.strategies import lora_maths, registry
from fedslm.strategies.lora_maths import (
    effective_deltas,
    fedex_aggregate,
    flora_stack,
    hetlora_aggregate,
    hetlora_weights,
)
from flower_fakes import FakeGrid, train_reply
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedslm.adapters import RESIDUAL_SUFFIX, fit_rank, load_adapter_state, peft_config, residuals_of
from fedslm.config import (
    ConfigError,
    apply_profile,
    assign_profiles,
    client_profile,
    config_from_dict,
    profile_counts,
)

M = "m.q_proj"
A, B, R = M + ".lora_A.weight", M + ".lora_B.weight", M + RESIDUAL_SUFFIX


def _adapter(a: list, b: list) -> dict[str, np.ndarray]:
    return {A: np.array(a, dtype=np.float64), B: np.array(b, dtype=np.float64)}


# -- pure maths, by hand --------------------------------------------------------------------------


def test_residual_suffix_is_shared() -> None:
    assert lora_maths.RESIDUAL_SUFFIX == RESIDUAL_SUFFIX


def test_fedex_hand_computed() -> None:
    """p = (1/4, 3/4); B1 A1 = [[1,0],[0,0]], B2 A2 = [[0,0],[0,2]] -> mean product [[.25,0],[0,1.5]];
    mean A = [.25,.75], mean B = [.25,1.5]^T -> BA = [[.0625,.1875],[.375,1.125]]; R = 2 (difference)."""
    u1, u2 = _adapter([[1, 0]], [[1], [0]]), _adapter([[0, 1]], [[0], [2]])
    mean, res = fedex_aggregate([u1, u2], [1, 3], scaling=2.0)
    np.testing.assert_allclose(mean[A], [[0.25, 0.75]])
    np.testing.assert_allclose(mean[B], [[0.25], [1.5]])
    np.testing.assert_allclose(res[M], [[0.375, -0.375], [-0.75, 0.75]])


def test_flora_stack_hand_computed_mixed_ranks() -> None:
    """Rank 1 and rank 2, p = (1/2, 1/2): B_stack A_stack = .5 B1 A1 + .5 B2 A2 = [[1.5, 1], [.5, 2]]."""
    a1, b1 = np.array([[1.0, 2.0]]), np.array([[1.0], [1.0]])
    a2, b2 = np.eye(2), np.array([[2.0, 0.0], [0.0, 2.0]])
    a_stack, b_stack = flora_stack([a1, a2], [b1, b2], [5, 5])
    np.testing.assert_allclose(a_stack, [[0.5, 1.0], [0.5, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(b_stack, [[1.0, 2.0, 0.0], [1.0, 0.0, 2.0]])
    np.testing.assert_allclose(b_stack @ a_stack, [[1.5, 1.0], [0.5, 2.0]])
    with pytest.raises(ValueError, match="client 1: lora_A has rank 2, lora_B has rank 1"):
        flora_stack([a1, a2], [b1, b1], [1, 1])


def test_hetlora_hand_computed() -> None:
    """Client 1 rank 1 (||B A|| = 1), client 2 rank 2 (||B A|| = 3): p = (1/4, 3/4) whatever the
    example counts; padded A = [[1,0],[0,0]], I; padded B = [[1,0],[0,0]], diag(0,3)."""
    u1 = _adapter([[1, 0]], [[1], [0]])
    u2 = _adapter(np.eye(2).tolist(), [[0, 0], [0, 3]])
    np.testing.assert_allclose(hetlora_weights([u1[A], u2[A]], [u1[B], u2[B]]), [0.25, 0.75])
    agg = hetlora_aggregate([u1, u2], [100, 1], rank=2)
    np.testing.assert_allclose(agg[A], [[1.0, 0.0], [0.0, 0.75]])
    np.testing.assert_allclose(agg[B], [[0.25, 0.0], [0.0, 2.25]])
    back = fit_rank({k: torch.from_numpy(v) for k, v in agg.items()}, 1)  # client 1 truncates to rank 1
    np.testing.assert_allclose(back[A].numpy(), [[1.0, 0.0]])
    np.testing.assert_allclose(back[B].numpy(), [[0.25], [0.0]])
    with pytest.raises(ValueError, match="rank 2 exceeds the global rank 1"):
        hetlora_aggregate([u1, u2], [1, 1], rank=1)
    zero = _adapter([[1, 0]], [[0], [0]])
    np.testing.assert_allclose(hetlora_weights([zero[A], zero[A]], [zero[B], zero[B]]), [0.5, 0.5])


def test_fit_rank_pads_with_zeros() -> None:
    state = {A: torch.ones(1, 3), B: torch.ones(2, 1), "head.weight": torch.ones(2)}
    out = fit_rank(state, 2)
    assert out[A].tolist() == [[1, 1, 1], [0, 0, 0]] and out[B].tolist() == [[1, 0], [1, 0]]
    assert out["head.weight"] is state["head.weight"]


def test_bad_weights_are_refused() -> None:
    u = _adapter([[1, 0]], [[1], [0]])
    with pytest.raises(ValueError, match="not all 0"):
        fedex_aggregate([u, u], [0, 0], 1.0)


# -- exactness through the Flower shells ------------------------------------------------------------


def _build(name: str, n: int, extra: dict | None = None):
    raw = {
        "lora": {"r": 4, "alpha": 8},
        "federation": {"num_clients": n, "fraction_train": 1.0, "min_train_clients": 2},
        "strategy": {"name": name},
        **(extra or {}),
    }
    return registry.build(config_from_dict(raw))


def _round(strategy, rnd: int, global_: dict, updates: list[dict], weights: list[int]) -> dict[str, np.ndarray]:
    arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in global_.items()})
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(len(updates))))
    replies = [train_reply(m.metadata.dst_node_id, u, w) for m, u, w in zip(msgs, updates, weights, strict=True)]
    out, metrics = strategy.aggregate_train(rnd, replies)
    assert metrics is not None and metrics["train-loss"] == pytest.approx(1.0)
    return {**global_, **{k: v.numpy() for k, v in out.items()}}  # the server's merge


def _client(rng: np.random.Generator, rank: int, d_in: int = 5, d_out: int = 6) -> dict[str, np.ndarray]:
    return {A: rng.normal(0, 1, (rank, d_in)).astype(np.float32), B: rng.normal(0, 1, (d_out, rank)).astype(np.float32)}


def test_fedex_lora_global_update_is_the_exact_mean_over_rounds() -> None:
    """Each round the global B A * scaling + accumulated residual equals the example-weighted mean
    of the clients' effective updates (their B_i A_i * scaling on top of the residual they got)."""
    rng = np.random.default_rng(0)
    strategy, scaling, weights = _build("fedex-lora", 3), 8 / 4, [1, 2, 5]
    global_ = _client(rng, 4)
    for rnd in (1, 2):
        old_r = global_.get(R, np.zeros((6, 5)))
        updates = [_client(rng, 4) for _ in weights]
        global_ = _round(strategy, rnd, global_, updates, weights)
        exact = (
            sum(w * (scaling * u[B].astype(np.float64) @ u[A] + old_r) for u, w in zip(updates, weights, strict=True))
            / 8
        )
        np.testing.assert_allclose(effective_deltas(global_, scaling)[M], exact, atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            global_[A], sum(w * u[A] for u, w in zip(updates, weights, strict=True)) / 8, atol=1e-6
        )


def test_flora_is_exact_with_mixed_ranks_and_restarts() -> None:
    rng = np.random.default_rng(1)
    profiles = {"clients": {"profiles": {"s": {"rank": 1}, "m": {"rank": 2}, "l": {}}, "mix": {"s": 1, "m": 1, "l": 1}}}
    strategy, scaling, weights = _build("flora", 3, profiles), 8 / 4, [3, 1, 4]
    init = {A: rng.normal(0, 1, (4, 5)).astype(np.float32), B: np.zeros((6, 4), np.float32)}
    global_, total = dict(init), np.zeros((6, 5))
    for rnd in (1, 2):
        updates = [_client(rng, r) for r in (1, 2, 4)]
        global_ = _round(strategy, rnd, global_, updates, weights)
        total += sum(w * scaling * u[B].astype(np.float64) @ u[A] for u, w in zip(updates, weights, strict=True)) / 8
        np.testing.assert_allclose(global_[R], total, atol=1e-5, rtol=1e-6)
        np.testing.assert_allclose(effective_deltas(global_, scaling)[M], total, atol=1e-5, rtol=1e-6)
        np.testing.assert_array_equal(global_[A], init[A])  # every round restarts from the fresh LoRA
        np.testing.assert_array_equal(global_[B], 0)


def test_hetlora_shell_pads_and_keeps_the_global_rank() -> None:
    profiles = {"clients": {"profiles": {"s": {"rank": 1}, "l": {"rank": 2}}, "mix": {"s": 0.5, "l": 0.5}}}
    raw_strategy = _build("hetlora", 2, {**profiles, "lora": {"r": 2, "alpha": 4}})
    u1 = {k: v.astype(np.float32) for k, v in _adapter([[1, 0]], [[1], [0]]).items()}
    u2 = {k: v.astype(np.float32) for k, v in _adapter(np.eye(2).tolist(), [[0, 0], [0, 3]]).items()}
    global_ = {A: np.zeros((2, 2), np.float32), B: np.zeros((2, 2), np.float32)}
    out = _round(raw_strategy, 1, global_, [u1, u2], [7, 1])
    np.testing.assert_allclose(out[A], [[1.0, 0.0], [0.0, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(out[B], [[0.25, 0.0], [0.0, 2.25]], rtol=1e-6)


# -- frozen residuals on the tiny PEFT model ----------------------------------------------------------


def test_frozen_residual_is_applied_and_removed(tiny_peft) -> None:
    model = tiny_peft.model
    key = next(k for k in tiny_peft.initial if k.endswith(".lora_A.weight"))
    module_name = key[: -len(".lora_A.weight")]
    layer = dict(model.named_modules())[module_name]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        residual = torch.randn(layer.out_features, layer.in_features)
        load_adapter_state(model, {**tiny_peft.initial, module_name + RESIDUAL_SUFFIX: residual})
        torch.testing.assert_close(layer(x), before + x @ residual.T)
        assert set(residuals_of(model)) == {module_name}
        load_adapter_state(model, tiny_peft.initial)  # the model is exactly the state loaded
        torch.testing.assert_close(layer(x), before)
        assert residuals_of(model) == {}
    with pytest.raises(Exception, match="has shape"):
        load_adapter_state(model, {**tiny_peft.initial, module_name + RESIDUAL_SUFFIX: torch.zeros(2, 2)})
    with pytest.raises(Exception, match="names no LoRA module"):
        load_adapter_state(model, {**tiny_peft.initial, "nowhere" + RESIDUAL_SUFFIX: torch.zeros(2, 2)})


def test_a_lower_client_rank_keeps_the_global_scale(tiny_cfg) -> None:
    full, low = peft_config("llama", tiny_cfg.lora), peft_config("llama", tiny_cfg.lora, rank=2)
    assert (full.r, low.r) == (4, 2) and full.lora_alpha / full.r == low.lora_alpha / low.r == 2.0


# -- heterogeneous client profiles -------------------------------------------------------------------

PROFILES = {
    "profiles": {
        "phone": {"rank": 4, "local_steps": 2, "batch_size": 2, "gradient_checkpointing": True},
        "hospital": {"rank": 16, "quantization": "nf4", "local_steps": 10, "batch_size": 8},
    },
    "mix": {"phone": 0.5, "hospital": 0.5},
}


def _cfg(strategy: str = "hetlora", n: int = 6, **extra):
    # the strategy and profile rules only (scope "config"): the bundled data's 4 hospitals could not
    # give 5 or 6 simulated clients a partition each, which the full preflight refuses
    return run_from_dict(
        {
            "lora": {"r": 16, "alpha": 32},
            "federation": {"num_clients": n},
            "clients": PROFILES,
            "strategy": {"name": strategy},
            **extra,
        },
        scope="config",
    )


def test_profiles_are_assigned_deterministically() -> None:
    cfg = _cfg(n=5)
    assert profile_counts(cfg) == {"hospital": 3, "phone": 2}  # 2.5 each: the tie goes by name
    names = assign_profiles(cfg)
    assert sorted(names) == ["hospital"] * 3 + ["phone"] * 2 and names == assign_profiles(_cfg(n=5))
    name, prof = client_profile(cfg, names.index("phone"))
    assert (name, prof.rank, prof.quantization, prof.local_steps, prof.batch_size) == ("phone", 4, "nf4", 2, 2)
    assert apply_profile(cfg, prof).model.gradient_checkpointing is True  # the phone recomputes activations
    hospital = client_profile(cfg, 0, "hospital")[1]  # a node may name its own profile
    assert hospital.rank == 16 and apply_profile(cfg, hospital).model.gradient_checkpointing is False
    mix = {**PROFILES, "mix": {"phone": 1, "hospital": 2}}  # counts instead of fractions
    counts = config_from_dict(
        {"federation": {"num_clients": 3}, "lora": {"r": 16}, "clients": mix, "strategy": {"name": "flora"}}
    )
    assert profile_counts(counts) == {"hospital": 2, "phone": 1}
    plain = config_from_dict({})
    assert assign_profiles(plain) == [] and client_profile(plain, 3) == ("", client_profile(plain, 0)[1])
    with pytest.raises(ConfigError, match="client id 9 is outside federation.num_clients=5"):
        client_profile(cfg, 9)


@pytest.mark.parametrize(
    ("clients", "match"),
    [
        ({"profiles": {"phone": {"rnk": 4}}, "mix": {"phone": 1}}, r"clients.profiles.phone.rnk: unknown key; allowed"),
        ({"profiles": {"phone": {}}, "mix": {"tablet": 1}}, r"clients.mix.tablet: unknown profile; valid profiles are"),
        ({"profiles": {"phone": {"rank": 32}}, "mix": {"phone": 1}}, r"rank: 32 > lora.r=16"),
        ({"profiles": {"phone": {}}, "mix": {"phone": 0.4}}, r"clients.mix: shares sum to 0.4"),
        ({"profiles": {"phone": {}}}, r"clients.mix: give each profile a share"),
        ({"profiles": {"phone": {"quantization": "fp4"}}, "mix": {"phone": 1}}, r"'fp4' is not allowed"),
    ],
)
def test_bad_profiles_fail_at_load(clients: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"lora": {"r": 16}, "clients": clients})


def test_mixed_ranks_need_a_heterogeneous_strategy() -> None:
    assert {s.name for s in registry.available() if s.heterogeneous_ranks} >= {"flora", "hetlora"}
    _cfg("hetlora"), _cfg("flora")  # accepted
    with pytest.raises(ConfigError, match=r"'fedavg' aggregates adapters of one rank.*use a strategy for mixed ranks"):
        _cfg("fedavg")
    with pytest.raises(ConfigError, match=r"'fedex-lora' aggregates adapters of one rank"):
        _cfg("fedex-lora")
    same = {"profiles": {"a": {"rank": 16}, "b": {"local_steps": 1}}, "mix": {"a": 1, "b": 1}}
    config_from_dict({"lora": {"r": 16}, "federation": {"num_clients": 2}, "clients": same})  # one rank: fine
    with pytest.raises(ConfigError, match=r"privacy.mode 'central' clips each update .* needs every client at rank"):
        _cfg("hetlora", privacy={"mode": "central"})
    with pytest.raises(ConfigError, match=r"communication.quantize_delta/topk send update - global"):
        _cfg("hetlora", communication={"topk": 0.1})
    _cfg("hetlora", communication={"dtype": "float16"})  # a compact dtype alone is fine
    with pytest.raises(ConfigError, match=r"'fedex-lora' aggregates products B_i A_i .* use privacy.mode local"):
        run_from_dict({"strategy": {"name": "fedex-lora"}, "privacy": {"mode": "both"}})


# -- a client of a lower rank (in process) ------------------------------------------------------------


@pytest.fixture
def restore_resident(_tiny_resident, tiny_cfg):
    """A lower client rank re-wraps the process's resident base with LoRA of that rank; afterwards
    the session's tiny model (rank 4) is wrapped again (same seeded init) and put back in place."""
    from fedslm.adapters import PEFT_CACHE

    yield
    new = PEFT_CACHE.get(tiny_cfg.model, tiny_cfg.lora)
    _tiny_resident.model, _tiny_resident.key, _tiny_resident.initial = new.model, new.key, new.initial
    PEFT_CACHE._current = _tiny_resident


def test_a_rank_2_client_trains_its_slice_with_the_residual(tiny_cfg, _tiny_resident, restore_resident, tmp_path):
    """HetLoRA/FLoRA on the client: the global rank-4 adapter is truncated to the client's rank 2,
    the frozen residual is applied during training, and only rank-2 A and B go back."""
    import dataclasses

    from fedslm.client.runner import ClientRunner
    from fedslm.client.state import ClientStore

    from fedslm import wire
    from fedslm.adapters import to_arrayrecord
    from fedslm.protocol import LoRAPlan

    initial = dict(_tiny_resident.initial)
    module = next(k for k in initial if k.endswith(".lora_A.weight"))[: -len(".lora_A.weight")]
    d_out, d_in = initial[module + ".lora_B.weight"].shape[0], initial[module + ".lora_A.weight"].shape[1]
    residual = torch.full((d_out, d_in), 1e-3)
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, local_steps=1))
    runner = ClientRunner(cfg, 0, 4, "", 1, LoRAPlan(), ClientStore(tmp_path), rank=2, profile="small")
    arrays, metrics = runner.train(to_arrayrecord({**initial, module + RESIDUAL_SUFFIX: residual}))
    state = wire.decode(arrays)
    assert metrics["lora-rank"] == 2 and metrics["num-examples"] > 0
    assert set(state) == set(initial)  # the residual is never uploaded
    assert all(v.shape[0 if k.endswith("lora_A.weight") else 1] == 2 for k, v in state.items())
    model = runner._resident().model
    assert model.peft_config["default"].r == 2 and set(residuals_of(model)) == {module}
    torch.testing.assert_close(residuals_of(model)[module], residual)


def test_fedsa_client_evaluates_with_its_own_b(tiny_cfg, tiny_peft, tmp_path):
    """FedSA-LoRA personalises through B: a client scores the global A with ITS OWN B (kept at home),
    not with the global B (never aggregated, zero); other strategies score the global adapter as sent."""
    from fedslm.client.runner import ClientRunner
    from fedslm.client.state import ClientStore

    from fedslm import wire
    from fedslm.adapters import adapter_state
    from fedslm.protocol import LoRAPlan

    initial = dict(tiny_peft.initial)
    own_b = {k: torch.full_like(v, 0.01 * (i + 1)) for i, (k, v) in enumerate(initial.items()) if "lora_B" in k}
    store = ClientStore(tmp_path / "client-0")
    store.save_tensors("local-lora-b", own_b)
    global_b = {k: initial[k] for k in own_b}  # never aggregated under FedSA: the zero init
    sent = wire.encode({k: v + 0.5 for k, v in initial.items() if "lora_A" in k} | global_b, "float32")
    for keys, expect_b in ((LoRAPlan(upload_lora_b=False), own_b), (LoRAPlan(), global_b)):
        runner = ClientRunner(tiny_cfg, 0, 4, "", 1, keys, store)
        metrics = runner.evaluate(sent)
        loaded = adapter_state(tiny_peft.model)
        assert all(torch.equal(loaded[k], v) for k, v in expect_b.items()), keys
        assert all(torch.allclose(loaded[k], initial[k] + 0.5) for k in initial if "lora_A" in k)
        assert metrics["num-examples"] > 0 and math.isfinite(metrics["eval_loss"])
