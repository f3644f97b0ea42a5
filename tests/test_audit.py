"""Privacy audit: canaries (deterministic, capped, never in evaluation data), statistics against
hand-computed values, and memorisation on a tiny model with and without DP-SGD."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from fedslm import audit, data
from fedslm.config import ConfigError, load_config
from fedslm.model import cache_root

ROOT = Path(__file__).resolve().parent.parent
AUDIT_ON = ["audit.enabled=true", "data.num_records=1200", "audit.canaries=20"]


def test_canaries_are_deterministic_per_seed_and_differ_between_seeds() -> None:
    a, b, c = audit.make_canaries(7, 50, 4), audit.make_canaries(7, 50, 4), audit.make_canaries(8, 50, 4)
    assert a == b
    assert [x.answer for x in a] != [x.answer for x in c]
    assert all(len(x.answer) == 8 and set(x.answer) <= set(audit.CODE_ALPHABET) for x in a)
    assert len({x.question for x in a}) == 50  # distinct patients
    members = [x for x in a if x.member]
    assert 15 <= len(members) <= 35  # a fair coin over 50 (measured 27 at seed 7)
    assert all(0 <= x.client < 4 for x in members) and all(x.client == -1 for x in a if not x.member)


def test_members_go_into_their_clients_training_data_only(tiny_cfg) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", AUDIT_ON + ["audit.canaries=12", "audit.repeats=2"])
    canaries = audit.run_canaries(cfg)
    base = data.client_records(cfg.data, cache_root(cfg.model), 1, 4).records
    with_c = audit.insert_canaries(cfg, 1, base)
    questions = [r["question"] for r in with_c]
    for c in canaries:
        assert questions.count(c.question) == (2 if c.member and c.client == 1 else 0)
    assert any(c.member and c.client == 1 for c in canaries)  # this seed gives client 1 some
    assert [r for r in with_c if not r["question"].startswith("What is the access code")] == base
    off = load_config(ROOT / "configs" / "tiny.yaml")
    assert audit.insert_canaries(off, 1, base) is base


def test_canaries_never_reach_evaluation_data(tiny_cfg, tmp_path) -> None:
    from fedslm.client.runner import ClientRunner
    from fedslm.client.state import ClientStore

    from fedslm.protocol import LoRAPlan

    cfg = load_config(ROOT / "configs" / "tiny.yaml", AUDIT_ON)
    secrets = {c.question for c in audit.run_canaries(cfg)}
    assert not secrets & {r["question"] for r in data.test_records(cfg.data, cache_root(cfg.model))}
    held = 0
    for cid in range(4):
        runner = ClientRunner(cfg, cid, 4, "", 1, LoRAPlan(), ClientStore(tmp_path / str(cid)))
        train, val, val_recs = runner.examples(tiny_cfg_tok())
        assert not secrets & {r["question"] for r in val_recs}
        held += len(train) - len(runner._records()) + len(val_recs)
    assert held == sum(c.member for c in audit.run_canaries(cfg))  # every member once, in training


def tiny_cfg_tok():
    from fedslm.adapters import PEFT_CACHE

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    return PEFT_CACHE.get(cfg.model, cfg.lora).base.tokenizer


def test_too_many_canaries_are_refused_at_check_naming_the_key() -> None:
    from fedslm.server.preflight import preflight

    # tiny: 240 records, 10% test -> 4 hospitals of 54, 6 held out for validation: 48 training records
    # each, cap int(0.1 x 48) = 4. Seed 0's first 3 canaries put 2 members on client 3 (its first 20: 5)
    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"audit.canaries: client 3 would get 6 canary records, over the cap 4"):
        preflight(load_config(tiny, ["audit.enabled=true", "audit.canaries=3", "audit.repeats=3"]))
    preflight(load_config(tiny, ["audit.enabled=true", "audit.canaries=3", "audit.repeats=2"]))  # 4: at the cap
    with pytest.raises(ConfigError, match=r"client 3 would get 5 canary records, over the cap 4"):
        preflight(load_config(tiny, ["audit.enabled=true", "audit.canaries=20"]))


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["task=classification"], "task: causal-lm"),
        (["security.secure_aggregation=secagg+"], "security.secure_aggregation 'secagg+'"),
    ],
)
def test_audit_is_refused_where_canaries_cannot_be_scored(overrides, names) -> None:
    with pytest.raises(ConfigError, match=rf"audit.enabled: .*{re.escape(names)}"):
        load_config(ROOT / "configs" / "tiny.yaml", ["audit.enabled=true", "audit.canaries=4", *overrides])


def test_preflight_checks_the_canary_cap_of_a_user_file_client_by_client(tmp_path) -> None:
    import json

    from fedslm.server.preflight import preflight

    rows = [{"question": f"q{i}", "answer": f"a{i}", "hospital": f"h{i % 4}"} for i in range(400)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["audit.enabled=true", f"data.source={path}", "audit.canaries=10"]
    # 400 records less the 10% test split: 4 hospitals x 90, 9 held out for validation: 81 training
    # records each, cap int(0.1 x 81) = 8 canary records
    cfg = load_config(ROOT / "configs" / "tiny.yaml", common)
    held = [sum(c.member and c.client == i for c in audit.run_canaries(cfg)) for i in range(4)]
    assert max(held) == 3  # measured for seed 0: the busiest client holds 3 member canaries
    preflight(cfg)  # 3 records <= 8
    with pytest.raises(ConfigError, match=r"audit.canaries: client \d would get 12 canary records, over the cap 8"):
        preflight(load_config(ROOT / "configs" / "tiny.yaml", [*common, "audit.repeats=4"]))


def test_roc_auc_and_tpr_at_fpr_by_hand() -> None:
    members, non = [0.9, 0.8, 0.3], [0.7, 0.3, 0.1, 0.0]
    # pairs member > non: 0.9 beats 4, 0.8 beats 4, 0.3 beats 2 and ties 1 -> (4 + 4 + 2 + 0.5) / 12
    assert audit.roc_auc(members, non) == pytest.approx(10.5 / 12)
    # thresholds 0.9, 0.8 -> FPR 0, TPR 2/3; 0.7 -> FPR 1/4, TPR 2/3; 0.3 -> FPR 2/4, TPR 1
    assert audit.tpr_at_fpr(members, non, 0.01) == pytest.approx(2 / 3)
    assert audit.tpr_at_fpr(members, non, 0.5) == pytest.approx(1.0)


def test_exposure_on_a_hand_ranked_set() -> None:
    # canary loss 1.0 among 7 candidates: 0.5 and 1.0 rank at or before it -> rank 3 of 8
    cands = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
    assert audit.exposure(1.0, cands) == pytest.approx(math.log2(8) - math.log2(3))
    assert audit.exposure(0.1, cands) == pytest.approx(3.0)  # best of 8: log2(8)
    assert audit.exposure(9.0, cands) == pytest.approx(0.0)  # worst: no information


def test_guesses_count_correct_members_and_non_members() -> None:
    scores = [0.1, 0.9, 0.5, 0.8, 0.2, 0.3]
    members = [False, True, True, False, True, False]
    # top 2: 0.9 (member, right), 0.8 (non-member, wrong); bottom 2: 0.1 (right), 0.2 (member, wrong)
    assert audit.guesses(scores, members, 2, 2) == (4, 2)


def test_epsilon_lower_bound_by_hand() -> None:
    # r = 10 guesses, all correct, 95%: the bound is eps with p(eps)^10 = 0.05, p = e^eps / (1 + e^eps)
    # p = 0.05 ** 0.1 = 0.741134; eps = ln(p / (1 - p)) = ln(0.741134 / 0.258866) = ln(2.862996) = 1.05187
    assert audit.epsilon_lower_bound(10, 10, 0.95) == pytest.approx(1.05187, abs=1e-4)
    # r = 10, v = 9: P[X >= 9] = 10 p^9 (1 - p) + p^10 = 0.05; by hand at eps = 0.6: p = 0.645656,
    # 10 * 0.019499 * 0.354344 + 0.012590 = 0.0817 > 0.05; at eps = 0.4: p = 0.598688,
    # 10 * 0.009881 * 0.401312 + 0.005916 = 0.0456 < 0.05, so the bound lies in (0.4, 0.6)
    assert 0.4 < audit.epsilon_lower_bound(10, 9, 0.95) < 0.6
    assert audit.epsilon_lower_bound(10, 6, 0.95) == 0.0  # 6 of 10 is chance at 95%
    # 2 correct of 2 happens by chance with probability 0.25 > 0.05 at eps = 0: nothing rejected
    assert audit.epsilon_lower_bound(2, 2, 0.95) == 0.0


def test_one_run_p_value_for_eps_delta_by_hand() -> None:
    # m = 10 canaries, r = 4 guesses, all v = 4 right, eps = ln 3 so q = 3/4; Binomial(4, 3/4) has
    # pmf (1, 12, 54, 108, 81) / 256. f(4) = 81/256. max_i P[4 - i <= B < 4] / i: i = 1: 108/256,
    # i = 2: 162/512, i = 3: 174/768, i = 4: 175/1024 -> 108/256. p = 81/256 + 2 * 10 * 0.01 * 108/256
    assert audit.one_run_p_value(10, 4, 4, math.log(3), 0.01) == pytest.approx(81 / 256 + 0.2 * 108 / 256)
    assert audit.one_run_p_value(10, 4, 4, math.log(3), 0.0) == pytest.approx(81 / 256)  # pure DP: f(v)
    assert audit.one_run_p_value(10, 4, 4, math.log(3), 0.9) == 1.0  # capped
    with pytest.raises(audit.AuditError, match="guesses"):
        audit.one_run_p_value(3, 4, 4, 1.0, 0.0)  # more guesses than canaries
    # group privacy: (eps, delta) per record -> (2 eps, 2 e^eps delta) for a canary inserted twice
    assert audit.group_claim(0.5, 1e-5, 2) == pytest.approx((1.0, 2 * math.exp(0.5) * 1e-5))


def test_eps_delta_lower_bound_by_hand_and_never_above_the_pure_dp_bound() -> None:
    # m = r = v = 10, delta = 1e-3, 95%. At eps = 1: q = 0.731059, q^10 = 0.043604; pmf of
    # Binomial(10, q) at 9, 8, 7, 6: 0.160383, 0.265510, 0.260467, 0.167689; running sums / i:
    # 0.160383, 0.212947, 0.228787 (max), 0.213512; p = 0.043604 + 2 * 10 * 1e-3 * 0.228787 = 0.048180
    # < 0.05: rejected. At the pure-DP bound 1.05187 (q^10 = 0.05): max_i term 0.23494, so
    # p = 0.05 + 0.02 * 0.23494 = 0.05470 > 0.05: not rejected. The (eps, delta) bound lies in between.
    assert audit.one_run_p_value(10, 10, 10, 1.0, 1e-3) == pytest.approx(0.048180, abs=2e-6)
    assert audit.one_run_p_value(10, 10, 10, 1.05187, 1e-3) == pytest.approx(0.05470, abs=2e-5)
    assert 1.0 < audit.epsilon_lower_bound(10, 10, 0.95, m=10, delta=1e-3) < 1.05187
    for r, v, m in [(10, 10, 10), (10, 9, 50), (40, 36, 100), (200, 150, 1000), (20, 20, 20)]:
        for delta in (1e-6, 1e-3, 1e-2):
            pure = audit.epsilon_lower_bound(r, v, 0.95)
            assert audit.epsilon_lower_bound(r, v, 0.95, m=m, delta=delta) <= pure
    # a canary repeated twice: the per-record bound is about half the canary-level one
    assert audit.epsilon_lower_bound(10, 10, 0.95, m=10, group=2) == pytest.approx(1.05187 / 2, abs=1e-4)
    with pytest.raises(audit.AuditError, match="needs m"):
        audit.epsilon_lower_bound(10, 10, 0.95, delta=1e-5)


def test_simulate_with_audit_writes_canaries_and_scores_and_fedslm_audit_rescores(
    tmp_path, capsys, monkeypatch
) -> None:
    import json

    from fedslm.server import audit as server_audit
    from fedslm.simulation.cli import main
    from fedslm.simulation.run import simulate

    cfg = load_config(ROOT / "configs" / "tiny.yaml", AUDIT_ON + ["audit.candidates=10", "federation.num_rounds=1"])
    out = tmp_path / "run"
    # a broken accountant reporting epsilon -1: every bound (>= 0) exceeds it, so the simulation must end
    # with the loud error; the server thread reads the figure in this process
    monkeypatch.setattr(server_audit, "accountant_epsilon", lambda run_dir: -1.0)
    with pytest.raises(server_audit.PrivacyAuditFailure, match=r"PRIVACY BUG: .* accountant's epsilon -1\.000"):
        simulate(cfg, out, progress=False)
    monkeypatch.undo()
    recorded = audit.read_canaries(out / audit.CANARIES_FILE)
    assert recorded == audit.run_canaries(cfg)
    first = json.loads((out / "audit.json").read_text())
    assert first["canaries"] == 20 and first["members"] == sum(c.member for c in recorded)
    # exposure on the first audit.exposure_canaries (16), each ranked among 11 answers: log2(11) at most
    exposures = [c["exposure"] for c in first["per_canary"]]
    assert first["exposure_canaries"] == 16 and exposures[16:] == [None] * 4
    assert all(0.0 <= e <= math.log2(11) + 1e-9 for e in exposures[:16])
    assert first["exposure_max"] == max(exposures[:16])
    assert 0.0 <= first["auc"] <= 1.0 and first["epsilon_accountant"] == -1.0  # the broken figure, recorded
    # the figures are those of audit.score (default: the loss, lower = member); both scores' are kept
    per = first["per_canary"]
    members = [c["member"] for c in per]
    for name, scores in [("loss", [-c["loss"] for c in per]), ("relative", [c["base_loss"] - c["loss"] for c in per])]:
        mem, non = audit.split_scores(scores, members)
        figures = first["scores"][name]
        assert figures["auc"] == audit.roc_auc(mem, non)
        assert figures["tpr_at_1pct_fpr"] == audit.tpr_at_fpr(mem, non, 0.01)
    assert first["score"] == "loss" and first["auc"] == first["scores"]["loss"]["auc"]
    assert first["tpr_at_1pct_fpr"] == first["scores"]["loss"]["tpr_at_1pct_fpr"]
    assert json.loads((out / "summary.json").read_text())["audit"]["auc"] == first["auc"]
    assert (out / "audit-roc.png").stat().st_size > 1000
    assert main(["audit", str(out)]) == 0  # the run's own figures: no DP, nothing to contradict
    assert "eps lower bound" in capsys.readouterr().out
    again = json.loads((out / "audit.json").read_text())
    assert again["per_canary"] == first["per_canary"] and again["epsilon_accountant"] is None  # same scores
    # audit.score: relative puts the base-relative figures in front
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("score: loss", "score: relative"))
    assert main(["audit", str(out)]) == 0 and "score: relative" in capsys.readouterr().out
    relative = json.loads((out / "audit.json").read_text())
    assert relative["score"] == "relative" and relative["auc"] == first["scores"]["relative"]["auc"]


def test_fedslm_audit_without_audit_section_or_on_a_partial_run_dir(tmp_path, capsys) -> None:
    from fedslm.simulation.cli import main

    assert main(["audit", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line
    run = tmp_path / "run"
    run.mkdir()
    assert main(["audit", str(run)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    (run / "config.yaml").write_text(load_config(ROOT / "configs" / "tiny.yaml").to_yaml())
    assert main(["audit", str(run)]) == 2
    err = capsys.readouterr().err
    assert "without an audit: section" in err and err.count("\n") == 1
    (run / "config.yaml").write_text(load_config(ROOT / "configs" / "tiny.yaml", AUDIT_ON).to_yaml())
    assert main(["audit", str(run)]) == 2
    assert "partial run" in capsys.readouterr().err


def _train_on_members(fresh, canaries, dp, system: str = "") -> None:
    """40 steps on the member canaries alone: enough for the tiny model to memorise them without DP."""
    from fedslm.training import LocalTraining, train_local

    tok = fresh.base.tokenizer
    ex = [data.encode(tok, c.question, c.answer, 96, system) for c in canaries if c.member]
    train_local(
        fresh.model, ex, tok.pad_token_id, LocalTraining(steps=40, batch_size=8, learning_rate=0.05, seed=1, dp=dp)
    )


def _memorisation_auc(fresh, dp) -> float:
    from fedslm.adapters import load_adapter_state

    tok = fresh.base.tokenizer
    canaries = audit.make_canaries(3, 40, 1)
    pairs = [(c.question, c.answer) for c in canaries]
    base = audit.answer_losses(fresh.model, tok, pairs, 96, "")
    _train_on_members(fresh, canaries, dp)
    final = audit.answer_losses(fresh.model, tok, pairs, 96, "")
    load_adapter_state(fresh.model, fresh.initial)
    scores = [b - f for b, f in zip(base, final, strict=True)]
    return audit.roc_auc(*audit.split_scores(scores, [c.member for c in canaries]))


def test_tiny_model_memorises_canaries_without_dp_and_not_with_strong_dp(tiny_peft) -> None:
    from fedslm.training import DPSettings

    plain = _memorisation_auc(tiny_peft, None)
    noisy = _memorisation_auc(tiny_peft, DPSettings(noise_multiplier=50.0, max_grad_norm=0.01, sample_rate=0.4))
    # measured: 0.955 without DP; 0.578 under sigma=50 with clipping 0.01. Tolerance: with 22 members
    # and 18 non-members, chance AUC has a standard deviation of about 0.09, so |AUC - 0.5| < 0.2 is
    # two standard deviations
    assert plain > 0.9
    assert abs(noisy - 0.5) < 0.2


def test_privacy_bug_line_names_both_figures_only_when_the_bound_exceeds_the_accountant() -> None:
    from fedslm.server.audit import privacy_bug

    line = privacy_bug(1.25, 0.5, 0.95, 1e-5)
    assert "1.250" in line and "0.500" in line and "\n" not in line
    assert privacy_bug(0.5, 0.5, 0.95, 1e-5) == ""  # at the accountant's figure: not rejected
    assert privacy_bug(3.0, None, 0.95, 1e-5) == ""  # no DP, no claim to test


def _audited_run(tmp_path: Path, fresh, dp, epsilon: float) -> Path:
    """A finished run directory made by hand: the tiny model trained on its member canaries (with ``dp``),
    its adapter as round 1 (the best round), and ``epsilon`` as the accountant's figure."""
    import json

    from safetensors.torch import save_file

    from fedslm.adapters import adapter_state

    overrides = ["audit.enabled=true", "data.num_records=2400", "audit.canaries=40", "audit.guess_fraction=1.0"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides + ["audit.candidates=5"])
    run = tmp_path / "run"
    (run / "adapters" / "round-001").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    canaries = audit.run_canaries(cfg)
    audit.write_canaries(run / audit.CANARIES_FILE, canaries)
    _train_on_members(fresh, canaries, dp, cfg.data.system_prompt)
    save_file(adapter_state(fresh.model), str(run / "adapters" / "round-001" / "adapter_model.safetensors"))
    # a later, worse round holding the untrained adapter: the audit must score the shipped (best) round 1
    (run / "adapters" / "round-002").mkdir()
    initial = {k: v.contiguous() for k, v in fresh.initial.items()}
    save_file(initial, str(run / "adapters" / "round-002" / "adapter_model.safetensors"))
    (run / "metrics.jsonl").write_text(json.dumps({"round": 2, "epsilon_max": epsilon, "best_round": 1}) + "\n")
    return run


