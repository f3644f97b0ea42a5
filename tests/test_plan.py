"""The local-DP plan checked before anything trains: per-client numbers, and infeasible budgets or batches refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedslm.config import ConfigError, load_config
from fedslm.model import cache_root
from fedslm.plan import check_privacy_plan, plan_line, train_sizes
from fedslm.privacy import ClientAccountant, calibrate_noise

ROOT = Path(__file__).resolve().parent.parent

TINY = ROOT / "configs" / "tiny.yaml"


def _cfg(*overrides: str):  # noqa: ANN202 - a RunConfig
    return load_config(TINY, ["privacy.mode=local", *overrides])


def test_plan_is_what_each_client_calibrates() -> None:
    cfg = _cfg()
    sizes = train_sizes(cfg, cache_root(cfg.model))
    assert len(sizes) == 4 and all(40 <= n <= 70 for n in sizes)  # 216 training records over 4 hospitals, less 10%
    plans = check_privacy_plan(cfg, cache_root(cfg.model))
    assert [p.client_id for p in plans] == [0, 1, 2, 3] and [p.records for p in plans] == sizes
    for p in plans:  # 2 rounds x 3 steps, every client every round; batch 4 of n records
        assert (p.batch_size, p.steps, p.sample_rate) == (4, 6, 4 / p.records)
        assert p.noise_multiplier == calibrate_noise(8.0, 1e-5, 4 / p.records, 6, accountant="pld")
        assert 7.84 <= ClientAccountant("pld", [(p.noise_multiplier, p.sample_rate, 6)]).epsilon(1e-5) <= 8.0
    line = plan_line(plans, cfg.privacy)
    assert line.startswith("epsilon 8 at delta 1e-05 (pld) per client over the run; 4 clients") and "steps 6" in line
    plain = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, mode="none"))
    assert check_privacy_plan(plain, cache_root(cfg.model)) == []


def test_an_unreachable_budget_is_refused_with_the_feasible_floor() -> None:
    cfg = _cfg("privacy.target_epsilon=0.01")
    with pytest.raises(ConfigError, match=r"^privacy.target_epsilon: 0.01 is out of reach for client 0") as err:
        check_privacy_plan(cfg, cache_root(cfg.model))
    floor = float(str(err.value).split("target_epsilon >= ")[1].split(" ")[0])
    assert 0.01 < floor < 0.02
    # just above the floor the plan is feasible, with a noise multiplier at the cap or below
    ok = _cfg(f"privacy.target_epsilon={floor * 1.1}")
    assert all(p.noise_multiplier <= 50 for p in check_privacy_plan(ok, cache_root(ok.model)))


def test_a_logical_batch_larger_than_a_client_is_refused_naming_the_key() -> None:
    cfg = _cfg("train.batch_size=300")
    smallest = min(train_sizes(cfg, cache_root(cfg.model)))
    with pytest.raises(ConfigError, match=r"^train.batch_size: the logical batch 300 exceeds client \d's \d+ training"):
        check_privacy_plan(cfg, cache_root(cfg.model))
    fits = _cfg(f"train.batch_size={smallest}")
    assert max(p.sample_rate for p in check_privacy_plan(fits, cache_root(fits.model))) == 1.0


def test_privacy_plan_prints_each_client_and_epsilon_per_round_under_both_accountants(capsys) -> None:
    from fedslm.simulation.cli import main

    assert main(["privacy", "plan", str(TINY), "--set", "privacy.mode=local"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index("client  records  logical batch  q        steps  noise multiplier") + 1 :]
    clients = [line.split() for line in table[: table.index("")]]
    assert [int(c[0]) for c in clients] == [0, 1, 2, 3] and all(int(c[4]) == 6 for c in clients)  # 2 rounds x 3 steps
    rounds = [line.split() for line in out[out.index("round      pld      rdp") + 1 :]]
    assert [r[0] for r in rounds] == ["1", "2"]
    pld, rdp = [float(r[1]) for r in rounds], [float(r[2]) for r in rounds]
    assert pld[0] < pld[1] <= 8.0 < rdp[1] and rdp[0] > pld[0]  # calibrated on PLD; RDP says more for the same noise
    assert main(["privacy", "plan", str(TINY)]) == 0
    assert "nothing to plan" in capsys.readouterr().out
