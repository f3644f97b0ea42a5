"""The SecAgg+ ServerApp (``security.secure_aggregation: secagg+``): Flower's legacy workflow.

Flower's SecAgg+ exists only in its legacy API: a ``DefaultWorkflow`` whose fit step is a
``SecAggPlusWorkflow`` driving a legacy ``Strategy`` through a ``LegacyContext``. The server never
sees one client's adapter: it sums masked, quantized uploads, removes the masks (recovering those of
clients that dropped out from the other clients' key shares) and gets the example-weighted mean,
up to SecAgg+'s quantization (see :mod:`fedslm.secagg` for the bound).

:class:`SecAggFedAvg` is that legacy strategy, configured from the run config: the initial adapter
in the fixed key order, the train config our ClientApp expects, sampling from ``federation``, no
federated evaluation. Its ``evaluate`` (called after every round) writes the run directory as the
normal path does: ``metrics.jsonl`` rows, ``adapters/round-NNN``, and at the end ``summary.json``.
Not on this path: checkpoints and resume, per-client evaluation, the server's per-update checks
(there are no individual updates), seeded client sampling (legacy sampling uses ``random``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from fedslm.strategies import registry
from flwr.app import ArrayRecord, Context
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fedslm import secagg
from fedslm.adapters import from_arrayrecord, to_arrayrecord
from fedslm.config import ConfigError, RunConfig
from fedslm.grid import GridView
from fedslm.logs import get_logger
from fedslm.protocol import LoRAPlan, TrainInstructions, TrainReport

from .evaluation import CentralEvaluator
from .recording import Recorded, Recorder, RoundCallback, RoundRecord, evaluate_centrally, failure_line
from .report import write_results

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------------
# the legacy strategy


class SecAggFedAvg(Recorded, FedAvg):
    """Legacy FedAvg over the SecAgg+ aggregate, writing fedslm's run directory."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: Path,
        run_name: str,
        evaluator: CentralEvaluator,
        grid: GridView | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        fed = cfg.federation
        self.cfg, self.out, self.run_name = cfg, Path(out_dir), run_name
        self.evaluator, self.grid = evaluator, grid
        self.global_state = from_arrayrecord(evaluator.initial_arrays())
        self.keys = secagg.adapter_keys(self.global_state)
        self.strategy = registry.build(cfg)  # the registered strategy: only its client keys are used
        self.recorder = Recorder(
            self.out, evaluator.save, on_round, cfg.security.secure_aggregation, evaluator.compute_dtype
        )
        self._round = RoundRecord(0, time.perf_counter())
        self._aggregated = False
        super().__init__(
            fraction_fit=fed.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=fed.min_train_clients,
            min_evaluate_clients=0,
            min_available_clients=fed.min_train_clients,
            on_fit_config_fn=self.fit_config,
            initial_parameters=ndarrays_to_parameters(secagg.pack(self.global_state, self.keys)),
            accept_failures=True,
        )

    def __repr__(self) -> str:
        return f"SecAggFedAvg({self.cfg.strategy.name}, {self.cfg.security.secure_aggregation})"

    # -- what travels to clients ---------------------------------------------------------------
    def plan(self, server_round: int) -> LoRAPlan:
        plan = LoRAPlan.from_record(self.strategy.client_config(server_round))
        mu = getattr(self.strategy, "proximal_mu", None)  # FedProx sends it from its configure_train
        return plan if mu is None else dataclasses.replace(plan, proximal_mu=float(mu))

    def upload_keys(self, server_round: int) -> list[str]:
        return self.plan(server_round).uploads(self.keys)

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """The train config of :meth:`client.runner.ClientRunner.from_config`, plus the key order."""
        self._round, self._aggregated = RoundRecord(server_round, time.perf_counter()), False
        instructions = TrainInstructions(
            self.cfg.to_yaml(), self.run_name, server_round, self.plan(server_round), json.dumps(self.keys)
        )
        return instructions.to_record()

    # -- aggregate -----------------------------------------------------------------------------
    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """SecAgg+ has put the unmasked weighted mean into every result's parameters; merge it into
        the global adapter (keys the strategy does not upload keep their global value)."""
        r = self._round
        r.clients, r.failed = len(results), len(failures)
        for failure in failures:
            log.warning("round %d: a client failed or dropped out: %s", server_round, failure)
            if isinstance(failure, BaseException):
                r.errors.append(failure_line(f"{type(failure).__name__}: {failure}"))
        r.reports = [TrainReport.from_record(res.metrics) for _, res in results]
        for m in r.reports:
            if m.privacy is not None:
                self.recorder.note_privacy(-1 if m.client_id is None else m.client_id, m.privacy)
        total = sum(res.num_examples for _, res in results)
        if total > 0 and all(m.train_loss is not None for m in r.reports):
            losses = [(m.train_loss or 0.0) * res.num_examples for m, (_, res) in zip(r.reports, results, strict=True)]
            r.train_loss = sum(losses) / total
        if len(results) < self.cfg.federation.min_train_clients:
            log.warning(
                "round %d skipped: %d clients in the secure sum < federation.min_train_clients=%d; global adapter kept",
                server_round,
                len(results),
                self.cfg.federation.min_train_clients,
            )
            return None, {}
        mean = secagg.unpack(
            parameters_to_ndarrays(results[0][1].parameters), self.upload_keys(server_round), self.global_state
        )
        self.global_state = {**self.global_state, **mean}
        self._aggregated = True
        return ndarrays_to_parameters(secagg.pack(self.global_state, self.keys)), {}

    # -- evaluate and record (called for round 0 and after every round) -------------------------
    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        state = secagg.unpack(parameters_to_ndarrays(parameters), self.keys, self.global_state)
        arrays = to_arrayrecord(state)
        last = server_round == self.cfg.federation.num_rounds
        ev: dict[str, float] = {}
        if server_round == 0 or server_round % self.cfg.eval.every == 0 or last:
            ev = evaluate_centrally(self.evaluator, server_round, arrays)
        self._record(server_round, arrays, ev)
        if not ev:
            return None
        return float(ev["eval_loss"]), {k: float(v) for k, v in ev.items() if k != "eval_loss"}

    def _record(self, rnd: int, arrays: ArrayRecord, ev: dict[str, float]) -> None:
        r = self._round
        r.round, r.ev = rnd, ev
        r.bytes_up, r.bytes_down = self.grid.take() if self.grid is not None else (0, 0)
        # a declining client is a dropout to SecAgg+ (counted in failed); no individual update to reject
        r.skipped = rnd > 0 and not self._aggregated
        self.recorder.record(r, arrays)
        self._round = RoundRecord(rnd + 1, time.perf_counter())


