"""Privacy loss distribution (PLD) accounting of Poisson-subsampled Gaussian steps, with Google's ``dp_accounting``.

The PLD of each step is discretized *pessimistically* (every privacy loss rounded up, the truncated
tail moved to infinity), so the composed epsilon is a valid upper bound, tighter than RDP's: for the
demo's 30 steps at q = 8/243 and noise 0.571, RDP says 7.99 and PLD 6.57 (delta 1e-5). The
looseness of the bound is what the discretization adds; :func:`pld_epsilon` with ``pessimistic=False``
gives the matching lower estimate, and the two differ by a few thousandths for fedslm's runs
(tests/test_privacy_accounting.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

# 1e-3 is 10x faster than dp_accounting's 1e-4 default and, measured on the demo and on 3000 steps at
# q = 0.01, at most 0.0015 looser (both are upper bounds); one value for calibration and reporting.
PLD_INTERVAL = 1e-3
# PLD is tighter than RDP, so the noise it calibrates is below RDP's; the search starts at this share of it
PLD_LOWER_BRACKET = 0.25
# ... and first tries this share, which holds PLD's noise in the runs measured (0.86-0.93 of RDP's)
PLD_NEAR_BRACKET = 0.8

PLD_RELATIVE_TOLERANCE = 0.005
MAX_NOISE = 1e6  # as Opacus' get_noise_multiplier

Entry = tuple[float, float, int]


def pld_epsilon(history: Sequence[Entry], delta: float, *, pessimistic: bool = True) -> float:
    """Epsilon at ``delta`` of ``(noise_multiplier > 0, sample_rate, steps)`` entries composed in order.

    ``pessimistic`` (the default, what fedslm reports) is an upper bound on the true epsilon; False
    gives dp_accounting's optimistic estimate, a lower bound on the same.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld

    total = None
    for nm, q, steps in history:
        step = pld.from_gaussian_mechanism(
            standard_deviation=nm,
            sampling_prob=q,
            pessimistic_estimate=pessimistic,
            value_discretization_interval=PLD_INTERVAL,
        ).self_compose(steps)
        total = step if total is None else total.compose(step)
    return 0.0 if total is None else float(total.get_epsilon_for_delta(delta))


def pld_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, rdp_sigma: float | None, tolerance: float
) -> float:
    """The smallest noise (to bisection precision) whose PLD epsilon lies in ``[target - tolerance, target]``
    (the tolerance at most 0.5% of the target).

    ``rdp_sigma`` (RDP's calibrated noise, whose PLD epsilon is at most the target) is the upper end of
    the search; ``None`` (RDP reaches no such target) starts from 1 and doubles up to :data:`MAX_NOISE`.
    """
    tolerance = min(tolerance, PLD_RELATIVE_TOLERANCE * target_epsilon)  # tight for small targets too

    def eps(sigma: float) -> float:
        return pld_epsilon([(sigma, sample_rate, steps)], delta)

    if rdp_sigma is None:  # without sampling (q = 1) the noise is larger still: a bracket in closed form
        hi = math.sqrt(steps) * _gaussian_noise(target_epsilon, delta)
        if hi > MAX_NOISE:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE:g} reaches epsilon {target_epsilon}")
        lo = hi * sample_rate / 2
    else:
        hi, lo = rdp_sigma, rdp_sigma * PLD_LOWER_BRACKET
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:  # not expected (PLD is the tighter bound): a margin for its discretization
        hi *= 1.25
        eps_hi = eps(hi)
    if target_epsilon - eps_hi <= tolerance:
        return hi
    near = hi * PLD_NEAR_BRACKET  # where PLD's noise usually is: a narrow bracket first
    eps_near = eps(near)
    if eps_near <= target_epsilon:
        hi, eps_hi = near, eps_near
        if target_epsilon - eps_hi <= tolerance:
            return hi
        if eps(lo) <= target_epsilon:
            return lo
        eps_lo = math.inf
    else:
        lo, eps_lo = near, eps_near
    return _illinois(eps, lo, eps_lo, hi, eps_hi, target_epsilon, tolerance)


def _illinois(
    eps: Callable[[float], float], lo: float, eps_lo: float, hi: float, eps_hi: float, target: float, tolerance: float
) -> float:
    """The noise ``hi`` in ``[lo, hi]`` (eps(lo) > target >= eps(hi)) with ``target - eps(hi) <= tolerance``.

    Regula falsi aimed at the middle of that window, with the Illinois rule (a side kept twice has
    its value halved) and every step kept at least 5% of the bracket from either end, so it never
    does worse than a slow bisection; on the smooth, monotone curve of epsilon against noise it
    needs 2-4 evaluations where bisection needs about 10."""
    aim = target - tolerance / 2
    f_lo, f_hi = eps_lo - aim, eps_hi - aim  # > 0 and < 0 (f_lo may be inf: bisect until it is known)
    kept = 0  # +1: lo kept in a row, -1: hi kept in a row
    for _ in range(60):
        width = hi - lo
        mid = lo + width / 2 if math.isinf(f_lo) else lo + width * f_lo / (f_lo - f_hi)
        mid = min(max(mid, lo + 0.05 * width), hi - 0.05 * width)
        e = eps(mid)
        if e > target:
            lo, f_lo = mid, e - aim
            f_hi = f_hi / 2 if kept < 0 else f_hi  # hi kept twice: pull the secant towards it
            kept = min(kept, 0) - 1
        else:
            hi, f_hi = mid, e - aim
            if target - e <= tolerance:
                break
            f_lo = f_lo / 2 if kept > 0 else f_lo
            kept = max(kept, 0) + 1
    return hi


def _gaussian_delta(eps: float, sigma: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism of sensitivity 1 (Balle & Wang 2018, Theorem 8)."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return phi(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * phi(-eps * sigma - 1 / (2 * sigma))


def _gaussian_noise(target_epsilon: float, delta: float) -> float:
    """The noise of one Gaussian mechanism that is (target_epsilon, delta)-DP (bisection on the exact curve)."""
    lo, hi = 1e-3, 1e9
    for _ in range(200):  # delta at a fixed epsilon falls as the noise grows
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _gaussian_delta(target_epsilon, mid) > delta else (lo, mid)
    return hi
