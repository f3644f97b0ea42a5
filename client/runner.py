"""What one client does in one round, independent of Flower's transport (tested directly)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import ArrayRecord

from fedslm import audit, tasks, wire
from fedslm import data as data_mod
from fedslm.adapters import adapter_state, fit_rank, load_adapter_state
from fedslm.config import RunConfig, apply_profile, client_profile, config_from_dict
from fedslm.logs import get_logger
from fedslm.model import RESIDENT, cache_root
from fedslm.plan import validation_size
from fedslm.protocol import CLIENT_ID, NUM_EXAMPLES, LoRAPlan, NodeConfig, TrainInstructions, TrainReport
from fedslm.training import LocalTraining, round_learning_rate, train_local

from .privacy import DeclinedRound
from .state import ClientStore

log = get_logger(__name__)


_ENCODED: dict[
    tuple[Any, ...], tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], list[dict[str, Any]]]
] = {}


@dataclass
class ClientRunner:
    cfg: RunConfig
    client_id: int
    num_clients: int
    data_path: str
    server_round: int
    plan: LoRAPlan  # what the strategy asks of this client's LoRA (train A? upload B? proximal mu)
    store: ClientStore
    lr_scale: float = 1.0  # the server's divergence guard lowers it after a rejected round
    rank: int = 0  # LoRA rank this client trains (its profile's; 0 = lora.r, the global adapter's rank)
    profile: str = ""  # its profile in clients.profiles ("" = none)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], node: Mapping[str, Any]) -> ClientRunner:
        """From a train config (a ``ConfigRecord``, or the dict a legacy ``NumPyClient.fit`` gets)."""
        instructions, nc = TrainInstructions.from_record(config), NodeConfig.from_record(node)
        raw = yaml.safe_load(instructions.run_config)
        cfg = config_from_dict(raw, "run-config sent by the server")
        client_id = nc.client
        profile, prof = client_profile(cfg, client_id, nc.profile)
        cfg = apply_profile(cfg, prof)  # its quantization, local steps and batch size
        if nc.device:  # the node's own hardware (fedslm node --device) overrides the run's
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=nc.device))
        num_clients = nc.num_partitions if nc.num_partitions is not None else cfg.federation.num_clients
        state_root = Path(nc.state_dir) if nc.state_dir else cache_root(cfg.model) / "client-state"
        return cls(
            cfg=cfg,
            client_id=client_id,
            num_clients=num_clients,
            data_path=nc.data_path,
            server_round=instructions.server_round,
            plan=instructions.plan,
            lr_scale=instructions.lr_scale,
            store=ClientStore(state_root / instructions.run_name / f"client-{client_id}"),
            rank=prof.rank,
            profile=profile,
        )

    # -- data ---------------------------------------------------------------------------------
    def _records(self) -> list[dict[str, Any]]:
        dcfg = self.cfg.data
        if self.data_path:  # a real node: all of the file is this node's private data
            from dataclasses import replace

            return data_mod.load_records(replace(dcfg, source=self.data_path), cache_root(self.cfg.model))
        return data_mod.client_records(dcfg, cache_root(self.cfg.model), self.client_id, self.num_clients).records

    def examples(
        self, tokenizer: Any
    ) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], list[dict[str, Any]]]:
        """(train examples, validation examples, validation records), cached per process."""
        key = (
            self.data_path,
            self.client_id,
            self.num_clients,
            _digest(self.cfg.data),
            _digest(self.cfg.audit),
            self.cfg.seed,
            self.cfg.model.max_length,
            self.cfg.model.name,
        )
        if key not in _ENCODED:
            records = self._records()
            n_val = validation_size(len(records))
            train_recs, val_recs = records[n_val:], records[:n_val]
            train_recs = audit.insert_canaries(self.cfg, self.client_id, train_recs)  # never in validation
            _ENCODED.clear()
            _ENCODED[key] = (
                tasks.encode(self.cfg, tokenizer, train_recs),
                tasks.encode(self.cfg, tokenizer, val_recs),
                val_recs,
            )
        return _ENCODED[key]

    # -- train --------------------------------------------------------------------------------
    @property
    def lora_rank(self) -> int:
        return self.rank or self.cfg.lora.r

    def _resident(self) -> Any:
        # a lower rank than lora.r re-wraps the resident base with LoRA of that rank (same scale)
        return tasks.resident_model(self.cfg, self.lora_rank)

    def _global(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global adapter at this client's rank: the first ``rank`` components (HetLoRA, FLoRA)."""
        return fit_rank(wire.decode(arrays), self.lora_rank)

    @property
    def _keeps_own_b(self) -> bool:
        """FedSA-LoRA: B never leaves this client; its own B replaces the global one."""
        return not self.plan.upload_lora_b

    def _load_start(self, model: Any, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """Load what this client starts from (trains or evaluates): the shared seeded init, the global
        adapter over it (FFA-LoRA may send only B: A stays at the init), this client's own B under
        FedSA-LoRA. Returns the full adapter state loaded."""
        full = dict(self._resident().initial)
        full.update(self._global(arrays))
        if self._keeps_own_b:
            full.update(self.store.load_tensors("local-lora-b") or {})
        load_adapter_state(model, full)
        return full

    def _model(self) -> tuple[Any, Any]:
        resident = self._resident()
        return resident.model, resident.base.tokenizer

    def train(self, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float | int]]:
        t_start = time.perf_counter()
        model, tokenizer = self._model()
        train_ex, _, _ = self.examples(tokenizer)
        full = self._load_start(model, arrays)

        t = self.cfg.train
        dp = None
        accountant = None
        if self.cfg.privacy.local:
            from .privacy import ClientPrivacy

            accountant = ClientPrivacy(self.cfg, self.store, len(train_ex))
            dp = accountant.settings()
            accountant.check_budget(self.client_id, self.lora_rank)  # raises DeclinedRound
        seed = _mix(t.seed, self.client_id, self.server_round)
        spec = LocalTraining(
            steps=t.local_steps,
            batch_size=t.batch_size,
            learning_rate=round_learning_rate(
                t.learning_rate, t.lr_schedule, self.server_round, self.cfg.federation.num_rounds
            )
            * self.lr_scale,
            weight_decay=t.weight_decay,
            optimizer=t.optimizer,
            momentum=t.momentum,
            seed=seed,
            proximal_mu=self.plan.proximal_mu,
            train_lora_a=self.plan.train_lora_a,
            train_head=tasks.trains_head(self.cfg),
            dp=dp,
            length_bucketing=t.length_bucketing,
            physical_batch_size=t.physical_batch_size,
            max_grad_norm=t.max_grad_norm,
            warmup_steps=t.warmup_steps,
        )
        result = train_local(model, train_ex, tokenizer.pad_token_id, spec)
        privacy = accountant.record(t.local_steps) if accountant is not None else None
        state = adapter_state(model)
        if self._keeps_own_b:
            self.store.save_tensors("local-lora-b", {k: v for k, v in state.items() if "lora_B" in k})
        state = {k: state[k] for k in self.plan.uploads(state)}
        report = TrainReport(
            client_id=self.client_id,
            lora_rank=self.lora_rank,
            privacy=privacy,
            num_examples=result.num_examples,
            train_loss=result.loss_mean,
            train_loss_first=result.loss_first,
            train_loss_last=result.loss_last,
            train_seconds=result.seconds,
            train_steps=result.steps,
            samples_seen=result.samples_seen,
            model_loads=RESIDENT.loads,
            compute_dtype=self._resident().base.compute_dtype,
        )
        log.info(
            "client %d round %d: %d steps, loss %.3f -> %.3f (%.1f s)",
            self.client_id,
            self.server_round,
            result.steps,
            result.loss_first,
            result.loss_last,
            result.seconds,
        )
        upload = self._upload(state, full)
        report = dataclasses.replace(report, client_seconds=time.perf_counter() - t_start)
        return upload, report.to_record()

    def _upload(self, state: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> ArrayRecord:
        """The update for the wire: the adapter in ``communication.dtype``, or its compressed delta
        from what the server sent, with this client's error-feedback residual carried over."""
        comm = self.cfg.communication
        if not comm.compresses_delta:
            return wire.encode(state, comm.dtype)
        residual = self.store.load_tensors("wire-residual") or {}
        delta = {k: v.to(torch.float32) - sent[k] + residual.get(k, 0.0) for k, v in state.items()}
        record, decoded = wire.compress_delta(delta, dtype=comm.dtype, int8=comm.quantize_delta, topk=comm.topk)
        self.store.save_tensors("wire-residual", {k: delta[k] - decoded[k] for k in delta})
        return record

    # -- evaluate -----------------------------------------------------------------------------
    def evaluate(self, arrays: ArrayRecord) -> dict[str, float | int]:
        """The global adapter on this client's own validation split (how well it serves this site), at most
        ``data.eval_size`` of its records, as the central evaluation: a hospital of thousands holds hundreds back."""
        model, tokenizer = self._model()
        _, val_ex, val_recs = self.examples(tokenizer)
        if size := self.cfg.data.eval_size:
            val_ex, val_recs = val_ex[:size], val_recs[:size]
        self._load_start(model, arrays)
        m = tasks.evaluate_records(self.cfg, model, tokenizer, val_recs, val_ex)
        return {**m, "eval_records": len(val_ex), NUM_EXAMPLES: len(val_ex), CLIENT_ID: self.client_id}


def _digest(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def _mix(*parts: int) -> int:
    """A stable per-(seed, client, round) seed (no global seeding anywhere)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


__all__ = ["ClientRunner", "DeclinedRound", "torch"]
