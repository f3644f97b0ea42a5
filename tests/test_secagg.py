"""Secure aggregation (``security.secure_aggregation: secagg+``): what is refused at config load and
why, the fixed key order the legacy API needs, SecAgg+'s quantization error against a hand-derived
bound, and a tiny federation whose secure aggregate equals the plain FedAvg one within that bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fedslm.server.preflight import load_run
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedslm import secagg
from fedslm.config import ConfigError, SecurityConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SECURE = "security.secure_aggregation=secagg+"


def _load(*overrides: str):
    return load_run(TINY, [SECURE, *overrides])


# ------------------------------------------------------------------------------------------------
# config: what cannot work is refused at load, with the reason


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "ffa-lora", "fedsa-lora"])
def test_means_of_uploads_are_accepted(name: str) -> None:
    cfg = _load(f"strategy.name={name}", "privacy.mode=local")
    assert cfg.security.secure_aggregation == "secagg+" and cfg.security.secure


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["strategy.name=krum"], "'krum' needs every client's individual update"),
        (["strategy.name=multikrum"], "'multikrum' needs every client's individual update"),
        (["strategy.name=median"], "'median' needs every client's individual update"),
        (["strategy.name=trimmed-mean"], "'trimmed-mean' needs every client's individual update"),
        (["strategy.name=norm-bound"], "'norm-bound' needs every client's individual update"),
        (["strategy.name=fedex-lora"], "'fedex-lora' needs every client's individual update"),
        (["strategy.name=flora"], "'flora' needs every client's individual update"),
        (["strategy.name=hetlora"], "'hetlora' needs every client's individual update"),
        (["strategy.name=fedadam"], "'fedadam' is not implemented on it"),
        (["strategy.name=fedyogi"], "'fedyogi' is not implemented on it"),
        (["strategy.name=fedadagrad"], "'fedadagrad' is not implemented on it"),
        (["strategy.name=fedavgm"], "'fedavgm' is not implemented on it"),
        (["privacy.mode=central"], "privacy.mode 'central' clips each client's update on the server"),
        (["privacy.mode=both"], "privacy.mode 'both' clips each client's update on the server"),
        (["communication.quantize_delta=true"], "communication.quantize_delta/topk send compressed deltas"),
        (["communication.topk=0.1"], "communication.quantize_delta/topk send compressed deltas"),
        (["security.update_norm_bound=2.5"], "security.update_norm_bound=2.5 checks each client's update"),
        (["eval.per_client=true"], "eval.per_client is not implemented on the SecAgg+ path"),
        (
            ["federation.min_train_clients=1", "federation.fraction_train=0.25"],
            "SecAgg+ needs at least 2 clients per round, federation samples 1",
        ),
        (
            [
                "federation.fraction_train=0.5",
                "security.secagg_num_shares=5",
                "security.secagg_reconstruction_threshold=3",
            ],
            "secagg_reconstruction_threshold=3 > the 2 clients sampled per round",
        ),
        (["security.secagg_quantization_range=2147483648"], "4 clients x security.secagg_quantization_range"),
    ],
)
def test_combinations_that_cannot_work_are_refused_with_the_reason(overrides: list[str], reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    assert reason in str(e.value) and "tiny.yaml" in str(e.value)


def test_the_same_combinations_are_fine_without_secure_aggregation() -> None:
    cfg = load_config(TINY, ["strategy.name=krum", "privacy.mode=central", "security.update_norm_bound=2.5"])
    assert not cfg.security.secure


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["security.secagg_num_shares=2"], "security.secagg_num_shares: 2: a count must be >= 3"),
        (["security.secagg_num_shares=1.5"], "security.secagg_num_shares: 1.5: a fraction must be in (0, 1]"),
        (["security.secagg_reconstruction_threshold=1"], "secagg_reconstruction_threshold: 1: a count must be >= 2"),
        (["security.secagg_reconstruction_threshold=3"], "3 must be < secagg_num_shares=3"),
        (["security.secagg_reconstruction_threshold=0.0"], "a fraction must be in (0, 1]"),
        (["security.secagg_max_weight=0"], "security.secagg_max_weight: must be > 0"),
        (["security.secagg_clipping_range=-1"], "security.secagg_clipping_range: must be > 0"),
        (["security.secagg_quantization_range=1"], "security.secagg_quantization_range: 1 not in [2, 2**32)"),
        (["security.secure_aggregation=secagg"], "'secagg' is not allowed; choose one of ['none', 'secagg+']"),
    ],
)
def test_secagg_parameters_are_checked(overrides: list[str], reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    assert reason in str(e.value)


def test_fractions_of_the_sampled_clients_are_accepted_and_survive_the_yaml_round_trip() -> None:
    from fedslm.config import config_from_dict

    cfg = _load("security.secagg_num_shares=1.0", "security.secagg_reconstruction_threshold=0.5")
    back = config_from_dict(__import__("yaml").safe_load(cfg.to_yaml()))  # what a client parses
    assert back.security == cfg.security
    assert isinstance(back.security.secagg_num_shares, float) and isinstance(back.security.secagg_max_weight, float)


# ------------------------------------------------------------------------------------------------
# the fixed key order and packing

STATE = {
    "m.layers.1.q_proj.lora_B.weight": torch.full((6, 2), 3.0),
    "m.layers.0.q_proj.lora_A.weight": torch.arange(6.0).reshape(2, 3),
    "m.layers.0.q_proj.lora_B.weight": torch.ones(3, 2, dtype=torch.float64),
    "m.layers.1.q_proj.lora_A.weight": torch.zeros(2, 6),
}


def test_keys_are_sorted_and_packing_round_trips_in_float32() -> None:
    keys = secagg.adapter_keys(STATE)
    assert keys == sorted(STATE) and keys[0] == "m.layers.0.q_proj.lora_A.weight"
    packed = secagg.pack(STATE, keys)
    assert [a.shape for a in packed] == [(2, 3), (3, 2), (2, 6), (6, 2)]
    assert all(a.dtype == np.float32 for a in packed)
    back = secagg.unpack(packed, keys, STATE)
    assert list(back) == keys and all(torch.equal(back[k], STATE[k].float()) for k in keys)


def test_packing_refuses_tensors_outside_the_agreed_order() -> None:
    keys = secagg.adapter_keys(STATE)
    with pytest.raises(secagg.SecAggError, match="1 of the agreed tensors are missing"):
        secagg.pack({k: STATE[k] for k in keys[1:]}, keys)
    with pytest.raises(secagg.SecAggError, match="1 tensors are not in the agreed order"):
        secagg.pack(STATE, keys[1:])
    with pytest.raises(secagg.SecAggError, match="3 arrays for 4 agreed tensors"):
        secagg.unpack(secagg.pack(STATE, keys)[:3], keys)
    wrong = secagg.pack(STATE, keys)
    wrong[0] = np.zeros((3, 2), np.float32)
    with pytest.raises(secagg.SecAggError, match=r"lora_A.weight' has shape \(3, 2\), expected \(2, 3\)"):
        secagg.unpack(wrong, keys, STATE)


@pytest.mark.parametrize(
    "name, uploads",
    [("fedavg", "AB"), ("fedprox", "AB"), ("ffa-lora", "B"), ("fedsa-lora", "A")],
)
def test_upload_keys_follow_what_each_strategy_uploads(name: str, uploads: str) -> None:
    from fedslm.strategies import registry

    strategy = registry.build(_load(f"strategy.name={name}"))
    keys = secagg.adapter_keys(STATE)
    up = secagg.upload_keys(keys, strategy.client_config(1))
    assert up == [k for k in keys if any(f"lora_{x}" in k for x in uploads)]


# ------------------------------------------------------------------------------------------------
# SecAgg+'s arithmetic against the bound (Flower's own quantize / mask / dequantize steps)


def _secaggplus_mean(uploads: list[list[np.ndarray]], num_examples: list[int], sec: SecurityConfig) -> list:
    """What SecAgg+ computes, step for step as secaggplus_mod and SecAggPlusWorkflow, with random
    masks that cancel in the sum (the cryptography is Flower's and not re-tested here)."""
    c, q, mod, w = sec.secagg_clipping_range, sec.secagg_quantization_range, 2**32, sec.secagg_max_weight
    rng = np.random.default_rng(0)
    masks = [[rng.integers(0, mod, a.shape, dtype=np.int64) for a in [np.zeros(1), *uploads[0]]] for _ in uploads]
    total_mask = [sum(ms) for ms in zip(*masks, strict=True)]
    masked_sum = None
    for params, n, mask in zip(uploads, num_examples, masks, strict=True):
        q_ratio = round(n / w * q)
        quantized = factor_combine(q_ratio, quantize(parameters_multiply(params, q_ratio / q), c, q))
        vec = parameters_mod(parameters_addition(quantized, mask), mod)
        masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)
    unmasked = parameters_mod(parameters_subtraction(masked_sum, total_mask), mod)
    q_total, unmasked = factor_extract(unmasked)
    out = dequantize(unmasked, c, q)
    return [(v - (len(uploads) - 1) * c) * (q / q_total) for v in out]


