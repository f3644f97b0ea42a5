"""Run configuration: one dataclass per YAML section, validated once at load.

Every field has a default, a one-line ``help`` and its checks in ``__post_init__``. YAML is turned
into these by :func:`load_config`, which names the file, the key and what is allowed on any error.
Nothing deeper in the code reads raw dicts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .errors import FedslmError


class ConfigError(FedslmError, ValueError):
    """A run configuration is invalid. The message names the file, the key and what is allowed."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors dataclasses' "help" metadata
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")  # model.device (fedslm.hardware resolves it)
Quantization = Literal["nf4", "int8", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class ModelConfig:
    name: str = _f(
        "smollm2-135m-instruct",
        "base model: 'smollm2-135m-instruct' (bundled GGUF), a hub id, a local dir, or 'tiny-<family>'",
    )
    quantization: Quantization = _f("nf4", "quantization of the frozen base: nf4 | int8 | none")
    compute_dtype: DType = _f(
        "auto", "dtype of activations and of an unquantized base; auto = bf16 only where the hardware has it natively"
    )
    device: str = _f("auto", "where this node trains and evaluates: auto (CUDA when available) | cpu | cuda | cuda:N")
    cache_dir: str = _f("", "where converted models are cached (default: $FEDSLM_CACHE or ~/.cache/fedslm)")
    max_length: int = _f(128, "tokens per training sequence (prompt + answer), longer ones are cut")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (DP-SGD too)")
    head_init: Literal["auto", "labels", "random"] = _f(
        "auto",
        "classification head of a decoder: labels = the chat prompt in, each class's row the output embedding"
        " of its name's first token (the model's own zero-shot answer among the classes); random = a new head"
        " on the raw text; auto = labels for a decoder, random for an encoder (BERT)",
    )

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must not be empty")
        _check(16 <= self.max_length <= 8192, "model.max_length", f"{self.max_length} not in [16, 8192]")
        _check(
            bool(DEVICE_PATTERN.match(self.device)),
            "model.device",
            f"{self.device!r} not one of auto | cpu | cuda | cuda:N",
        )


@dataclass
class LoRAConfig:
    r: int = _f(8, "LoRA rank")
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the LoRA input; 0 keeps DP-SGD per-sample grads exact")
    target_modules: list[str] = _f([], "module names to adapt; empty = per-architecture default")
    last_layers: int = _f(
        0,
        "adapt the target modules of the last N transformer layers only (0 = every layer): the backward pass"
        " stops at the lowest adapted layer, and fewer trainable parameters carry less DP noise",
    )
    init_seed: int = _f(0, "seed of the shared initial adapter (all clients start from it)")

    def __post_init__(self) -> None:
        _check(1 <= self.r <= 512, "lora.r", f"{self.r} not in [1, 512]")
        _check(self.alpha > 0, "lora.alpha", f"{self.alpha} must be > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"{self.dropout} not in [0, 1)")
        _check(self.last_layers >= 0, "lora.last_layers", f"{self.last_layers} must be >= 0 (0 = every layer)")


@dataclass
class DataConfig:
    source: str = _f("triage", "'triage' (bundled, generated) or a path to .jsonl/.csv/.parquet, or a hub dataset")
    prompt_column: str = _f("question", "column holding the instruction / question")
    response_column: str = _f("answer", "column holding the expected answer")
    label_column: str = _f("specialty", "column used by the dirichlet partitioner")
    client_column: str = _f("hospital", "column used by the natural partitioner")
    partitioner: Literal["natural", "iid", "dirichlet"] = _f(
        "natural", "how records are split over clients: natural (client column) | iid | dirichlet"
    )
    dirichlet_alpha: float = _f(0.5, "concentration of the dirichlet partitioner; small = more skewed")
    num_records: int = _f(1200, "records generated for the bundled triage data (train + test)")
    test_fraction: float = _f(0.1, "held-out global test split that no client sees")
    eval_size: int = _f(
        48, "records used by each evaluation: the central test sample and each client's validation (0 = all)"
    )
    seed: int = _f(0, "seed of generation, splitting and partitioning")
    system_prompt: str = _f("Answer with the department only.", "system message of the chat template (empty = none)")
    labels: list[str] = _f([], "classification: the class names in order (empty = sorted values of label_column)")

    def __post_init__(self) -> None:
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _check(0.0 < self.test_fraction < 0.9, "data.test_fraction", f"{self.test_fraction} not in (0, 0.9)")
        _check(self.num_records >= 20, "data.num_records", "must be >= 20")
        _check(self.eval_size >= 0, "data.eval_size", "must be >= 0")


@dataclass
class TrainConfig:
    local_steps: int = _f(10, "optimizer steps per client per round")
    batch_size: int = _f(4, "sequences per step (expected batch under Poisson sampling)")
    learning_rate: float = _f(2e-3, "learning rate of the LoRA parameters")
    optimizer: Literal["adamw", "sgd"] = _f(
        "adamw", "local optimizer: adamw | sgd (with train.momentum); under DP Opacus wraps it"
    )
    momentum: float = _f(0.9, "SGD momentum (train.optimizer sgd); the buffer starts at zero every round")
    weight_decay: float = _f(0.0, "weight decay (AdamW: decoupled; SGD: L2 added to the gradient)")
    seed: int = _f(0, "seed of local shuffling and dropout (mixed with client id and round)")
    length_bucketing: bool = _f(False, "batch records of similar length (less padding); not with local DP")
    max_grad_norm: float = _f(
        1.0, "non-private training: clip each step's gradient to this L2 norm (0 = off); DP uses privacy.max_grad_norm"
    )
    head: Literal["auto", "train", "frozen"] = _f(
        "auto",
        "classification head: train it with the adapter, or keep it frozen as it started (it still travels);"
        " auto = frozen where model.head_init gives the class names' embeddings, trained where it is random",
    )
    warmup_steps: int = _f(0, "linear learning-rate warm-up over the first local steps of every round (0 = none)")
    lr_schedule: Literal["constant", "cosine"] = _f(
        "constant", "learning rate across rounds: constant | cosine (down to a tenth in the last round)"
    )
    physical_batch_size: int = _f(
        0, "most sequences per forward/backward (memory); a larger logical batch is accumulated (0 = no split)"
    )

    def __post_init__(self) -> None:
        _check(self.local_steps >= 1, "train.local_steps", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(0 < self.learning_rate < 1, "train.learning_rate", f"{self.learning_rate} not in (0, 1)")
        _check(0 <= self.momentum < 1, "train.momentum", f"{self.momentum} not in [0, 1)")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = off)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.physical_batch_size >= 0, "train.physical_batch_size", "must be >= 0 (0 = no split)")


@dataclass
class PrivacyConfig:
    mode: Literal["none", "local", "central", "both"] = _f(
        "none", "none | local (DP-SGD per client) | central (server clips+noises) | both"
    )
    target_epsilon: float = _f(8.0, "local DP budget for the WHOLE run, per client")
    delta: float = _f(1e-5, "local DP delta; must be below 1/records of the smallest client")
    max_grad_norm: float = _f(1.0, "per-sample gradient clipping norm (local DP)")
    accountant: Literal["pld", "rdp", "prv"] = _f(
        "pld", "accountant for noise calibration and reporting: pld (tightest valid bound) | rdp | prv"
    )
    max_noise_multiplier: float = _f(
        50.0, "the most noise calibration may choose; a budget that needs more is refused at check"
    )
    secure_mode: bool = _f(
        False,
        "batches and noise seeded from the OS's entropy, not the run's seed, and Opacus' noise robust to"
        " floating-point attacks (not reproducible; for production)",
    )
    central_noise_multiplier: float = _f(1.0, "central DP: noise std / clipping norm")
    central_clipping_norm: float = _f(1.0, "central DP: L2 bound of each client's adapter update")
    central_delta: float = _f(1e-3, "central (client-level) DP delta")

    def __post_init__(self) -> None:
        _check(self.target_epsilon > 0, "privacy.target_epsilon", "must be > 0")
        _check(0 < self.delta < 1, "privacy.delta", f"{self.delta} not in (0, 1)")
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        _check(self.max_noise_multiplier > 0, "privacy.max_noise_multiplier", "must be > 0")
        _check(self.central_noise_multiplier >= 0, "privacy.central_noise_multiplier", "must be >= 0")
        _check(self.central_clipping_norm > 0, "privacy.central_clipping_norm", "must be > 0")
        _check(0 < self.central_delta < 1, "privacy.central_delta", "not in (0, 1)")

    @property
    def local(self) -> bool:
        return self.mode in ("local", "both")

    @property
    def central(self) -> bool:
        return self.mode in ("central", "both")


@dataclass
class FederationConfig:
    num_clients: int = _f(4, "simulated clients (supernodes)")
    num_rounds: int = _f(3, "federated rounds")
    fraction_train: float = _f(1.0, "fraction of clients sampled per round")
    min_train_clients: int = _f(2, "a round needs at least this many replies, else it is skipped")
    round_timeout_s: float = _f(3600.0, "seconds to wait for replies in a round")
    seed: int = _f(0, "seed of client sampling")
    divergence_factor: float = _f(
        1.5,
        "reject a round whose central eval loss exceeds this multiple of the best so far (or whose adapter is"
        " not finite): the previous adapter is kept and the learning rate halved from then on (0 = loss test off)",
    )
    accuracy_drop: float = _f(
        0.02,
        "reject a round whose central accuracy falls more than this below the best so far, as a diverged one"
        " (an overshoot can lower accuracy while the loss still falls); 1 = accuracy test off",
    )
    client_cpus: float = _f(2.0, "CPUs reserved per simulated client (2 = one client at a time on 2 cores)")
    client_gpus: float | Literal["auto"] = _f(
        "auto",
        "GPU share per simulated client (0.25 = four clients on one GPU); auto = 0 on a CPU, else the GPUs"
        " split among the clients that train at once",
    )
    ray_address: str = _f("", "attach the simulation to a running Ray cluster at host:port (empty = start one here)")
    backend: Literal["auto", "ray", "inprocess"] = _f(
        "auto",
        "what runs the simulated clients: ray (Flower's engine, a worker process per client_cpus) | inprocess"
        " (one after another in this process, sharing its model: no worker start-up) | auto (inprocess where"
        " only one client would train at a time on this machine, else ray)",
    )

    def __post_init__(self) -> None:
        _check(self.num_clients >= 1, "federation.num_clients", "must be >= 1")
        _check(self.num_rounds >= 1, "federation.num_rounds", "must be >= 1")
        _check(self.divergence_factor >= 0, "federation.divergence_factor", "must be >= 0 (0 = off)")
        _check(0 <= self.accuracy_drop <= 1, "federation.accuracy_drop", f"{self.accuracy_drop} not in [0, 1]")
        _check(0 < self.fraction_train <= 1, "federation.fraction_train", "not in (0, 1]")
        _check(
            1 <= self.min_train_clients <= self.num_clients,
            "federation.min_train_clients",
            f"{self.min_train_clients} not in [1, num_clients={self.num_clients}]",
        )
        _check(self.client_cpus > 0, "federation.client_cpus", f"{self.client_cpus} must be > 0")
        if self.client_gpus != "auto":
            _check(0 <= self.client_gpus <= 1, "federation.client_gpus", f"{self.client_gpus} not in [0, 1] (or auto)")
        if self.ray_address:
            host, _, port = self.ray_address.rpartition(":")
            _check(
                bool(host) and port.isdigit(),
                "federation.ray_address",
                f"{self.ray_address!r} is not host:port (e.g. 127.0.0.1:6379)",
            )
        if self.backend == "inprocess":
            _check(not self.ray_address, "federation.backend", "inprocess runs no Ray: clear federation.ray_address")
            _check(
                self.client_gpus in ("auto", 0),
                "federation.backend",
                f"inprocess clients use model.device whole: clear federation.client_gpus ({self.client_gpus})",
            )

    @property
    def clients_per_round(self) -> int:
        return max(self.min_train_clients, int(self.num_clients * self.fraction_train))

    def clients_at_once(self, cpus: float) -> int:
        """How many simulated clients train at the same time on ``cpus`` CPUs (Ray packs by ``client_cpus``)."""
        return max(1, min(self.clients_per_round, int(cpus // self.client_cpus)))

    def resolve_backend(self, cpus: float) -> Literal["ray", "inprocess"]:
        """``backend`` with ``auto`` resolved: Ray for a cluster or where clients train at the same time on
        ``cpus`` CPUs (an explicit GPU share counts as asking for it), else in this process."""
        if self.backend != "auto":
            return self.backend
        together = self.clients_at_once(cpus) > 1 or self.client_gpus not in ("auto", 0)
        return "ray" if self.ray_address or together else "inprocess"


@dataclass
class EvalConfig:
    every: int = _f(1, "central evaluation every N rounds (round 0 = base adapter is always evaluated)")
    max_new_tokens: int = _f(8, "tokens generated for exact-match accuracy")
    batch_size: int = _f(16, "evaluation batch size")
    per_client: bool | Literal["last"] = _f(
        False,
        "also evaluate the global adapter on each client's own validation split: every evaluated round"
        " (true), after the last round only (last: one pass instead of one a round), or never (false)",
    )

    def __post_init__(self) -> None:
        _check(self.every >= 1, "eval.every", "must be >= 1")
        _check(1 <= self.max_new_tokens <= 256, "eval.max_new_tokens", "not in [1, 256]")


WireDType = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class CommunicationConfig:
    dtype: WireDType = _f("bfloat16", "dtype adapters travel in, both ways (LoRA loses nothing visible in bf16)")
    quantize_delta: bool = _f(False, "uplink: send the update as an int8 delta (per-row scale), error feedback")
    topk: float = _f(0.0, "uplink: keep only this fraction of the delta's largest entries (0 = off), error feedback")

    def __post_init__(self) -> None:
        _check(0.0 <= self.topk < 1.0, "communication.topk", f"{self.topk} not in [0, 1)")

    @property
    def compresses_delta(self) -> bool:
        return self.quantize_delta or self.topk > 0


SECAGG_MODULUS_RANGE = 2**32  # Flower's SecAgg+ mask range: sums of quantized updates wrap at this


@dataclass
class SecurityConfig:
    max_update_mb: float = _f(64.0, "a client update larger than this (MB on the wire) is rejected")
    update_norm_bound: float = _f(0.0, "reject an update farther than this (L2) from the global adapter (0 = off)")
    secure_aggregation: Literal["none", "secagg+"] = _f(
        "none", "none | secagg+ (Flower's SecAgg+: the server only ever sees the sum of the masked updates)"
    )
    secagg_num_shares: int | float = _f(
        3, "SecAgg+: shares of each client's mask keys: a count (>= 3) or a fraction (0, 1] of the sampled clients"
    )
    secagg_reconstruction_threshold: int | float = _f(
        2, "SecAgg+: shares needed to unmask a client: a count (>= 2, < num_shares) or a fraction (0, 1] of them"
    )
    secagg_max_weight: float = _f(1000.0, "SecAgg+: largest num-examples of one client (its weight is n / this)")
    secagg_clipping_range: float = _f(8.0, "SecAgg+: each weighted value is clipped to [-this, this] before quantizing")
    secagg_quantization_range: int = _f(
        2**22, "SecAgg+: values are quantized to integers in [0, this); step 2 * clipping_range / this"
    )

    def __post_init__(self) -> None:
        _check(self.max_update_mb > 0, "security.max_update_mb", "must be > 0")
        _check(self.update_norm_bound >= 0, "security.update_norm_bound", "must be >= 0 (0 = off)")
        n, t = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if isinstance(n, int):
            _check(n >= 3, "security.secagg_num_shares", f"{n}: a count must be >= 3 (or a fraction in (0, 1])")
        else:
            _check(0 < n <= 1, "security.secagg_num_shares", f"{n}: a fraction must be in (0, 1] (or a count >= 3)")
        if isinstance(t, int):
            _check(t >= 2, "security.secagg_reconstruction_threshold", f"{t}: a count must be >= 2")
            _check(
                not isinstance(n, int) or t < n,
                "security.secagg_reconstruction_threshold",
                f"{t} must be < secagg_num_shares={n} (a client's mask keys must survive one missing share)",
            )
        else:
            _check(0 < t <= 1, "security.secagg_reconstruction_threshold", f"{t}: a fraction must be in (0, 1]")
        _check(self.secagg_max_weight > 0, "security.secagg_max_weight", "must be > 0")
        _check(self.secagg_clipping_range > 0, "security.secagg_clipping_range", "must be > 0")
        _check(
            2 <= self.secagg_quantization_range < SECAGG_MODULUS_RANGE,
            "security.secagg_quantization_range",
            f"{self.secagg_quantization_range} not in [2, 2**32)",
        )

    @property
    def secure(self) -> bool:
        return self.secure_aggregation != "none"


@dataclass
class ClientProfile:
    rank: int = _f(0, "LoRA rank this client trains (0 = lora.r); at most lora.r, the global adapter's rank")
    quantization: Literal["", "nf4", "int8", "none"] = _f(
        "", "quantization of its frozen base ('' = model.quantization)"
    )
    local_steps: int = _f(0, "optimizer steps per round (0 = train.local_steps)")
    batch_size: int = _f(0, "sequences per step (0 = train.batch_size)")
    gradient_checkpointing: bool = _f(
        False, "recompute activations in backward on this client (true = on; false = model.gradient_checkpointing)"
    )

    def __post_init__(self) -> None:
        _check(0 <= self.rank <= 512, "rank", f"{self.rank} not in [0, 512] (0 = lora.r)")
        _check(self.local_steps >= 0, "local_steps", "must be >= 0 (0 = train.local_steps)")
        _check(self.batch_size >= 0, "batch_size", "must be >= 0 (0 = train.batch_size)")


@dataclass
class ClientsConfig:
    profiles: dict[str, ClientProfile] = _f({}, "named client profiles (phone, hospital ...); empty = all alike")
    mix: dict[str, float] = _f(
        {}, "profile -> share of the clients: fractions summing to 1, or counts summing to federation.num_clients"
    )
    seed: int = _f(0, "seed of the deterministic assignment of client ids to profiles")

    def __post_init__(self) -> None:
        for name, share in self.mix.items():
            _check(
                name in self.profiles,
                f"clients.mix.{name}",
                f"unknown profile; valid profiles are {sorted(self.profiles)}",
            )
            _check(share >= 0, f"clients.mix.{name}", f"{share} must be >= 0")
        _check(
            not self.profiles or sum(self.mix.values()) > 0,
            "clients.mix",
            f"give each profile a share of the clients, e.g. {{{', '.join(f'{n}: 1' for n in self.profiles)}}}",
        )


@dataclass
class StrategyConfig:
    name: str = _f("fedavg", "aggregation strategy (see `fedslm strategies`)")
    params: dict[str, Any] = _f({}, "keyword arguments of the strategy, checked against its signature")


# canaries (records) per client: at most this fraction of the smallest client's training records,
# so that the audit does not change the task it measures
AUDIT_MAX_FRACTION = 0.1


@dataclass
class AuditConfig:
    enabled: bool = _f(False, "insert canaries into client training data and score them after the last round")
    canaries: int = _f(100, "m: canary records made from the run seed; each is a member with probability 1/2")
    repeats: int = _f(1, "copies of each member canary in its client's training data")
    guess_fraction: float = _f(0.2, "share of canaries guessed (half member, half non-member); others abstain")
    candidates: int = _f(100, "random secrets of the same format each canary is ranked among (exposure)")
    exposure_canaries: int = _f(
        16,
        "canaries (the first ones: about half members) whose exposure is measured, each with its candidates"
        " (candidates + 1 answers to score); all canaries get the loss scores behind AUC, TPR and epsilon",
    )
    score: Literal["loss", "relative"] = _f(
        "loss",
        "membership score behind AUC, TPR and the epsilon bound: loss = the canary's loss under the global"
        " model (lower: member), relative = its loss under the base model minus that (both are reported)",
    )
    confidence: float = _f(0.95, "confidence of the empirical epsilon lower bound")
    client_canaries: int = _f(
        0,
        "central DP: canary clients whose updates (unit random directions, norm = the clipping norm) the"
        " server adds to every round's aggregate, for a client-level epsilon estimate (0 = off); few"
        " against the clients per round, or they move the model",
    )

    def __post_init__(self) -> None:
        _check(self.canaries >= 2, "audit.canaries", f"{self.canaries} must be >= 2")
        _check(self.repeats >= 1, "audit.repeats", f"{self.repeats} must be >= 1")
        _check(0 < self.guess_fraction <= 1, "audit.guess_fraction", f"{self.guess_fraction} not in (0, 1]")
        _check(self.candidates >= 1, "audit.candidates", f"{self.candidates} must be >= 1")
        _check(self.exposure_canaries >= 0, "audit.exposure_canaries", f"{self.exposure_canaries} must be >= 0")
        _check(0.5 <= self.confidence < 1, "audit.confidence", f"{self.confidence} not in [0.5, 1)")
        _check(self.client_canaries >= 0, "audit.client_canaries", f"{self.client_canaries} must be >= 0")


@dataclass
class RunConfig:
    model: ModelConfig = _f(None, "base model and its quantization")
    lora: LoRAConfig = _f(None, "LoRA adapter")
    data: DataConfig = _f(None, "dataset and partitioning")
    train: TrainConfig = _f(None, "local training on each client")
    privacy: PrivacyConfig = _f(None, "differential privacy")
    federation: FederationConfig = _f(None, "clients and rounds")
    eval: EvalConfig = _f(None, "central evaluation")
    strategy: StrategyConfig = _f(None, "aggregation strategy")
    communication: CommunicationConfig = _f(None, "how adapters travel (dtype, compressed updates)")
    security: SecurityConfig = _f(None, "checks every client update passes before aggregation")
    clients: ClientsConfig = _f(None, "heterogeneous clients: profiles (rank, steps, batch) and their mix")
    audit: AuditConfig = _f(None, "privacy audit: canaries, their scores and an empirical epsilon lower bound")
    seed: int = _f(0, "master seed, recorded in the run")
    task: Literal["causal-lm", "classification"] = _f(
        "causal-lm", "causal-lm (instruction tuning, answers generated) | classification (label of a text)"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.name in _SECTIONS:
                setattr(self, f.name, _SECTIONS[f.name]())
        _check(
            not (self.train.length_bucketing and self.privacy.local),
            "train.length_bucketing",
            "cannot be combined with privacy.mode local/both: DP-SGD's Poisson sampling must pick every"
            " record independently of its length; set it to false",
        )
        _check_profiles(self)
        _check_audit(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoRAConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "federation": FederationConfig,
    "eval": EvalConfig,
    "strategy": StrategyConfig,
    "communication": CommunicationConfig,
    "security": SecurityConfig,
    "clients": ClientsConfig,
    "audit": AuditConfig,
}


def _check_audit(cfg: RunConfig) -> None:
    """Canaries need a causal-LM task and the normal (not SecAgg+) server, which scores them. Their cap
    (:data:`AUDIT_MAX_FRACTION` of each client's training records) is checked client by client in the
    preflight, which knows the partitions: :func:`fedslm.audit.check_canary_cap`."""
    a = cfg.audit
    if not a.enabled:
        return
    _check(
        cfg.task == "causal-lm",
        "audit.enabled",
        "canaries are question/answer secrets scored by the answer's loss; a classification task has no"
        " answer text to memorise: set audit.enabled: false, or task: causal-lm",
    )
    _check(
        not cfg.security.secure,
        "audit.enabled",
        f"is not supported with security.secure_aggregation {cfg.security.secure_aggregation!r} (the SecAgg+"
        " workflow does not score canaries): set audit.enabled: false, or security.secure_aggregation: none",
    )
    _check(
        a.client_canaries == 0 or cfg.privacy.central,
        "audit.client_canaries",
        f"{a.client_canaries} canary clients audit central DP: set privacy.mode central or both, or 0",
    )


# ------------------------------------------------------------------------------------------------
# YAML -> dataclasses


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (types.UnionType, typing.Union):
        return " | ".join(_type_name(arm) for arm in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        _check(value in allowed, key, f"{value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if tp is Any:
        return value
    if tp is type(None):
        _check(value is None, key, f"expected null, got {type(value).__name__} {value!r}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__} {value!r}")
        (inner,) = get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        _, inner = get_args(tp) or (str, Any)
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, f"{key}.")  # type: ignore[arg-type]
    if origin in (types.UnionType, typing.Union):
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the type annotation ``tp`` (as YAML is): :class:`ConfigError` naming
    ``key``, the type allowed and the value given. Used for strategy parameters (their signature)."""
    return _coerce(value, tp, key)


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys of {prefix.rstrip('.') or 'the top level'}"
            f" are {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name in _SECTIONS and cls is RunConfig:
            if value is None:
                value = {}
            _check(isinstance(value, dict), key, "expected a mapping (a YAML section)")
            kwargs[name] = _build(_SECTIONS[name], value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(prefix) or not prefix else f"{prefix}{msg}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.local_steps=5")
    key, _, text = item.partition("=")
    return key.strip().split("."), yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`; errors name ``source`` and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        cfg = _build(RunConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config, section by section (the whole run:
    :func:`fedslm.server.preflight.validate_run`)."""
    path = Path(path)
    raw = apply_overrides(_read_yaml(path, seen=()), overrides or [])
    return config_from_dict(raw, str(path))


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is merged under it."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: base: {base} includes itself")
    return _deep_merge(_read_yaml(base_path, (*seen, base_path)), raw)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if key == "strategy" or not (isinstance(value, dict) and isinstance(out.get(key), dict)):
            out[key] = value  # a strategy section replaces the base's whole (params belong to a name)
        else:
            out[key] = _deep_merge(out[key], value)
    return out


# ------------------------------------------------------------------------------------------------
# heterogeneous clients: which profile each client id has, and what it trains


def _check_profiles(cfg: RunConfig) -> None:
    """Cross-section checks of ``clients``: ranks within the global adapter, shares that add up."""
    c = cfg.clients
    for name, prof in c.profiles.items():
        _check(
            prof.rank <= cfg.lora.r,
            f"clients.profiles.{name}.rank",
            f"{prof.rank} > lora.r={cfg.lora.r}; lora.r is the global adapter's rank: make it the largest profile rank",
        )
    if not c.mix:
        return
    total = sum(c.mix.values())
    counts = all(float(v).is_integer() for v in c.mix.values()) and round(total) == cfg.federation.num_clients
    _check(
        counts or abs(total - 1.0) < 1e-6,
        "clients.mix",
        f"shares sum to {total:g}; give fractions summing to 1 or counts summing to"
        f" federation.num_clients={cfg.federation.num_clients}",
    )


def profile_counts(cfg: RunConfig) -> dict[str, int]:
    """Clients per profile (largest remainder; ties by name), summing to ``federation.num_clients``."""
    n = cfg.federation.num_clients
    mix = cfg.clients.mix
    total = sum(mix.values())
    exact = {name: mix[name] * n / total for name in sorted(mix)}
    counts = {name: int(v) for name, v in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def assign_profiles(cfg: RunConfig) -> list[str]:
    """The profile name of each client id ``0 .. num_clients-1`` (empty list without profiles):
    :func:`profile_counts` of each, in an order shuffled by ``clients.seed`` (deterministic)."""
    import random

    if not cfg.clients.mix:
        return []
    names = [name for name, k in profile_counts(cfg).items() for _ in range(k)]
    random.Random(cfg.clients.seed).shuffle(names)
    return names


def resolved_profile(cfg: RunConfig, name: str) -> ClientProfile:
    """Profile ``name`` with its zeros / blanks filled from ``lora``, ``model`` and ``train``."""
    if name not in cfg.clients.profiles:
        raise ConfigError(f"unknown client profile {name!r}; valid profiles are {sorted(cfg.clients.profiles)}")
    p = cfg.clients.profiles[name]
    return ClientProfile(
        rank=p.rank or cfg.lora.r,
        quantization=p.quantization or cfg.model.quantization,
        local_steps=p.local_steps or cfg.train.local_steps,
        batch_size=p.batch_size or cfg.train.batch_size,
        gradient_checkpointing=p.gradient_checkpointing or cfg.model.gradient_checkpointing,
    )


def profile_ranks(cfg: RunConfig) -> dict[str, int]:
    """LoRA rank of every profile in use (share > 0); empty without profiles."""
    return {name: resolved_profile(cfg, name).rank for name, share in cfg.clients.mix.items() if share > 0}


def client_profile(cfg: RunConfig, client_id: int, name: str = "") -> tuple[str, ClientProfile]:
    """(profile name, resolved profile) of a client: ``name`` if given (a real node may set its own
    ``profile`` in its node config), else its assigned one. Without profiles: ("", the run's settings)."""
    if not name:
        names = assign_profiles(cfg)
        if not names:
            m = cfg.model
            return "", ClientProfile(
                cfg.lora.r, m.quantization, cfg.train.local_steps, cfg.train.batch_size, m.gradient_checkpointing
            )
        if not 0 <= client_id < len(names):
            raise ConfigError(
                f"client id {client_id} is outside federation.num_clients={len(names)}, so it has no profile;"
                " set `profile` in its node config"
            )
        name = names[client_id]
    return name, resolved_profile(cfg, name)


def apply_profile(cfg: RunConfig, profile: ClientProfile) -> RunConfig:
    """``cfg`` as the client runs it: the profile's quantization, checkpointing, local steps and
    batch size (its rank is passed to the LoRA model separately: ``lora.r`` stays the global
    adapter's rank)."""
    model = dataclasses.replace(
        cfg.model,
        quantization=typing.cast(Quantization, profile.quantization),
        gradient_checkpointing=profile.gradient_checkpointing,
    )
    return dataclasses.replace(
        cfg,
        model=model,
        train=dataclasses.replace(cfg.train, local_steps=profile.local_steps, batch_size=profile.batch_size),
    )
