"""The local-DP plan checked before anything trains: per-client numbers, and infeasible budgets or batches refused."""

from __future__ import annotations

import dataclasses
import json
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


def test_calibrations_are_remembered_across_processes_and_a_bad_entry_only_costs_a_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedslm import plan

    cfg = _cfg(f"model.cache_dir={tmp_path}")
    monkeypatch.setattr(plan, "_VERIFIED", {})  # what this process verified before (other tests)
    first = plan.calibrate(cfg, 50, "client 0")
    assert first.noise_multiplier == calibrate_noise(8.0, 1e-5, 4 / 50, 6, accountant="pld")
    file = tmp_path / plan.CALIBRATIONS
    (entry,) = json.loads(file.read_text()).items()
    assert entry[1] == first.noise_multiplier

    searches = []
    monkeypatch.setattr(plan, "calibrate_noise", lambda *a, **k: searches.append(a) or calibrate_noise(*a, **k))
    monkeypatch.setattr(plan, "_VERIFIED", {})  # a new process: only the file remembers
    assert plan.calibrate(cfg, 50, "client 0") == first and searches == []
    # less noise than the budget allows (an edited or stale file) is never used: searched again, rewritten
    for bad in ({entry[0]: first.noise_multiplier / 2}, "not json {", {entry[0]: "0.5"}):
        file.write_text(json.dumps(bad) if isinstance(bad, dict) else bad)
        monkeypatch.setattr(plan, "_VERIFIED", {})
        assert plan.calibrate(cfg, 50, "client 0") == first
        assert json.loads(file.read_text())[entry[0]] == first.noise_multiplier
    assert len(searches) == 3
    # another batch is another entry
    assert (
        plan.calibrate(_cfg(f"model.cache_dir={tmp_path}", "train.batch_size=5"), 50, "c").noise_multiplier
        > first.noise_multiplier
    )
    assert len(json.loads(file.read_text())) == 2


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
    after = out[out.index("round      pld      rdp") + 1 :]
    rounds = [line.split() for line in after[: after.index("")]]
    assert [r[0] for r in rounds] == ["1", "2"]
    pld, rdp = [float(r[1]) for r in rounds], [float(r[2]) for r in rounds]
    assert pld[0] < pld[1] <= 8.0 < rdp[1] and rdp[0] > pld[0]  # calibrated on PLD; RDP says more for the same noise
    assert main(["privacy", "plan", str(TINY)]) == 0
    assert "nothing to plan" in capsys.readouterr().out


def test_noise_to_signal_is_sigma_sqrt_d_over_batch_then_over_sqrt_steps_and_clients() -> None:
    from fedslm.plan import ClientPlan, noise_to_signal

    plan = ClientPlan(0, records=243, batch_size=8, sample_rate=8 / 243, steps=30, noise_multiplier=0.5)
    ratio = noise_to_signal(plan, trainable=460_800, steps_per_round=10, clients_per_round=4)
    assert ratio.step == pytest.approx(0.5 * 678.8225 / 8, rel=1e-6)  # sqrt(460,800) = 678.8225: 42.43
    assert ratio.round_update == pytest.approx(42.4264 / 40**0.5, rel=1e-5)  # 6.708


def test_lora_parameters_are_counted_from_the_architecture() -> None:
    from fedslm.modelinfo import lora_parameter_count, model_info

    info = model_info(_cfg().model)  # tiny llama: hidden 64, 4 heads of 16, 2 KV heads, 2 layers
    assert lora_parameter_count(info, 4, ["q_proj", "v_proj"]) == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # 1,792
    assert lora_parameter_count(info, 4, ["q_proj", "v_proj"], train_a=False) == 2 * (4 * 64 + 4 * 32)  # B only: 768
    # the last layer only: half of it (layer 1's q and v), and the last 2 of 2 layers are all of it
    assert lora_parameter_count(info, 4, ["q_proj", "v_proj"], last_layers=1) == 4 * (64 + 64) + 4 * (64 + 32)  # 896
    assert lora_parameter_count(info, 4, ["q_proj", "v_proj"], last_layers=2) == 1792


def test_privacy_plan_warns_where_noise_swamps_the_signal_and_names_the_knobs(capsys) -> None:
    from fedslm.simulation.cli import main

    # tiny: 1,792 parameters, batch 1, noise ~0.4: per step ~0.4 x 42 / 1 ~ 17.5, / sqrt(3 x 4) ~ 5.1 -> warned
    assert main(["privacy", "plan", str(TINY), "--set", "privacy.mode=local", "--set", "train.batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "expected noise/signal norm (1,792 trainable parameters" in out
    assert "WARNING: noise/signal of the averaged round update is 5.1" in out
    for knob in ("train.batch_size 1", "more records per client", "lora.r 4 -> 2", "strategy.name: ffa-lora",
                 "train.local_steps x federation.num_rounds"):  # fmt: skip
        assert knob in out, knob
    # FFA-LoRA: B alone is counted, and it is no longer offered as a knob
    ffa = ["privacy.mode=local", "train.batch_size=1", "strategy.name=ffa-lora", "lora.r=8"]
    assert main(["privacy", "plan", str(TINY), *(a for kv in ffa for a in ("--set", kv))]) == 0
    out = capsys.readouterr().out
    assert "(1,536 trainable parameters" in out and "WARNING" in out and "strategy.name: ffa-lora" not in out
    # the tiny default (batch 4: 1.7) is below the warning, as the demo's recipe (2.5) is
    assert main(["privacy", "plan", str(TINY), "--set", "privacy.mode=local"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    # a logical batch as large as the data and a generous budget: little noise, no warning
    calm = ["privacy.mode=local", "train.batch_size=40", "privacy.target_epsilon=50", "train.local_steps=1"]
    assert main(["privacy", "plan", str(TINY), *(a for kv in calm for a in ("--set", kv))]) == 0
    out = capsys.readouterr().out
    assert "expected noise/signal norm" in out and "WARNING" not in out, out