@pytest.mark.parametrize("clients", [2, 4, 9])
def test_secaggplus_mean_is_within_the_bound_of_the_exact_weighted_mean(clients: int) -> None:
    sec = SecurityConfig()
    rng = np.random.default_rng(clients)
    uploads = [[rng.normal(0, 0.3, (8, 16)), rng.normal(0, 0.05, (16,))] for _ in range(clients)]
    num_examples = [int(n) for n in rng.integers(20, 400, clients)]
    np.random.seed(clients)  # Flower's stochastic rounding draws from numpy's global generator
    got = _secaggplus_mean(uploads, num_examples, sec)
    exact = [sum(n * u[i] for n, u in zip(num_examples, uploads, strict=True)) / sum(num_examples) for i in range(2)]
    max_abs = max(float(np.abs(a).max()) for u in uploads for a in u)
    bound = secagg.quantization_error_bound(num_examples, max_abs, sec)
    err = max(float(np.abs(g - e).max()) for g, e in zip(got, exact, strict=True))
    assert 0 < err <= bound
    assert bound < 2e-3  # a few steps of 2C/Q = 3.8e-6, scaled by max_weight / sum(n)


def test_error_bound_by_hand_and_clipping_refused() -> None:
    sec = SecurityConfig()  # C = 8, Q = 2**22, W = 1000
    assert secagg.weight_ratio(250, sec) == 0.25
    # 2 clients of 250 examples: R = 0.5; 2 * (16 / 2**22) / 0.5 + 2 * 1.0 / (2**22 * 0.5)
    assert secagg.quantization_error_bound([250, 250], 1.0, sec) == pytest.approx(
        2 * 16 / 2**22 / 0.5 + 2 / 2**22 / 0.5, rel=1e-12
    )
    with pytest.raises(secagg.SecAggError, match="exceeds secagg_clipping_range=8"):
        secagg.quantization_error_bound([500], 20.0, sec)  # 20 x 0.5 = 10 > 8: clipped


