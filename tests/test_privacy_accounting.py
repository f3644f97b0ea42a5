"""Privacy accounting against known numbers: golden epsilons, cumulative = one run, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from slm.privacy import (
    CentralAccountant,
    ClientAccountant,
    PrivacyBudgetError,
    PrivacyStateError,
    calibrate_noise,
    expected_total_steps,
    load_state,
    save_state,
)


def test_rdp_golden_value() -> None:
    acc = ClientAccountant("rdp")
    acc.record(1.5, 0.04, 2250)
    assert acc.epsilon(1e-5) == pytest.approx(7.32911117143, abs=1e-6)


def test_prv_golden_value() -> None:
    """Opacus' own PRV golden value is for int(90 // 0.04) = 2249 steps (float floor), not 2250."""
    assert int(90 // 0.04) == 2249
    acc = ClientAccountant("prv")
    acc.record(1.5, 0.04, 2249)
    assert acc.epsilon(1e-5) == pytest.approx(6.777395712150674, abs=1e-6)
    acc.record(1.5, 0.04, 1)  # at 2250 steps PRV's upper bound is 6.77913
    assert acc.epsilon(1e-5) == pytest.approx(6.7791320762541165, abs=1e-6)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_rounds_compose_to_one_run_even_across_a_restart(tmp_path: Path, kind: str) -> None:
    one = ClientAccountant(kind)
    one.record(0.9, 0.02, 150)
    rounds = ClientAccountant(kind)
    path = tmp_path / "privacy.json"
    for r in range(5):
        rounds.record(0.9, 0.02, 30)
        save_state(path, rounds)
        if r == 1:  # the process dies; a new one reloads the saved history
            rounds = load_state(path)
            assert rounds is not None
    assert rounds.steps == 150 and len(rounds.history) == 1
    assert rounds.epsilon(1e-5) == pytest.approx(one.epsilon(1e-5), abs=1e-9)


def test_mixed_history_is_kept_in_order() -> None:
    acc = ClientAccountant()
    acc.record(1.0, 0.01, 10)
    acc.record(2.0, 0.01, 5)
    acc.record(1.0, 0.01, 10)
    assert acc.history == [(1.0, 0.01, 10), (2.0, 0.01, 5), (1.0, 0.01, 10)]
    assert acc.epsilon(1e-5) > ClientAccountant("rdp", [(1.0, 0.01, 20)]).epsilon(1e-5)


def test_calibration_meets_the_target_within_two_percent() -> None:
    sigma = calibrate_noise(8.0, 1e-5, 0.02, 300)
    final = ClientAccountant("rdp", [(sigma, 0.02, 300)]).epsilon(1e-5)
    assert 0.98 * 8.0 <= final <= 8.0, (sigma, final)
    with pytest.raises(PrivacyBudgetError, match="raise privacy.target_epsilon"):
        calibrate_noise(1e-9, 1e-12, 1.0, 10**6)


def test_would_exceed_stops_before_the_budget() -> None:
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 40)
    acc = ClientAccountant()
    for _ in range(4):
        exceed, would = acc.would_exceed(sigma, 0.05, 10, 1e-5, 3.0)
        assert not exceed and would <= 3.0
        acc.record(sigma, 0.05, 10)
    exceed, would = acc.would_exceed(sigma, 0.05, 10, 1e-5, 3.0)
    assert exceed and would > 3.0 >= acc.epsilon(1e-5)


def test_expected_steps() -> None:
    assert expected_total_steps(3, 4, 4, 10) == 30
    assert expected_total_steps(10, 10, 100, 5) == 5  # one round in expectation
    assert expected_total_steps(3, 3, 10, 5) == 5  # 0.9 rounds, rounded up


def test_state_files_missing_and_corrupt(tmp_path: Path) -> None:
    assert load_state(tmp_path / "absent.json") is None
    bad = tmp_path / "privacy.json"
    bad.write_text("{not json")
    with pytest.raises(PrivacyStateError, match="privacy.json"):
        load_state(bad)
    bad.write_text('{"accountant": "rdp", "history": [[1.0, 7.0, 3]]}')
    with pytest.raises(PrivacyStateError, match="entry"):
        load_state(bad)


def test_central_accountant_composes_rounds() -> None:
    central = CentralAccountant()
    for _ in range(20):
        central.record_round(1.0, 10, 100)
    assert central.history == [(1.0, 0.1, 20)]
    assert central.epsilon(1e-3) == pytest.approx(ClientAccountant("rdp", [(1.0, 0.1, 20)]).epsilon(1e-3), abs=1e-12)
