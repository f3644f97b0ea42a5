"""Record-level DP on a client: noise calibrated once for the whole run, history kept on disk.

The noise multiplier is a deterministic function of the run config and the client's record count
(calibrated for the steps the client is expected to run over ALL rounds), so it is the same in
every round and after a restart. The accountant's history is persisted beside the client's other
state; every reply carries the cumulative epsilon and whether another round still fits the budget
(``budget-exhausted``), so that the server stops sampling a spent client. A round that would exceed
the budget is declined.
"""

from __future__ import annotations

from fedslm.config import RunConfig
from fedslm.logs import get_logger
from fedslm.plan import calibrate
from fedslm.privacy import ClientAccountant, PrivacyStateError, load_state, save_state
from fedslm.protocol import PrivacyReport, TrainReport
from fedslm.training import DPSettings

from .state import ClientStore


class DeclinedRound(Exception):
    """The client will not train this round (e.g. its privacy budget would be exceeded)."""

    def __init__(self, reason: str, report: TrainReport) -> None:
        super().__init__(reason)
        self.report = report  # the reply's metrics: declined, no examples, the privacy spent so far


log = get_logger(__name__)


class ClientPrivacy:
    def __init__(self, cfg: RunConfig, store: ClientStore, num_records: int) -> None:
        p = cfg.privacy
        if p.delta >= 1.0 / num_records:
            log.warning(
                "privacy.delta=%s is not below 1/records=%s of this client: the guarantee is weak",
                p.delta,
                1.0 / num_records,
            )
        self.cfg = cfg
        self.path = store.root / "privacy.json"
        plan = calibrate(cfg, num_records, "this client")  # what `fedslm check` computed for it
        self.sample_rate, self.total_steps, self.noise_multiplier = plan.sample_rate, plan.steps, plan.noise_multiplier
        self.accountant = load_state(self.path) or ClientAccountant(p.accountant)
        if self.accountant.accountant != p.accountant:
            raise PrivacyStateError(
                f"{self.path} holds a {self.accountant.accountant!r} history but privacy.accountant is"
                f" {p.accountant!r}; resume with the accountant the run started with"
            )

    def settings(self) -> DPSettings:
        p = self.cfg.privacy
        return DPSettings(self.noise_multiplier, p.max_grad_norm, self.sample_rate, p.secure_mode)

    def _report(self, epsilon: float) -> PrivacyReport:
        p = self.cfg.privacy
        exhausted, _ = self.accountant.would_exceed(
            self.noise_multiplier, self.sample_rate, self.cfg.train.local_steps, p.delta, p.target_epsilon
        )
        return PrivacyReport(
            epsilon=epsilon,
            budget_exhausted=exhausted,  # the server stops sampling a client once another round would not fit
            delta=p.delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            max_grad_norm=p.max_grad_norm,
        )

    def check_budget(self, client_id: int, lora_rank: int) -> None:
        """Raise :class:`DeclinedRound` if this round's steps would exceed the run's budget."""
        p = self.cfg.privacy
        exceed, would = self.accountant.would_exceed(
            self.noise_multiplier, self.sample_rate, self.cfg.train.local_steps, p.delta, p.target_epsilon
        )
        if exceed:
            spent = self.accountant.epsilon(p.delta)
            report = TrainReport(
                num_examples=0, client_id=client_id, lora_rank=lora_rank, declined=True, privacy=self._report(spent)
            )
            raise DeclinedRound(
                f"privacy budget: epsilon {spent:.3f} spent, this round would reach {would:.3f}"
                f" > target {p.target_epsilon}",
                report,
            )

    def record(self, steps: int) -> PrivacyReport:
        """Account for this round's ``steps`` (persisted) and report the privacy spent so far."""
        self.accountant.record(self.noise_multiplier, self.sample_rate, steps)
        save_state(self.path, self.accountant)
        return self._report(self.accountant.epsilon(self.cfg.privacy.delta))
