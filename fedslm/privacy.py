"""Privacy accounting that holds across rounds and process restarts.

An accountant is its *history*: ``(noise_multiplier, sample_rate, steps)`` triples, the structure
Opacus' RDP and PRV accountants keep in ``.history``. fedslm persists that history as JSON (never
pickle) and rebuilds a fresh accountant from it to compute the cumulative epsilon (Opacus' RDP or PRV,
or dp_accounting's PLD: :mod:`fedslm.pld`), so R rounds of k steps give exactly the epsilon of one
accountant run over R*k steps, before or after a restart.

- :class:`ClientAccountant`: record-level DP-SGD steps of one client (local DP).
- :class:`CentralAccountant`: client-level DP of the server's noisy aggregate, one composition per
  round with the client sampling rate ``clients_per_round / num_clients`` (central DP).

Opacus is imported lazily: it pulls in torch, which a server that only accounts does not need.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar, overload

from .errors import FedslmError
from .fs import atomic_write

ACCOUNTANTS = ("pld", "rdp", "prv")  # pld: dp_accounting's PLD (fedslm.pld); rdp, prv: Opacus'
DEFAULT_ACCOUNTANT = "pld"  # the tightest valid bound: less noise for the same budget (fedslm.pld)
STATE_FORMAT = 1
# The PRV accountant convolves densities on a grid whose size grows with sqrt(steps * log(1/delta))
# and with the RDP epsilon; it takes ~65 bytes per point (10M points ~ 0.65 GB, ~7 s). Beyond this
# it refuses instead of exhausting memory (a 1e6-step, delta=1e-12 history asks for 1.4e9 points).
PRV_MAX_GRID_POINTS = 10_000_000
PRV_EPS_ERROR = 0.01  # Opacus' default eps_error of PRVAccountant.get_epsilon

Entry = tuple[float, float, int]


class PrivacyError(FedslmError, ValueError):
    """An invalid privacy argument; the message names the value and what is allowed."""


class PrivacyStateError(PrivacyError):
    """Saved privacy state is unreadable. It is never silently reset (that would reset the budget)."""


class PrivacyBudgetError(PrivacyError):
    """A privacy target that cannot be met; the message says which setting to change."""


def _entry(raw: Any, where: str, error: type[PrivacyError] = PrivacyStateError) -> Entry:
    """One validated history entry ``(noise_multiplier >= 0, sample_rate in (0, 1], steps >= 1)``."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 3:
        raise error(f"{where} must be [noise_multiplier, sample_rate, steps], got {raw!r}")
    for value, name in zip(raw[:2], ("noise multiplier", "sample rate"), strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise error(f"{where} {name} must be a finite number, got {value!r}")
    nm, q, steps = float(raw[0]), float(raw[1]), raw[2]
    if nm < 0:
        raise error(f"{where} noise multiplier must be >= 0, got {nm}")
    if not 0 < q <= 1:
        raise error(f"{where} sample rate must be in (0, 1], got {q}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise error(f"{where} steps must be a positive integer, got {steps!r}")
    return nm, q, int(steps)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise PrivacyError(f"delta {delta} not in (0, 1)")


@dataclass
class _Accountant:
    """History of sampled Gaussian mechanisms; epsilon comes from a fresh Opacus accountant."""

    accountant: str = DEFAULT_ACCOUNTANT
    history: list[Entry] = field(default_factory=list)
    kind: ClassVar[str] = ""  # written to the JSON so a central state is never loaded as a client's

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {self.accountant!r}; choose one of {list(ACCOUNTANTS)}")
        self.history = [_entry(e, f"history[{i}]") for i, e in enumerate(self.history)]

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` DP steps; merged into the last entry when noise and rate are the same (as Opacus does).

        ``steps == 0`` (a round that ran no step) records nothing.
        """
        if steps == 0:
            return
        nm, q, n = _entry((noise_multiplier, sample_rate, steps), "record()", PrivacyError)
        if self.history and self.history[-1][:2] == (nm, q):
            self.history[-1] = (nm, q, self.history[-1][2] + n)
        else:
            self.history.append((nm, q, n))

    @property
    def steps(self) -> int:
        """Compositions recorded so far (DP-SGD steps, or rounds for the central accountant)."""
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` (0 before any step, inf if any step had no noise)."""
        return _epsilon(self.accountant, self.history, delta)

    def would_exceed(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, target_epsilon: float
    ) -> tuple[bool, float]:
        """Whether ``steps`` more steps would push epsilon over ``target_epsilon``, and the epsilon reached."""
        trial = type(self)(self.accountant, list(self.history))
        trial.record(noise_multiplier, sample_rate, steps)
        would = trial.epsilon(delta)
        return would > target_epsilon, would

    def to_json(self) -> str:
        state = {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "accountant": self.accountant,
            "history": [list(e) for e in self.history],
        }
        return json.dumps(state, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Parse and validate :meth:`to_json` output; anything malformed raises :class:`PrivacyStateError`."""
        try:
            raw = json.loads(text)
        except ValueError as e:  # JSONDecodeError, and NaN/Infinity are rejected below
            raise PrivacyStateError(f"not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise PrivacyStateError(f"expected a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"format", "kind", "accountant", "history"})
        if unknown:
            raise PrivacyStateError(f"unknown keys {unknown}; allowed: format, kind, accountant, history")
        if raw.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise PrivacyStateError(f"state format {raw['format']!r} is not {STATE_FORMAT}, written by another version")
        if raw.get("kind", cls.kind) != cls.kind:
            raise PrivacyStateError(f"holds a {raw['kind']!r} accountant, expected {cls.kind!r}")
        for key in ("accountant", "history"):
            if key not in raw:
                raise PrivacyStateError(f"missing key {key!r}")
        if raw["accountant"] not in ACCOUNTANTS:
            raise PrivacyStateError(f"accountant {raw['accountant']!r} is not one of {list(ACCOUNTANTS)}")
        if not isinstance(raw["history"], list):
            raise PrivacyStateError(f"history must be a list, got {type(raw['history']).__name__}")
        return cls(raw["accountant"], raw["history"])


class ClientAccountant(_Accountant):
    """Record-level DP-SGD history of one client over the whole run (local DP)."""

    kind: ClassVar[str] = "client"


class CentralAccountant(_Accountant):
    """Client-level DP of the server's noisy aggregate: one composition per round (central DP)."""

    kind: ClassVar[str] = "central"

    def record_round(self, noise_multiplier: float, clients_per_round: int, num_clients: int) -> None:
        """One round of the Gaussian mechanism with clients sampled at rate ``clients_per_round / num_clients``."""
        if not 1 <= clients_per_round <= num_clients:
            raise PrivacyError(f"clients per round {clients_per_round} not in [1, num_clients={num_clients}]")
        self.record(noise_multiplier, clients_per_round / num_clients, 1)


@contextmanager
def _quiet_alpha_range() -> Iterator[None]:
    """Silence, in this block only, Opacus' hint that the best RDP order is at the end of its range."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)
        yield


def _prv_grid_points(history: Sequence[Entry], delta: float) -> int:
    """Points of the grid Opacus' PRV accountant would allocate (its own domain rule, no allocation)."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    with _quiet_alpha_range():  # the domain bound is an RDP epsilon at delta/4000, often at the largest alpha
        domain = PRVAccountant()._get_domain(
            prvs=[PoissonSubsampledGaussianPRV(q, nm) for nm, q, _ in history],
            num_self_compositions=[n for _, _, n in history],
            eps_error=PRV_EPS_ERROR,
            delta_error=delta / 1000,  # Opacus' default delta_error
        )
    return int(domain.size)


def _check_prv_size(history: Sequence[Entry], delta: float) -> None:
    points = _prv_grid_points(history, delta)
    if points > PRV_MAX_GRID_POINTS:
        raise PrivacyError(
            f"PRV accounting of {sum(n for *_, n in history)} steps at delta {delta} needs a grid of {points:,}"
            f" points (limit {PRV_MAX_GRID_POINTS:,}, ~65 bytes each); use privacy.accountant: rdp"
        )


def _epsilon(accountant: str, history: list[Entry], delta: float) -> float:
    _check_delta(delta)
    if not history:
        return 0.0
    return _composed_epsilon(accountant, tuple((float(nm), float(q), int(n)) for nm, q, n in history), delta)


@functools.lru_cache(maxsize=512)  # a client asks for the same histories each round (~0.5 s each with PLD)
def _composed_epsilon(accountant: str, history: tuple[Entry, ...], delta: float) -> float:
    if any(nm == 0 for nm, _, _ in history):
        return math.inf  # a step without noise has no (finite) guarantee; PRV would overflow on it
    if accountant == "pld":
        from .pld import pld_epsilon

        return pld_epsilon(history, delta)
    from opacus.accountants import create_accountant

    if accountant == "prv":
        _check_prv_size(history, delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


# ------------------------------------------------------------------------------------------------
# persistence

_A = TypeVar("_A", bound=_Accountant)


def save_state(path: str | os.PathLike[str], accountant: _Accountant) -> None:
    """Write the accountant's JSON atomically and durably (:func:`fedslm.fs.atomic_write`).

    A crash leaves either the old file or the new one, never a torn one.
    """
    atomic_write(path, accountant.to_json())


@overload
def load_state(path: str | os.PathLike[str]) -> ClientAccountant | None: ...
@overload
def load_state(path: str | os.PathLike[str], cls: type[_A]) -> _A | None: ...
def load_state(path: str | os.PathLike[str], cls: type[_Accountant] = ClientAccountant) -> _Accountant | None:
    """The saved accountant, or None if no file exists yet; an unreadable file raises PrivacyStateError."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return cls.from_json(path.read_text(encoding="utf-8"))
    except (PrivacyStateError, OSError, UnicodeDecodeError) as e:
        raise PrivacyStateError(
            f"{path}: {e}. Restore the file or start a new run; deleting it would reset the spent privacy budget"
        ) from None


# ------------------------------------------------------------------------------------------------
# planning a run


def expected_total_steps(num_rounds: int, clients_per_round: int, num_clients: int, local_steps: int) -> int:
    """DP-SGD steps a client is expected to run over the whole run.

    With ``clients_per_round`` of ``num_clients`` sampled uniformly each round, a client takes part
    in ``num_rounds * clients_per_round / num_clients`` rounds in expectation. The noise is
    calibrated on that count rounded *up* (times ``local_steps``) so the expected run stays within
    the budget; a client sampled more often than expected is stopped by
    :meth:`ClientAccountant.would_exceed` before the round that would exceed it.
    """
    for name, value in (("num_rounds", num_rounds), ("num_clients", num_clients), ("local_steps", local_steps)):
        if value < 1:
            raise PrivacyError(f"{name} must be >= 1, got {value}")
    if not 1 <= clients_per_round <= num_clients:
        raise PrivacyError(f"clients_per_round {clients_per_round} not in [1, num_clients={num_clients}]")
    return math.ceil(num_rounds * clients_per_round / num_clients) * local_steps


def _noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str, tol: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet_alpha_range():  # the bisection probes noise levels far from the answer
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=kind,
                epsilon_tolerance=tol,
            )
        )


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier whose ``total_steps`` steps end at or just below ``target_epsilon``.

    Wraps Opacus' ``get_noise_multiplier`` (a bisection; ``epsilon_tolerance`` is *absolute*: the
    final epsilon lies in ``[target - tolerance, target]``). For PRV and PLD the noise is first
    bracketed with RDP, which also refuses targets that no noise level below 1e6 reaches; the PRV
    grid the search would need is checked before any is allocated, and PLD bisects below RDP's noise
    (:func:`fedslm.pld.pld_noise`, which brackets on its own where RDP cannot reach the target).
    """
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; choose one of {list(ACCOUNTANTS)}")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyBudgetError(f"target epsilon {target_epsilon} must be finite and > 0: set privacy.target_epsilon")
    _check_delta(delta)
    if not 0 < sample_rate <= 1:
        raise PrivacyBudgetError(f"sample rate {sample_rate} not in (0, 1]: check train.batch_size and the records")
    if total_steps < 1:
        raise PrivacyBudgetError(f"total steps {total_steps} must be >= 1")
    if not 0 < epsilon_tolerance < target_epsilon:
        raise PrivacyBudgetError(f"epsilon tolerance {epsilon_tolerance} not in (0, target {target_epsilon})")
    try:
        if accountant == "pld":
            from .pld import pld_noise

            rdp: float | None = None  # RDP cannot certify a tiny epsilon at any noise (its orders stop at 256)
            # only an upper end for PLD's search: any noise that RDP certifies will do, so a loose tolerance
            bracket = max(epsilon_tolerance, 0.05 * target_epsilon)
            with contextlib.suppress(ValueError):
                rdp = _noise_for(target_epsilon, delta, sample_rate, total_steps, "rdp", bracket)
            return pld_noise(target_epsilon, delta, sample_rate, total_steps, rdp, epsilon_tolerance)
        sigma = _noise_for(target_epsilon, delta, sample_rate, total_steps, "rdp", epsilon_tolerance)
        if accountant == "prv":
            # PRV is tighter than RDP, so its answer is below sigma; the bisection probes down to about half of it
            _check_prv_size([(sigma / 2, sample_rate, total_steps)], delta)
            sigma = _noise_for(target_epsilon, delta, sample_rate, total_steps, "prv", epsilon_tolerance)
    except PrivacyError:
        raise
    except ValueError as e:
        raise PrivacyBudgetError(
            f"epsilon {target_epsilon} at delta {delta} is out of reach for {total_steps} steps at sampling"
            f" rate {sample_rate:.4g} ({e}); raise privacy.target_epsilon, or lower the steps or the sampling rate"
        ) from None
    return sigma


def default_delta(num_records: int) -> float:
    """A delta well below 1/n: ``min(1e-5, 0.1 / n)``.

    Publishing one random record in full is (0, 1/n)-DP, so a delta near 1/n allows that kind of
    leak; delta must be much smaller. 0.1/n keeps a factor 10 margin for small clients, and 1e-5 is
    the customary value (Abadi et al. 2016, the Opacus examples) once n exceeds 10,000.
    """
    if num_records < 1:
        raise PrivacyError(f"num_records must be >= 1, got {num_records}")
    return min(1e-5, 0.1 / num_records)
