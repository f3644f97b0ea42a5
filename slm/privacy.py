"""Privacy accounting that holds across rounds and process restarts.

An accountant is its *history*: ``(noise_multiplier, sample_rate, steps)`` triples, the structure
Opacus' RDP and PRV accountants keep. fedslm persists that history as JSON (never pickle) and
rebuilds an Opacus accountant from it to compute the cumulative epsilon, so R rounds of k steps
give exactly the epsilon of one accountant run over R*k steps, before or after a restart.

- :class:`ClientAccountant`: record-level DP-SGD steps of one client (local DP).
- :class:`CentralAccountant`: client-level DP of the server's noisy aggregate, one step per round
  with the client sampling rate (central DP).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

ACCOUNTANTS = ("rdp", "prv")


class PrivacyStateError(ValueError):
    """Saved privacy state is unreadable. It is never silently reset (that would reset the budget)."""


class PrivacyBudgetError(ValueError):
    """A privacy target that cannot be met; the message says which setting to change."""


class _Accountant:
    """History of Gaussian-mechanism compositions, with epsilon from a fresh Opacus accountant."""

    def __init__(self, accountant: str = "rdp", history: list[tuple[float, float, int]] | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyStateError(f"unknown accountant {accountant!r}; choose one of {list(ACCOUNTANTS)}")
        self.accountant = accountant
        self.history: list[tuple[float, float, int]] = list(history or [])

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            nm, q, n = self.history[-1]
            self.history[-1] = (nm, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """Cumulative epsilon at ``delta`` (optionally with ``extra`` steps appended, hypothetically)."""
        history = list(self.history)
        if extra is not None and extra[2] > 0:
            history.append(extra)
        if not history:
            return 0.0
        return _epsilon(self.accountant, history, delta)

    def to_json(self) -> str:
        return json.dumps({"accountant": self.accountant, "history": [list(h) for h in self.history]})

    @classmethod
    def from_json(cls, text: str) -> Any:
        try:
            raw = json.loads(text)
            history = [(float(nm), float(q), int(n)) for nm, q, n in raw["history"]]
            accountant = str(raw["accountant"])
        except (ValueError, KeyError, TypeError) as e:
            raise PrivacyStateError(f"malformed privacy state ({type(e).__name__}: {e})") from None
        for nm, q, n in history:
            if not (nm >= 0 and 0 < q <= 1 and n > 0):
                raise PrivacyStateError(f"malformed privacy state entry {(nm, q, n)}")
        return cls(accountant, history)


def _epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


class ClientAccountant(_Accountant):
    """Record-level DP-SGD history of one client over the whole run."""

    def would_exceed(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, target_epsilon: float
    ) -> tuple[bool, float]:
        """Whether ``steps`` more steps would push epsilon over ``target_epsilon``, and to what."""
        would = self.epsilon(delta, (noise_multiplier, sample_rate, steps))
        return would > target_epsilon, would


class CentralAccountant(_Accountant):
    """Client-level DP of the server's noisy aggregate: one composition per round."""

    def record_round(self, noise_multiplier: float, clients_per_round: int, num_clients: int) -> None:
        self.record(noise_multiplier, min(1.0, clients_per_round / num_clients), 1)


def save_state(path: Path, accountant: _Accountant) -> None:
    """Atomic JSON write (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(accountant.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> ClientAccountant | None:
    """The saved history, or None if there is none yet; a corrupt file raises PrivacyStateError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return ClientAccountant.from_json(path.read_text())
    except PrivacyStateError as e:
        raise PrivacyStateError(f"{path}: {e}; restore it or start a new run") from None


def expected_total_steps(num_rounds: int, clients_per_round: int, num_clients: int, local_steps: int) -> int:
    """DP-SGD steps a client is expected to run in the whole run (rounds rounded up).

    With ``clients_per_round`` of ``num_clients`` sampled each round, a client joins
    ``num_rounds * clients_per_round / num_clients`` rounds in expectation. Calibrating on the
    rounded-up count keeps the budget; a client sampled more often is stopped by ``would_exceed``.
    """
    rounds = math.ceil(num_rounds * clients_per_round / num_clients)
    return max(1, rounds) * local_steps


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier whose ``total_steps`` steps end at or just below ``target_epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1:
        raise PrivacyBudgetError(f"sample rate {sample_rate} not in (0, 1]: lower train.batch_size")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    except ValueError as e:
        raise PrivacyBudgetError(
            f"epsilon {target_epsilon} at delta {delta} is out of reach for {total_steps} steps at sampling"
            f" rate {sample_rate:.4g} ({e}); raise privacy.target_epsilon or lower the steps"
        ) from None


def default_delta(num_records: int) -> float:
    """A delta well below 1/n: min(1e-5, 0.1/n)."""
    return min(1e-5, 0.1 / max(num_records, 1))