def test_payload_bytes_count_arrays_strings_bytes_and_numbers() -> None:
    from fedslm.grid import payload_nbytes

    arr = np.zeros(4, dtype=np.float32)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"k": Array(arr)}),
            "cfg": ConfigRecord({"ab": b"xyz", "lst": [b"12", b"3"], "empty": [], "s": "hello"}),
            "m": MetricRecord({"n": 3}),
        }
    )
    expected = len(Array(arr).data) + 1 + (2 + 3) + (3 + 3) + 5 + (1 + 5) + (1 + 8)
    assert payload_nbytes(content) == expected


# ------------------------------------------------------------------------------------------------
# a tiny federation: secure aggregate == plain FedAvg aggregate, within SecAgg+'s quantization


def _adapter(out: Path, rnd: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapters" / f"round-{rnd:03d}" / "adapter_model.safetensors"))


@pytest.mark.integration
def test_secaggplus_federation_matches_plain_fedavg_within_quantization(tmp_path: Path) -> None:
    from fedslm.simulation.run import simulate

    from fedslm import data
    from fedslm.model import cache_root

    common = ["federation.num_rounds=1", "train.local_steps=2", "seed=0"]
    plain_cfg = load_config(TINY, [*common, "communication.dtype=float32"])  # fp32 both ways: a fair comparison
    secure_cfg = load_config(TINY, [*common, SECURE])
    plain_rows = simulate(plain_cfg, tmp_path / "plain", progress=False)
    secure_rows = simulate(secure_cfg, tmp_path / "secure", progress=False)

    assert [r["round"] for r in secure_rows] == [0, 1]
    assert secure_rows[1]["clients"] == 4 and not secure_rows[1]["skipped"]
    assert secure_rows[1]["bytes_up"] > 4 * 1792 * 4  # masked integer vectors, bigger than fp32
    assert secure_rows[0]["eval_loss"] == pytest.approx(plain_rows[0]["eval_loss"], abs=1e-9)  # same start
    summary = json.loads((tmp_path / "secure" / "summary.json").read_text())
    assert summary["last"]["round"] == 1 and summary["strategy"] == "fedavg"
    lines = (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]

    start, plain, secure = (
        _adapter(tmp_path / "plain", 0),
        _adapter(tmp_path / "plain", 1),
        _adapter(tmp_path / "secure", 1),
    )
    assert all(torch.equal(start[k], _adapter(tmp_path / "secure", 0)[k]) for k in start)
    assert any(not torch.equal(start[k], plain[k]) for k in start)  # the round moved the adapter
    # the weights: each client's training examples (natural split, 10% kept for its validation)
    sizes = [len(data.client_records(plain_cfg.data, cache_root(plain_cfg.model), c, 4).records) for c in range(4)]
    num_examples = [n - int(n * 0.1) for n in sizes]
    # a client's values moved from the start by at most ~lr per AdamW step: a generous bound on |p_i|
    max_abs = max(float(t.abs().max()) for t in start.values()) + 10 * 2 * plain_cfg.train.learning_rate
    bound = secagg.quantization_error_bound(num_examples, max_abs, secure_cfg.security)
    bound += 1e-6 * max_abs  # float32 rounding of the plain mean
    diff = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    print(f"secagg+ vs plain fedavg: max abs difference {diff:.3g}, bound {bound:.3g}")
    assert diff <= bound, (diff, bound)


def test_the_normal_server_app_refuses_a_secure_config_instead_of_ignoring_it(tmp_path: Path) -> None:
    from fedslm.server.app import run_federation

    with pytest.raises(
        ConfigError, match='serverapp = "fedslm.server.secagg:app" and clientapp = "fedslm.client.secagg:app"'
    ):
        run_federation(None, _load(), tmp_path, "run")  # type: ignore[arg-type]  # refused before the grid is used
