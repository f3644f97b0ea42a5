"""What the server and a client tell each other, defined once for both sides.

Every key a fedslm message carries is a constant here, imported by the side that writes it and the
side that reads it (as Flower's ``KEY_CLIPPING_NORM`` is). The messages themselves are small typed
dataclasses with ``to_record()`` / ``from_record()``:

- :class:`TrainInstructions`: the ``config`` record of a train (or evaluate) message, server -> client;
- :class:`TrainReport`: the ``metrics`` record of a train reply, client -> server;
- :class:`NodeConfig`: a node's config, written by Flower (simulation: ``partition-id``) or by
  ``fedslm node`` (a deployed node: ``client-id``, ``data-path`` ...).

:meth:`LoRAPlan.uploads` is the one rule deciding which LoRA tensors a client uploads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import FedslmError

# -- the records of a message's content (Flower's defaults: ``arrayrecord_key``, ``configrecord_key``)
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
DECLINE = "decline"  # a ConfigRecord with the REASON a client declined to train
REASON = "reason"

# -- train instructions, server -> client (``config``)
RUN_CONFIG = "run-config"  # the resolved run config, YAML
RUN_NAME = "run-name"
SERVER_ROUND = "server-round"  # Flower's FedAvg writes this key itself
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx writes this key itself
TRAIN_LORA_A = "train-lora-a"  # false: A stays frozen at the shared init (FFA-LoRA)
UPLOAD_LORA_B = "upload-lora-b"  # false: B stays on the client (FedSA-LoRA)
ADAPTER_KEYS = "adapter-keys"  # SecAgg+: the agreed tensor order, a JSON list
LR_SCALE = "lr-scale"  # the factor the clients apply to their learning rate (the divergence guard's)

# -- a train report, client -> server (``metrics``); Flower weights its means by NUM_EXAMPLES
CLIENT_ID = "client-id"
NUM_EXAMPLES = "num-examples"
LORA_RANK = "lora-rank"
DECLINED = "declined"
TRAIN_LOSS = "train-loss"
TRAIN_LOSS_FIRST = "train-loss-first"
TRAIN_LOSS_LAST = "train-loss-last"
TRAIN_SECONDS = "train-seconds"
TRAIN_STEPS = "train-steps"
SAMPLES_SEEN = "samples-seen"
MODEL_LOADS = "model-loads"  # base-model loads in the client's process so far (1 = resident)
CLIENT_SECONDS = "client-seconds"  # all of the message's work on the client
PROCESS_MESSAGES = "process-messages"  # messages the client's process has handled so far
COMPUTE_DTYPE = "compute-dtype"  # the dtype the client's model.compute_dtype resolved to, by its code below
COMPUTE_DTYPE_CODES = ("float32", "bfloat16", "float16")  # a metric holds numbers only
EPSILON = "epsilon"
BUDGET_EXHAUSTED = "budget-exhausted"  # another round would not fit the client's privacy budget
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
MAX_GRAD_NORM = "max-grad-norm"
EPSILON_CENTRAL = "epsilon-central"  # central DP: the server's aggregate metric

# -- a node's config
PARTITION_ID = "partition-id"  # simulation: Flower's
NUM_PARTITIONS = "num-partitions"  # simulation: Flower's
DATA_PATH = "data-path"
STATE_DIR = "state-dir"
PROFILE = "profile"
DEVICE = "device"
RESIDENT_SOCKET = "resident-socket"
# ``client-id`` (CLIENT_ID) in a deployed node's config


class MessageError(FedslmError, ValueError):
    """A message record lacks a key fedslm needs, or holds a value of the wrong kind."""


def _require(record: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in record:
        raise MessageError(f"{what}: the record has no {key!r} key (it has {sorted(record)})")
    return record[key]


def _number(value: object, key: str, what: str) -> int | float:
    if isinstance(value, int | float):  # a bool is an int
        return value
    raise MessageError(f"{what}: {key!r} is a {type(value).__name__}, expected a number")


def _opt_int(record: Mapping[str, Any], key: str, what: str) -> int | None:
    return int(_number(record[key], key, what)) if key in record else None


def _opt_float(record: Mapping[str, Any], key: str, what: str) -> float | None:
    return float(_number(record[key], key, what)) if key in record else None


# ------------------------------------------------------------------------------------------------
# server -> client


@dataclass(frozen=True)
class LoRAPlan:
    """What the strategy asks of a client's LoRA training (the defaults: plain FedAvg)."""

    train_lora_a: bool = True  # false: A frozen at the shared init and never sent (FFA-LoRA)
    upload_lora_b: bool = True  # false: B kept on the client across rounds (FedSA-LoRA)
    proximal_mu: float = 0.0  # FedProx's mu/2 |w - w_global|^2 on the client's LoRA

    def uploads(self, names: Iterable[str]) -> list[str]:
        """The tensors among ``names`` that a client uploads, in their order: without B when B stays
        on the client, without A when A is frozen. The one upload rule (plain and SecAgg+ paths)."""
        return [
            k
            for k in names
            if not ("lora_B" in k and not self.upload_lora_b) and not ("lora_A" in k and not self.train_lora_a)
        ]

    def to_record(self) -> dict[str, bool | float]:
        """The keys that differ from the defaults (what a strategy adds to a train config)."""
        out: dict[str, bool | float] = {}
        if not self.train_lora_a:
            out[TRAIN_LORA_A] = False
        if not self.upload_lora_b:
            out[UPLOAD_LORA_B] = False
        if self.proximal_mu:
            out[PROXIMAL_MU] = self.proximal_mu
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LoRAPlan:
        what = "train instructions"
        return cls(
            train_lora_a=bool(record.get(TRAIN_LORA_A, True)),
            upload_lora_b=bool(record.get(UPLOAD_LORA_B, True)),
            proximal_mu=float(_number(record.get(PROXIMAL_MU, 0.0), PROXIMAL_MU, what)),
        )


