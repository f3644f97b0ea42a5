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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedslm.strategies import registry
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fedslm import secagg
from fedslm.adapters import from_arrayrecord, to_arrayrecord
from fedslm.config import ConfigError, RunConfig
from fedslm.logs import get_logger
from fedslm.protocol import LoRAPlan, TrainInstructions, TrainReport

from .evaluation import CentralEvaluator
from .federation import RoundCallback
from .report import write_results

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------------
# bytes that travel (all four SecAgg+ stages)


def payload_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: array bytes, string/bytes lengths, 8 per number (as protobuf)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            for key, value in record.items():
                total += len(key) + sum(_value_nbytes(v) for v in (value if isinstance(value, list) else [value]))
    return total


def _value_nbytes(value: Any) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, (str, bytes)):
        return len(value)
    return 8


class CountingGrid:
    """A view of a Grid that counts the payload bytes of what it sends and receives."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down = 0
        self.up = 0

    def send_and_receive(self, messages: Iterable[Message], *args: Any, **kwargs: Any) -> Iterable[Message]:
        messages = list(messages)
        self.down += sum(payload_nbytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        self.up += sum(payload_nbytes(m.content) for m in replies if m.has_content())
        return replies

    def take(self) -> tuple[int, int]:
        """(bytes up, bytes down) since the last call."""
        up, down = self.up, self.down
        self.up = self.down = 0
        return up, down

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


# ------------------------------------------------------------------------------------------------
# the legacy strategy


@dataclass
class _Round:
    t0: float = field(default_factory=time.perf_counter)
    aggregated: bool = False
    clients: int = 0
    failed: int = 0
    train_loss: float | None = None
    model_loads_max: int | None = None


class SecAggFedAvg(FedAvg):
    """Legacy FedAvg over the SecAgg+ aggregate, writing fedslm's run directory."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: Path,
        run_name: str,
        evaluator: CentralEvaluator,
        grid: CountingGrid | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        fed = cfg.federation
        self.cfg, self.out, self.run_name = cfg, Path(out_dir), run_name
        self.evaluator, self.grid, self.on_round = evaluator, grid, on_round
        self.global_state = from_arrayrecord(evaluator.initial_arrays())
        self.keys = secagg.adapter_keys(self.global_state)
        self.strategy = registry.build(cfg)  # the registered strategy: only its client keys are used
        self.rows: list[dict[str, Any]] = []
        self.epsilon_by_client: dict[int, float] = {}
        self.privacy_by_client: dict[int, dict[str, float]] = {}
        self._round = _Round()
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
        self._round = _Round()
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
        reports = [TrainReport.from_record(res.metrics) for _, res in results]
        self._note_epsilons(reports)
        total = sum(res.num_examples for _, res in results)
        if total > 0 and all(m.train_loss is not None for m in reports):
            losses = [(m.train_loss or 0.0) * res.num_examples for m, (_, res) in zip(reports, results, strict=True)]
            r.train_loss = sum(losses) / total
        r.model_loads_max = max((m.model_loads or 0 for m in reports), default=None)
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
        r.aggregated = True
        return ndarrays_to_parameters(secagg.pack(self.global_state, self.keys)), {}

    def _note_epsilons(self, reports: list[TrainReport]) -> None:
        for m in reports:
            if m.privacy is not None:
                client = -1 if m.client_id is None else m.client_id
                self.epsilon_by_client[client] = m.privacy.epsilon
                self.privacy_by_client[client] = m.privacy.summary()

    # -- evaluate and record (called for round 0 and after every round) -------------------------
    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        state = secagg.unpack(parameters_to_ndarrays(parameters), self.keys, self.global_state)
        arrays = to_arrayrecord(state)
        last = server_round == self.cfg.federation.num_rounds
        ev: dict[str, float] = {}
        if server_round == 0 or server_round % self.cfg.eval.every == 0 or last:
            t0 = time.perf_counter()
            ev = self.evaluator(arrays)
            log.info(
                "round %d central eval: loss %.4f, accuracy %.3f (%.1f s)",
                server_round,
                ev["eval_loss"],
                ev["eval_accuracy"],
                time.perf_counter() - t0,
            )
        self._record(server_round, arrays, ev)
        if not ev:
            return None
        return float(ev["eval_loss"]), {k: float(v) for k, v in ev.items() if k != "eval_loss"}

    def _record(self, rnd: int, arrays: ArrayRecord, ev: dict[str, float]) -> None:
        r = self._round
        up, down = self.grid.take() if self.grid is not None else (0, 0)
        eps = list(self.epsilon_by_client.values())
        row: dict[str, Any] = {
            "round": rnd,
            "train_loss": r.train_loss,
            "eval_loss": ev.get("eval_loss"),
            "perplexity": ev.get("perplexity"),
            "eval_accuracy": ev.get("eval_accuracy"),
            "bytes_up": up,
            "bytes_down": down,
            "wall_s": time.perf_counter() - r.t0,
            "clients": r.clients,
            "failed": r.failed,
            "declined": 0,  # a declining client is a dropout to SecAgg+ (counted in failed)
            "rejected": 0,  # no individual update to check
            "skipped": rnd > 0 and not r.aggregated,
            "epsilon_max": max(eps) if eps else None,
            "epsilon_mean": sum(eps) / len(eps) if eps else None,
            "epsilon_central": None,
            "model_loads_max": r.model_loads_max,
            "secure_aggregation": self.cfg.security.secure_aggregation,
        }
        row.update({k: ev[k] for k in ("eval_precision", "eval_recall", "eval_f1") if k in ev})
        self.rows.append(row)
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.evaluator.save(arrays, self.out / "adapters" / f"round-{rnd:03d}")
        if self.on_round is not None:
            self.on_round(row)
        self._round = _Round()


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
    counting = CountingGrid(grid)
    strategy = SecAggFedAvg(cfg, out, run_name, CentralEvaluator(cfg), counting, on_round)
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
    DefaultWorkflow(fit_workflow=secaggplus_workflow(cfg))(counting, legacy)  # type: ignore[arg-type]
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


__all__ = ["CountingGrid", "SecAggFedAvg", "app", "make_server_app", "payload_nbytes", "run_secure_federation"]