def _set_accountant_epsilon(run: Path, epsilon: float) -> None:
    import json

    row = json.loads((run / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").write_text(json.dumps({**row, "epsilon_max": epsilon}) + "\n")


def test_fedslm_audit_exits_1_with_both_figures_when_the_bound_exceeds_a_broken_accountant(
    tiny_peft, tmp_path, capsys
) -> None:
    import json

    from fedslm.simulation.cli import main

    run = _audited_run(tmp_path, tiny_peft, None, epsilon=50.0)  # memorised, an honest-looking large figure
    assert main(["audit", str(run)]) == 0
    result = json.loads((run / "audit.json").read_text())
    lower = result["epsilon_lower_bound"]
    assert result["round"] == 1  # the best round, not the last (whose untrained adapter scores AUC 0.5)
    assert result["score_s"] > 0 and result["client_level"] is None  # no canary clients asked for
    # measured: 40 guesses, 36 correct -> 1.65 at delta 1e-5; any real memorisation gives > 0.5
    assert 0.5 < lower < 50.0 and result["delta"] == 1e-5
    capsys.readouterr()
    _set_accountant_epsilon(run, 0.1)  # a broken accountant: 0.1 while the model memorised
    assert main(["audit", str(run)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedslm:")]
    assert len(errors) == 1 and "PRIVACY BUG" in errors[0]
    assert f"{lower:.3f}" in errors[0] and "0.100" in errors[0]


def test_fedslm_audit_does_not_fire_on_a_correct_dp_run(tiny_peft, tmp_path, capsys) -> None:
    import json

    from fedslm.simulation.cli import main

    from fedslm.pld import pld_epsilon
    from fedslm.training import DPSettings

    dp = DPSettings(noise_multiplier=3.0, max_grad_norm=0.05, sample_rate=0.4)
    epsilon = pld_epsilon([(dp.noise_multiplier, dp.sample_rate, 40)], 1e-5)  # the honest figure of 40 steps
    run = _audited_run(tmp_path, tiny_peft, dp, epsilon)
    assert main(["audit", str(run)]) == 0, capsys.readouterr().err
    result = json.loads((run / "audit.json").read_text())
    assert result["epsilon_accountant"] == pytest.approx(epsilon)
    assert result["epsilon_lower_bound"] <= epsilon


# -- client-level audit of central DP (Andrew et al., ICLR 2024) -----------------------------------


def test_gdp_to_eps_delta_by_hand_and_a_known_value() -> None:
    # mu = 1, eps = 1: Phi(-1 + 0.5) - e Phi(-1 - 0.5) = 0.308538 - 2.718282 * 0.066807 = 0.126937
    assert audit.gdp_delta(1.0, 1.0) == pytest.approx(0.126937, abs=1e-6)
    assert audit.gdp_epsilon(1.0, 0.126937) == pytest.approx(1.0, abs=1e-4)
    # eps = 0: 2 Phi(mu / 2) - 1 = 2 * 0.691462 - 1 = 0.382925: any delta above it needs no epsilon
    assert audit.gdp_delta(1.0, 0.0) == pytest.approx(0.382925, abs=1e-6)
    assert audit.gdp_epsilon(1.0, 0.4) == 0.0
    # the textbook figure: 1-GDP is (4.38, 1e-5)-DP (Dong, Roth & Su 2022)
    assert audit.gdp_epsilon(1.0, 1e-5) == pytest.approx(4.377, abs=1e-3)
    assert audit.gdp_epsilon(-0.2, 1e-5) == 0.0  # inserted canaries below the fresh ones: nothing leaks


def test_gdp_mu_by_hand() -> None:
    # means 4 and 0; fresh sample std (ddof 1) of (-1, 0, 1) is 1
    assert audit.gdp_mu([3.0, 4.0, 5.0], [-1.0, 0.0, 1.0]) == pytest.approx(4.0)
    with pytest.raises(audit.AuditError, match="two fresh"):
        audit.gdp_mu([1.0], [0.0])


def test_canary_directions_are_unit_deterministic_and_nearly_orthogonal() -> None:
    a, b = audit.canary_direction(3, 0, 4000), audit.canary_direction(3, 1, 4000)
    assert np.linalg.norm(a) == pytest.approx(1.0) and np.array_equal(a, audit.canary_direction(3, 0, 4000))
    assert abs(float(a @ b)) < 4 / math.sqrt(4000)  # 4 standard deviations of a random cosine


@pytest.mark.parametrize(
    ("sigma", "separates"),
    # model delta = the 100 inserted canaries' sum + N(0, sigma^2 I) in 5000 dimensions; each canary
    # sees the others and the noise as noise, so mu is about 1 / sqrt(sigma^2 + 99 / 5000) (the Gaussian
    # mechanism's own mu at sensitivity 1): 7.1 at sigma 0.01, 0.1 at sigma 10 (measured 6.81 and 0.046)
    [(0.01, True), (10.0, False)],
)
def test_client_level_estimate_separates_inserted_canaries_only_under_small_noise(sigma, separates) -> None:
    dim, k = 5000, 100
    noise = np.random.default_rng(0).standard_normal(dim)
    model_delta = sum(audit.canary_direction(3, i, dim) for i in range(k)) + sigma * noise
    est = audit.client_level_epsilon(model_delta, 3, k, 1e-5)
    expected_mu = 1 / math.sqrt(sigma**2 + (k - 1) / dim)
    if separates:
        assert est["mu"] == pytest.approx(expected_mu, rel=0.15) and est["epsilon_lower_bound"] > 20
    else:
        # mu's sampling error with 100 canaries is about 0.1: |mu| < 0.35 is 3 standard errors
        assert abs(est["mu"]) < 0.35 and est["epsilon_lower_bound"] < 1.5
    assert abs(est["cos_fresh_mean"]) < 3 * est["cos_fresh_std"] / math.sqrt(k)


def test_central_dp_inserts_the_canary_clients_into_the_aggregate_before_the_noise() -> None:
    from fedslm.strategies import registry
    from fedslm.strategies.central_dp import CentralDP
    from flower_fakes import train_reply
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedslm.config import config_from_dict

    cfg = config_from_dict(
        {
            "federation": {"num_clients": 2, "min_train_clients": 2},
            "privacy": {"mode": "central", "central_noise_multiplier": 0.0, "central_clipping_norm": 1.0},
            "audit": {"enabled": True, "client_canaries": 3, "canaries": 2},
            "data": {"num_records": 2000},
        }
    )
    strategy = registry.build(cfg)
    assert isinstance(strategy, CentralDP) and strategy.client_canaries == 3

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [11, 12]

    glob = {"a.lora_A.weight": np.zeros(2, dtype=np.float32), "b.lora_B.weight": np.zeros(2, dtype=np.float32)}
    msgs = list(
        strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in glob.items()}), ConfigRecord(), _Grid())
    )
    one = {"a.lora_A.weight": np.array([0.5, 0], dtype=np.float32), "b.lora_B.weight": np.zeros(2, dtype=np.float32)}
    two = {"a.lora_A.weight": np.zeros(2, dtype=np.float32), "b.lora_B.weight": np.array([0, 0.5], dtype=np.float32)}
    replies = [train_reply(m.metadata.dst_node_id, u, 10) for m, u in zip(msgs, (one, two), strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    got = audit.flatten({k: v.numpy() for k, v in arrays.items()})
    # the clients' mean (0.25, 0, 0, 0.25) plus C/m = 1/2 times the 3 canary directions in 4 dimensions
    canaries = sum(audit.canary_direction(cfg.seed, i, 4) for i in range(3))
    np.testing.assert_allclose(got, np.array([0.25, 0, 0, 0.25]) + 0.5 * canaries, atol=1e-6)
    with pytest.raises(ConfigError, match="audit.client_canaries: 3 canary clients audit central DP"):
        config_from_dict({"audit": {"enabled": True, "client_canaries": 3, "canaries": 2}})


def test_client_level_audit_reads_the_central_accountant_beside_the_estimate(tmp_path) -> None:
    import json

    import torch
    from fedslm.server.audit import client_level

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["privacy.mode=central", "audit.client_canaries=20", *AUDIT_ON])
    initial = {"a": torch.zeros(40, 50), "b": torch.ones(50, 40), "c": torch.zeros(3)}
    grown = audit.insert_client_canaries({k: v.numpy() for k, v in initial.items() if k != "c"}, cfg.seed, 20, 1.0)
    state = {**{k: torch.from_numpy(v) for k, v in grown.items()}, "c": initial["c"]}  # c never moved
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epsilon_central": e}) + "\n" for e in (1.5, 2.5)))
    got = client_level(cfg, state, initial, tmp_path)
    # 20 canaries without noise in 4000 dimensions: mu about sqrt(4000 / 19) = 14.5, a huge epsilon
    assert got["epsilon_central"] == 2.5 and got["canaries"] == 20 and got["delta"] == cfg.privacy.central_delta
    assert got["mu"] > 8 and got["epsilon_lower_bound"] > 30


def test_answer_losses_share_each_prompt_and_equal_whole_sequence_losses(tiny_peft) -> None:
    """A canary's secret and its candidates run against one cached prompt, answer logits only: the
    losses are those of whole-sequence passes with every logit (float32: to 1e-5), in input order."""
    import torch

    from fedslm.adapters import load_adapter_state
    from fedslm.training import sequence_losses

    model, tok = tiny_peft.model, tiny_peft.base.tokenizer
    g = torch.Generator().manual_seed(0)  # a LoRA that changes the outputs (B = 0 would not)
    load_adapter_state(
        model,
        {k: v + 0.3 * torch.randn(v.shape, generator=g) if "lora_B" in k else v for k, v in tiny_peft.initial.items()},
    )
    canaries = audit.make_canaries(1, 3, 1)
    pairs = [(c.question, x) for c in canaries for x in [c.answer, *audit.candidate_codes(1, c, 40)]]
    pairs.insert(20, ("What is the access code of patient nobody?", "ABCD1234"))  # a prompt asked once
    examples = [data.encode(tok, q, a, 96, "Be brief.") for q, a in pairs]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # codes of different token counts: padding
    batch = data.collate(examples, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    whole = sequence_losses(logits, batch["labels"]).tolist()
    shared = audit.answer_losses(model, tok, pairs, 96, "Be brief.", batch_size=8)  # several passes a prompt
    assert min(whole) > 5.0  # real losses of random codes, not zeros
    assert np.allclose(shared, whole, rtol=0, atol=1e-5), max(abs(a - b) for a, b in zip(shared, whole, strict=True))
