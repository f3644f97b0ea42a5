"""A run's local-DP plan, worked out before anything trains: per client, its records, sampling rate,
logical batch, steps and calibrated noise multiplier.

The client (:mod:`fedslm.client.privacy`) and ``fedslm check`` / ``fedslm simulate`` compute the
sampling rate and the steps with the same two functions here, so what the check accepts is what the
client runs. :func:`check_privacy_plan` refuses, with the key to change and the feasible range, a
logical batch larger than a client's data and a budget that no noise multiplier up to
``privacy.max_noise_multiplier`` meets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, PrivacyConfig, RunConfig, apply_profile, client_profile
from .fs import atomic_write
from .modelinfo import cache_root
from .privacy import _epsilon, calibrate_noise, expected_total_steps

VALIDATION_FRACTION = 0.1  # of each client's records, held back for its own evaluation (never trained on)


def validation_size(num_records: int) -> int:
    """Records a client holds back for validation (none below 10 records)."""
    return int(num_records * VALIDATION_FRACTION) if num_records >= 10 else 0


def sample_rate(batch_size: int, num_records: int) -> float:
    """Poisson sampling rate of a client: its expected logical batch over its training records."""
    return min(1.0, batch_size / num_records)


def total_steps(cfg: RunConfig) -> int:
    """DP-SGD steps a client is calibrated for over the whole run (:func:`fedslm.privacy.expected_total_steps`)."""
    fed = cfg.federation
    return expected_total_steps(fed.num_rounds, fed.clients_per_round, fed.num_clients, cfg.train.local_steps)


@dataclass(frozen=True)
class ClientPlan:
    client_id: int  # -1 until it is given to a client
    records: int  # training records (after the validation split)
    batch_size: int  # expected logical batch
    sample_rate: float
    steps: int  # over the whole run
    noise_multiplier: float


def train_sizes(cfg: RunConfig, cache: Path) -> list[int]:
    """Training records of each simulated client (its partition less its validation split)."""
    from . import data

    records = data.load_records(cfg.data, cache)
    train_idx, _ = data.split(records, cfg.data)
    parts = data.partition(records, train_idx, cfg.federation.num_clients, cfg.data)
    return [len(p) - validation_size(len(p)) for p in parts]


def calibrate(run: RunConfig, records: int, who: str, batch_key: str = "train.batch_size") -> ClientPlan:
    """The plan of ``who`` (a client with ``records`` training records) under ``run`` (its profile applied).

    An infeasible plan raises :class:`ConfigError` naming the key and the feasible range.
    """
    p, b = run.privacy, run.train.batch_size
    if b > records:
        raise ConfigError(
            f"{batch_key}: the logical batch {b} exceeds {who}'s {records} training records; DP-SGD samples"
            f" each record with rate batch/records, so choose a batch in [1, {records}] or give it more data"
        )
    q, steps = sample_rate(b, records), total_steps(run)
    tol = min(0.01, p.target_epsilon / 100)  # Opacus' absolute 0.01, relative for small targets
    key = (p.accountant, p.target_epsilon, p.delta, q, steps, tol)
    sigma = _remembered_noise(cache_root(run.model), key)
    if sigma is None or sigma > p.max_noise_multiplier:
        floor = _epsilon(p.accountant, [(p.max_noise_multiplier, q, steps)], p.delta)  # the most noise allowed
        if p.target_epsilon < floor:
            raise ConfigError(
                f"privacy.target_epsilon: {p.target_epsilon} is out of reach for {who} ({records} records,"
                f" q={q:.4g}, {steps} steps): it needs a noise multiplier above privacy.max_noise_multiplier="
                f"{p.max_noise_multiplier:g}; feasible: target_epsilon >= {floor:.3g} at these settings, or lower"
                f" {batch_key}, train.local_steps or federation.num_rounds"
            )
    if sigma is None:
        sigma = calibrate_noise(p.target_epsilon, p.delta, q, steps, accountant=p.accountant, epsilon_tolerance=tol)
        _remember_noise(cache_root(run.model), key, sigma)
    # the cap itself meets the target, so a search that overshoots it (its tolerance) may stop there
    sigma = min(sigma, p.max_noise_multiplier)
    return ClientPlan(-1, records, b, q, steps, sigma)


# Calibrations are remembered (a PLD search takes ~6 s of CPU on an AVX2 core, and the preflight and
# every client of a run ask for the same ones): in this process, and across runs and processes in
# CALIBRATIONS under the cache root. What is read back is a hint only: it is used once its epsilon,
# recomputed here, is within the target (one accountant evaluation, ~0.5 s), so a stale or edited
# file can cost noise, never privacy.
CALIBRATIONS = "noise-calibrations.json"
CALIBRATION_FORMAT = 1  # raise when calibrate_noise changes what it returns
_VERIFIED: dict[tuple[str, float, float, float, int, float], float] = {}


def _calibration_id(key: tuple[str, float, float, float, int, float]) -> str:
    import importlib.metadata

    versions = [importlib.metadata.version(d) for d in ("dp-accounting", "opacus")]
    return json.dumps([CALIBRATION_FORMAT, *versions, *key])


def _remembered_noise(cache: Path, key: tuple[str, float, float, float, int, float]) -> float | None:
    if key in _VERIFIED:
        return _VERIFIED[key]
    try:
        sigma = json.loads((cache / CALIBRATIONS).read_text()).get(_calibration_id(key))
    except (OSError, ValueError, AttributeError):
        return None  # none yet, or unreadable: calibrate (and rewrite it)
    accountant, target, delta, q, steps, _ = key
    if not isinstance(sigma, float) or not sigma > 0 or _epsilon(accountant, [(sigma, q, steps)], delta) > target:
        return None
    _VERIFIED[key] = sigma
    return sigma


def _remember_noise(cache: Path, key: tuple[str, float, float, float, int, float], sigma: float) -> None:
    _VERIFIED[key] = sigma
    path = cache / CALIBRATIONS
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    known[_calibration_id(key)] = sigma
    with contextlib.suppress(OSError):  # a read-only cache: calibrate again next time
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(known, indent=0))


def check_privacy_plan(cfg: RunConfig, cache: Path) -> list[ClientPlan]:
    """Every client's plan under local DP (empty without it); the first infeasible client raises ConfigError.

    Clients with the same profile and record count share one calibration.
    """
    if not cfg.privacy.local:
        return []
    batch_key = "clients.profiles.<name>.batch_size" if cfg.clients.mix else "train.batch_size"
    plans: dict[tuple[str, int], ClientPlan] = {}
    out = []
    for cid, n in enumerate(train_sizes(cfg, cache)):
        name, profile = client_profile(cfg, cid)
        if (name, n) not in plans:
            plans[name, n] = calibrate(apply_profile(cfg, profile), n, f"client {cid}", batch_key)
        out.append(dataclasses.replace(plans[name, n], client_id=cid))
    return out


def plan_line(plans: list[ClientPlan], privacy: PrivacyConfig) -> str:
    """One line: the budget, and the range of sampling rates, steps and noise multipliers over the clients."""

    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return format(lo, fmt) if lo == hi else f"{lo:{fmt}}-{hi:{fmt}}"

    return (
        f"epsilon {privacy.target_epsilon:g} at delta {privacy.delta:g} ({privacy.accountant}) per client over the run;"
        f" {len(plans)} clients, records {span([p.records for p in plans], 'd')},"
        f" q {span([p.sample_rate for p in plans], '.4f')}, steps {span([p.steps for p in plans], 'd')},"
        f" noise multiplier {span([p.noise_multiplier for p in plans], '.3f')}"
    )


@dataclass(frozen=True)
class NoiseToSignal:
    """Expected norm of DP-SGD's noise over the norm of the clipped signal, in the best case for the
    signal (every clipped per-sample gradient pointing the same way, norm ``C``).

    One step adds N(0, sigma^2 C^2 I_d) to a sum of at most B gradients of norm C, then divides by B:
    noise norm sigma C sqrt(d) / B against a signal of at most C. Over T local steps and a mean over K
    clients the signal adds up coherently and the independent noise as a square root, so the averaged
    round update's ratio is the step's divided by sqrt(T K).
    """

    step: float
    round_update: float


# Warn above this noise/signal of the averaged round update. The best case it assumes (every clipped
# gradient aligned) is far from real gradients, so the figure ranks recipes rather than predicts: on the
# demo (issue 17, BENCHMARKS.md) 7.1 kept 56% of the non-private gain, 4.9 kept 58%, 2.5 kept 77%.
RATIO_WARN = 4.0


def noise_to_signal(plan: ClientPlan, trainable: int, steps_per_round: int, clients_per_round: int) -> NoiseToSignal:
    step = plan.noise_multiplier * math.sqrt(trainable) / max(plan.batch_size, 1)
    return NoiseToSignal(step, step / math.sqrt(max(steps_per_round, 1) * max(clients_per_round, 1)))


def plan_warnings(cfg: RunConfig, plans: list[ClientPlan], trainable: int, train_a: bool) -> list[str]:
    """Lines for a plan whose noise swamps the signal, naming the knobs that would lower the ratio."""
    if not plans:
        return []
    fed = cfg.federation
    worst = max(noise_to_signal(c, trainable, cfg.train.local_steps, fed.clients_per_round).round_update for c in plans)
    if worst <= RATIO_WARN:
        return []
    fewest = min(c.records for c in plans)
    knobs = [
        f"a larger logical batch (train.batch_size {cfg.train.batch_size}, with train.physical_batch_size to bound"
        " memory): noise/signal falls about as 1/batch",
        f"more records per client (the smallest has {fewest}): a larger batch at the same sampling rate",
        f"fewer trainable parameters ({trainable:,}): lora.r {cfg.lora.r} -> {max(1, cfg.lora.r // 2)}, fewer"
        " lora.target_modules" + (", or strategy.name: ffa-lora (B only)" if train_a else ""),
        "fewer steps (train.local_steps x federation.num_rounds): less noise per step at the same epsilon",
    ]
    return [
        f"WARNING: noise/signal of the averaged round update is {worst:.1f} even in the best case (> {RATIO_WARN:g}):"
        " DP noise is likely to cost most of what the run would learn without it. What lowers it:",
        *(f"  - {k}" for k in knobs),
    ]


def plan_report(
    cfg: RunConfig, plans: list[ClientPlan], trainable: int | None = None, train_a: bool = True
) -> list[str]:
    """``fedslm privacy plan``: a row per client, then the epsilon each client has spent after every
    round (taking part in every round it is expected to) under PLD and RDP, for the same noise."""
    p = cfg.privacy
    lines = [plan_line(plans, p), "", "client  records  logical batch  q        steps  noise multiplier"]
    lines += [
        f"{c.client_id:>6}  {c.records:>7}  {c.batch_size:>13}  {c.sample_rate:<7.4f}  {c.steps:>5}"
        f"  {c.noise_multiplier:.4f}"
        for c in plans
    ]
    per_round = cfg.train.local_steps
    rounds = max(1, math.ceil(plans[0].steps / per_round)) if plans else 0
    lines += ["", f"epsilon after each round (delta {p.delta:g}, {per_round} steps a round), largest over the clients:"]
    lines.append("round  " + "  ".join(f"{kind:>7}" for kind in ("pld", "rdp")))
    for r in range(1, rounds + 1):
        eps = [
            max(_epsilon(kind, [(c.noise_multiplier, c.sample_rate, r * per_round)], p.delta) for c in plans)
            for kind in ("pld", "rdp")
        ]
        lines.append(f"{r:>5}  " + "  ".join(f"{e:>7.3f}" for e in eps))
    if trainable:
        fed = cfg.federation
        ratios = [noise_to_signal(c, trainable, per_round, fed.clients_per_round) for c in plans]
        lines += [
            "",
            f"expected noise/signal norm ({trainable:,} trainable parameters; best case for the signal,"
            f" sigma x sqrt(d) / batch per step, / sqrt({per_round} steps x {fed.clients_per_round} clients)"
            " for the averaged round update):",
            f"  one DP-SGD step: {min(r.step for r in ratios):.1f}-{max(r.step for r in ratios):.1f};"
            f" averaged round update: {min(r.round_update for r in ratios):.2f}"
            f"-{max(r.round_update for r in ratios):.2f}",
        ]
        lines += plan_warnings(cfg, plans, trainable, train_a)
    return lines