# ------------------------------------------------------------------------------------------------
# the ServerApp


def secaggplus_workflow(cfg: RunConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the ``security`` section's parameters."""
    sec = cfg.security
    return SecAggPlusWorkflow(
        num_shares=sec.secagg_num_shares,
        reconstruction_threshold=sec.secagg_reconstruction_threshold,
        max_weight=sec.secagg_max_weight,
        clipping_range=sec.secagg_clipping_range,
        quantization_range=sec.secagg_quantization_range,
        timeout=cfg.federation.round_timeout_s,
    )


def run_secure_federation(
    grid: Grid, context: Context, cfg: RunConfig, out_dir: Path, run_name: str, on_round: RoundCallback | None = None
) -> list[dict[str, Any]]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    view = GridView.of(grid)  # counts the bytes of every SecAgg+ stage
    strategy = SecAggFedAvg(cfg, out, run_name, CentralEvaluator(cfg), view, on_round)
    sec = cfg.security
    log.info(
        "Secure aggregation %s: %s shares, threshold %s, clipping range %g, quantization range %d, max weight %g",
        sec.secure_aggregation,
        sec.secagg_num_shares,
        sec.secagg_reconstruction_threshold,
        sec.secagg_clipping_range,
        sec.secagg_quantization_range,
        sec.secagg_max_weight,
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.federation.num_rounds), strategy=strategy)
    t0 = time.perf_counter()
    DefaultWorkflow(fit_workflow=secaggplus_workflow(cfg))(view, legacy)  # type: ignore[arg-type]
    log.info("Secure federation finished in %.1f s", time.perf_counter() - t0)
    write_results(out, cfg, strategy.rows, clients=strategy.privacy_by_client)
    return strategy.rows


def make_server_app(cfg: RunConfig, out_dir: Path, run_name: str, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp running the SecAgg+ workflow for an already validated config."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_secure_federation(grid, context, cfg, out_dir, run_name, on_round)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run`` entry point, when pyproject's components name ``fedslm.server.secagg:app`` and
    ``fedslm.client.secagg:app``; reads the run config as :mod:`fedslm.server.app` does."""
    from .app import config_from_context

    cfg, out, run_name = config_from_context(context)
    if not cfg.security.secure:
        raise ConfigError(
            "fedslm.server.secagg:app runs SecAgg+ only: set security.secure_aggregation: secagg+ in the run config,"
            " or use fedslm.server.app:app"
        )
    run_secure_federation(grid, context, cfg, out, run_name)


__all__ = ["SecAggFedAvg", "app", "make_server_app", "run_secure_federation"]