@dataclass(frozen=True)
class TrainInstructions:
    """The ``config`` record of a train or evaluate message."""

    run_config: str  # the resolved run config, YAML
    run_name: str = "run"
    server_round: int = 0
    plan: LoRAPlan = field(default_factory=LoRAPlan)
    adapter_keys: str | None = None  # SecAgg+ only: the agreed tensor order, a JSON list
    lr_scale: float = 1.0  # lowered by the server's divergence guard after a rejected round

    def to_record(self) -> dict[str, Any]:
        """As a config mapping (a ``ConfigRecord``'s values; the legacy SecAgg+ path takes the dict).
        A round of 0 is not written (Flower's ``configure_train`` writes the round itself)."""
        out: dict[str, Any] = {RUN_CONFIG: self.run_config, RUN_NAME: self.run_name}
        if self.server_round:
            out[SERVER_ROUND] = self.server_round
        if self.adapter_keys is not None:
            out[ADAPTER_KEYS] = self.adapter_keys
        if self.lr_scale != 1.0:
            out[LR_SCALE] = self.lr_scale
        return {**out, **self.plan.to_record()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainInstructions:
        what = "train instructions"
        keys = record.get(ADAPTER_KEYS)
        return cls(
            run_config=str(_require(record, RUN_CONFIG, what)),
            run_name=str(record.get(RUN_NAME, "run")),
            server_round=int(_number(record.get(SERVER_ROUND, 0), SERVER_ROUND, what)),
            plan=LoRAPlan.from_record(record),
            adapter_keys=None if keys is None else str(keys),
            lr_scale=float(_number(record.get(LR_SCALE, 1.0), LR_SCALE, what)),
        )


# ------------------------------------------------------------------------------------------------
# client -> server


@dataclass(frozen=True)
class PrivacyReport:
    """A client's local DP after this round: cumulative epsilon and the parameters behind it."""

    epsilon: float
    budget_exhausted: bool = False  # the server stops sampling a client once another round would not fit
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    max_grad_norm: float | None = None

    def to_record(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {EPSILON: self.epsilon, BUDGET_EXHAUSTED: int(self.budget_exhausted)}
        for key, value in (
            (DELTA, self.delta),
            (NOISE_MULTIPLIER, self.noise_multiplier),
            (SAMPLE_RATE, self.sample_rate),
            (MAX_GRAD_NORM, self.max_grad_norm),
        ):
            if value is not None:
                out[key] = value
        return out

    def summary(self) -> dict[str, float]:
        """What the run's ``summary.json`` keeps per client."""
        rec = self.to_record()
        return {k: float(rec[k]) for k in (EPSILON, NOISE_MULTIPLIER, SAMPLE_RATE, DELTA) if k in rec}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PrivacyReport:
        what = "privacy report"
        return cls(
            epsilon=float(_number(_require(record, EPSILON, what), EPSILON, what)),
            budget_exhausted=bool(record.get(BUDGET_EXHAUSTED, 0)),
            delta=_opt_float(record, DELTA, what),
            noise_multiplier=_opt_float(record, NOISE_MULTIPLIER, what),
            sample_rate=_opt_float(record, SAMPLE_RATE, what),
            max_grad_norm=_opt_float(record, MAX_GRAD_NORM, what),
        )


@dataclass(frozen=True)
class TrainReport:
    """The ``metrics`` record of a train reply (a declined round too: then ``declined`` and no
    examples). Fields left ``None`` are not sent."""

    num_examples: int
    client_id: int | None = None
    lora_rank: int | None = None
    declined: bool = False
    privacy: PrivacyReport | None = None
    train_loss: float | None = None  # the mean over the round's steps
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    train_seconds: float | None = None  # in the optimizer steps
    train_steps: int | None = None
    samples_seen: int | None = None
    model_loads: int | None = None
    client_seconds: float | None = None
    process_messages: int | None = None
    compute_dtype: str | None = None  # what the client computed in (its own resolution of auto)

    _KEYS = (  # field -> key of the values sent as they are
        ("client_id", CLIENT_ID),
        ("lora_rank", LORA_RANK),
        ("num_examples", NUM_EXAMPLES),
        ("train_loss", TRAIN_LOSS),
        ("train_loss_first", TRAIN_LOSS_FIRST),
        ("train_loss_last", TRAIN_LOSS_LAST),
        ("train_seconds", TRAIN_SECONDS),
        ("train_steps", TRAIN_STEPS),
        ("samples_seen", SAMPLES_SEEN),
        ("model_loads", MODEL_LOADS),
        ("client_seconds", CLIENT_SECONDS),
        ("process_messages", PROCESS_MESSAGES),
    )
    _INTS = frozenset(
        {"client_id", "lora_rank", "num_examples", "train_steps", "samples_seen", "model_loads", "process_messages"}
    )

    def to_record(self) -> dict[str, float | int]:
        """As metric values (what a ``MetricRecord`` is built from)."""
        out: dict[str, float | int] = {}
        for name, key in self._KEYS:
            value = getattr(self, name)
            if value is not None:
                out[key] = value
        if self.declined:
            out[DECLINED] = 1
        if self.compute_dtype is not None:
            out[COMPUTE_DTYPE] = COMPUTE_DTYPE_CODES.index(self.compute_dtype)
        if self.privacy is not None:
            out.update(self.privacy.to_record())
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainReport:
        what = "train report"
        _require(record, NUM_EXAMPLES, what)
        values: dict[str, Any] = {
            name: (_opt_int if name in cls._INTS else _opt_float)(record, key, what) for name, key in cls._KEYS
        }
        code = _opt_int(record, COMPUTE_DTYPE, what)
        if code is not None and not 0 <= code < len(COMPUTE_DTYPE_CODES):
            raise MessageError(f"{what}: {COMPUTE_DTYPE} {code} is not one of 0-{len(COMPUTE_DTYPE_CODES) - 1}")
        return cls(
            **values,
            declined=bool(record.get(DECLINED, 0)),
            privacy=PrivacyReport.from_record(record) if EPSILON in record else None,
            compute_dtype=None if code is None else COMPUTE_DTYPE_CODES[code],
        )


# ------------------------------------------------------------------------------------------------
# a node


@dataclass(frozen=True)
class NodeConfig:
    """A node's config. A simulated node has Flower's ``partition-id``/``num-partitions``; a deployed
    node (``fedslm node``) has ``client-id``, its own ``data-path``, ``state-dir`` and so on."""

    partition_id: int | None = None
    num_partitions: int | None = None
    client_id: int | None = None
    data_path: str = ""  # all of this file is the node's private data
    state_dir: str = ""  # DP accountant history, FedSA's local B ("" = under the model cache)
    profile: str = ""  # one of the run config's clients.profiles ("" = the one the run assigns)
    device: str = ""  # the node's own model.device ("" = the run config's)
    resident_socket: str = ""  # the node's resident worker ("" = none)

    _KEYS = (
        ("partition_id", PARTITION_ID),
        ("num_partitions", NUM_PARTITIONS),
        ("client_id", CLIENT_ID),
        ("data_path", DATA_PATH),
        ("state_dir", STATE_DIR),
        ("profile", PROFILE),
        ("device", DEVICE),
        ("resident_socket", RESIDENT_SOCKET),
    )

    @property
    def client(self) -> int:
        """This node's client id: its simulation partition, else its ``client-id``, else 0."""
        for value in (self.partition_id, self.client_id):
            if value is not None:
                return value
        return 0

    def to_record(self) -> dict[str, str | int]:
        """The values set (what ``flower-supernode --node-config`` is given)."""
        out: dict[str, str | int] = {}
        for name, key in self._KEYS:
            value = getattr(self, name)
            if value is not None and value != "":
                out[key] = value
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> NodeConfig:
        what = "node config"
        ints: dict[str, Any] = {name: _opt_int(record, key, what) for name, key in cls._KEYS[:3]}  # ids, count
        strs: dict[str, Any] = {name: str(record.get(key, "")) for name, key in cls._KEYS[3:]}
        return cls(**ints, **strs)


def node_client_id(node_config: Mapping[str, Any]) -> int:
    """A node's client id: its simulation partition, or ``client-id`` in a deployed node's config."""
    return NodeConfig.from_record(node_config).client
