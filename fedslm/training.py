"""Local training (plain or DP-SGD) and evaluation of a LoRA model.

DP-SGD uses Opacus' ``GradSampleModule`` and ``DPOptimizer`` directly, and its batches come from
Opacus' Poisson sampler (``UniformWithReplacementSampler``): each step draws every record
independently with probability ``q``, so the batch size varies and may be empty (an empty batch
still takes a noise-only step, as the analysis assumes). The loss is per sequence (token mean
within a sequence, mean over the batch), not HF's token mean over the batch, so each record's
contribution is one clipped per-sample gradient. Training and evaluation read their losses from one
forward pass, :func:`forward_losses`. The privacy accounting lives in :mod:`fedslm.privacy`; this
module only reports the steps and sampling rate it used.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE, collate
from .errors import FedslmError
from .logs import get_logger

log = get_logger(__name__)


class TrainingError(FedslmError, RuntimeError):
    """Training produced something unusable (non-finite loss, LoRA weights that never move)."""


@dataclass
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    secure_mode: bool = False


@dataclass
class LocalTraining:
    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (train.optimizer)
    momentum: float = 0.9  # SGD momentum; its buffer starts at zero every call
    seed: int = 0
    proximal_mu: float = 0.0
    train_lora_a: bool = True
    train_head: bool = True  # false: a classification head (PEFT's modules_to_save) stays as it came
    dp: DPSettings | None = None
    length_bucketing: bool = False  # batches of similar lengths (less padding); never under DP
    physical_batch_size: int = 0  # most sequences per forward/backward; a larger logical batch is accumulated
    max_grad_norm: float = 0.0  # without DP: clip the batch gradient's L2 norm (0 = off); DP clips per sample
    warmup_steps: int = 0  # linear learning-rate warm-up over the first local steps (the optimizer restarts each call)


@dataclass
class TrainResult:
    steps: int
    num_examples: int
    loss_first: float
    loss_last: float
    loss_mean: float
    seconds: float
    samples_seen: int
    empty_batches: int = 0
    losses: list[float] = field(default_factory=list)
    micro_batches: int = 0  # forward/backward passes (= steps less empty batches without physical_batch_size)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean NLL over answer tokens (shape ``(batch,)``)."""
    return _per_sequence(logits[:, :-1], labels[:, 1:])


def _token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Token NLL ``(batch, positions)`` of aligned logits and targets (0 where the target is ignored)."""
    return F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")


def _per_sequence(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _masked_mean(_token_nll(logits, target), (target != IGNORE).float())


def _masked_mean(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose logits predict an answer token in any row (logit ``t`` predicts
    token ``t + 1``): the only logits a causal-LM loss needs. Prompts are long and answers short,
    so the vocabulary projection and its softmax shrink several-fold (time and peak memory)."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().flatten()


def sequence_losses_at(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """:func:`sequence_losses` from the logits at ``keep`` only (``logits`` is ``(batch, len(keep), V)``)."""
    return _per_sequence(logits, labels[:, keep + 1])


def answer_logits(
    model: Any, batch: dict[str, torch.Tensor], keep_logits: bool, past: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits and their aligned targets, ``(batch, positions, V)`` and ``(batch, positions)``.

    With ``keep_logits`` only the positions that predict an answer token are projected onto the
    vocabulary (a fraction of the work); otherwise every position but the last. ``past``: a key/value
    cache of tokens before ``input_ids`` (the attention mask then covers the cached tokens too).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if past is not None:
        inputs[cache_keyword(model)] = past
    labels = batch["labels"]
    if keep_logits:
        keep = answer_positions(labels)
        return model(**inputs, logits_to_keep=keep).logits, labels[:, keep + 1]
    return model(**inputs).logits[:, :-1], labels[:, 1:]


@dataclass(frozen=True)
class BatchLoss:
    """One forward pass over a collated batch, and the loss terms training and evaluation read.

    A causal LM: the logits at the answer positions, their token NLL ``(batch, positions)`` (0 where
    the target is ignored), the mask of counted tokens and the target tokens. A classifier: its
    logits, its class cross-entropy as one counted "token" per example, and the classes.
    """

    logits: torch.Tensor
    nll: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor

    def argmax_hits(self) -> torch.Tensor:
        """Per causal-LM sequence: whether every counted position's argmax is its target token, i.e.
        whether greedy decoding, fed this prompt, would produce exactly these answer tokens."""
        return ((self.logits.argmax(-1) == self.target) | (self.mask == 0)).all(-1)

    def first_argmax(self) -> torch.Tensor:
        """Per causal-LM sequence: the argmax token at its first counted position, i.e. the first token
        greedy decoding emits after this prompt (-1 where no position is counted)."""
        counted = self.mask > 0
        first = counted.int().argmax(-1)  # the first counted position (argmax returns the first maximum)
        token = self.logits.argmax(-1).gather(1, first[:, None])[:, 0]
        return torch.where(counted.any(-1), token, -1)

    def per_example(self) -> torch.Tensor:
        """Training's loss terms: the token mean within each sequence (a classifier: its cross-entropy)."""
        return _masked_mean(self.nll, self.mask)

    def total(self) -> tuple[float, float]:
        """Evaluation's: the summed NLL and the number of tokens (examples) it is summed over."""
        return (self.nll * self.mask).sum().item(), self.mask.sum().item()


def forward_losses(model: Any, batch: dict[str, torch.Tensor], keep_logits: bool, past: Any = None) -> BatchLoss:
    """The model on a collated batch: class labels ``(batch,)`` for a classifier, token labels for a
    causal LM (only the answer positions projected onto the vocabulary with ``keep_logits``; ``past``
    as in :func:`answer_logits`)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = F.cross_entropy(logits.float(), labels, reduction="none")[:, None]
        return BatchLoss(logits, nll, torch.ones_like(nll), labels[:, None])
    logits, target = answer_logits(model, batch, keep_logits, past)
    return BatchLoss(logits, _token_nll(logits, target), (target != IGNORE).float(), target)


def batch_losses(model: Any, batch: dict[str, torch.Tensor], keep_logits: bool, past: Any = None) -> torch.Tensor:
    """One loss per example of a collated batch: :meth:`BatchLoss.per_example` of :func:`forward_losses`."""
    return forward_losses(model, batch, keep_logits, past).per_example()


def _forward_parameters(model: Any) -> Any:
    """The parameters of the causal LM's own forward (under PEFT's and Opacus' wrappers)."""
    inner = getattr(model, "_module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return inspect.signature(base.forward).parameters


def _keeps_logits(model: Any) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (Llama, Qwen2, Mistral, Phi-3, Gemma ...)."""
    return "logits_to_keep" in _forward_parameters(model)


def cache_keyword(model: Any) -> str:
    """The forward's key/value cache argument: ``cache`` in recent transformers 5.x (which still take,
    with a warning, the older ``past_key_values``)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (all of a LoRA model's live on one device)."""
    return next(model.parameters()).device


def collate_on(examples: list[dict[str, Any]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """:func:`fedslm.data.collate` moved to ``device`` (a no-op on CPU)."""
    batch = collate(examples, pad_id)
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def shared_prompt_length(examples: list[dict[str, Any]]) -> int:
    """How many leading tokens all ``examples`` share within their prompts, less one: the most a
    key/value cache (:class:`PromptCache`) can hold for them, each keeping at least its prompt's
    last token, whose logit predicts its first answer token. A chat template's system turn is
    ~14 of a triage example's ~54 tokens."""
    if not examples:
        return 0
    first = examples[0]["input_ids"]
    n = min(sum(t == IGNORE for t in e["labels"]) for e in examples) - 1
    for e in examples[1:]:
        ids = e["input_ids"]
        n = next((k for k in range(n) if ids[k] != first[k]), n)
    return max(n, 0)


class PromptCache:
    """The key/value cache of tokens that start every sequence of a batch: they run once, and each
    batch's sequences (their tokens after these) attend to them through views, repeated over the
    batch, not copies. The losses equal whole-sequence passes up to float rounding. No gradients:
    for evaluation and scoring."""

    def __init__(self, model: Any, ids: list[int]) -> None:
        from transformers import DynamicCache

        self.model, self.length = model, len(ids)
        head = DynamicCache(config=model.config)
        with torch.no_grad():
            tokens = torch.tensor([ids], device=model_device(model))
            model(input_ids=tokens, use_cache=True, **{cache_keyword(model): head})
        # a causal LM's DynamicCache holds full-attention layers (their keys and values are set once filled)
        layers: list[Any] = list(head.layers)
        self._past: list[tuple[torch.Tensor, torch.Tensor]] = [(layer.keys, layer.values) for layer in layers]

    def losses(self, batch: dict[str, torch.Tensor], keep_logits: bool) -> BatchLoss:
        """:func:`forward_losses` of ``batch``, whose sequences continue the cached tokens."""
        from transformers import DynamicCache

        n = batch["input_ids"].shape[0]
        mask = batch["attention_mask"]
        seen = torch.ones((n, self.length), dtype=mask.dtype, device=mask.device)
        cache = DynamicCache(
            [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self._past], config=self.model.config
        )
        extended = {**batch, "attention_mask": torch.cat([seen, mask], dim=1)}
        return forward_losses(self.model, extended, keep_logits, cache)


def _trainable(model: Any, train_lora_a: bool, train_head: bool = True) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        if "lora_" not in name and "modules_to_save" not in name and not p.requires_grad:
            continue
        if "lora_A" in name:
            p.requires_grad_(train_lora_a)
        if "modules_to_save" in name:
            p.requires_grad_(train_head)
        if p.requires_grad:
            params.append(p)
    return params


BUCKET_WINDOW = 16  # batches per window that length bucketing sorts (HF's group_by_length uses 50)


def _batches(lengths: list[int], cfg: LocalTraining, gen: torch.Generator) -> Iterator[list[int]]:
    """Shuffled epochs of fixed-size batches, or Poisson batches under DP.

    With ``length_bucketing`` each epoch's shuffled order is sorted by length within windows of
    ``BUCKET_WINDOW`` batches and the batches are then shuffled: every record still appears once per
    epoch, a batch pads to a width close to its members' lengths. DP-SGD never buckets (the
    config refuses it): Poisson sampling must pick each record independently of its length.
    """
    n = len(lengths)
    if cfg.dp is not None:
        if cfg.length_bucketing:
            raise TrainingError("length bucketing would make DP-SGD's batches depend on the data")
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        # each record in each step independently with probability q (one torch.rand(n) per step)
        yield from UniformWithReplacementSampler(
            num_samples=n, sample_rate=cfg.dp.sample_rate, generator=gen, steps=cfg.steps
        )
        return
    size = min(cfg.batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        if cfg.length_bucketing:
            window = size * BUCKET_WINDOW
            order = [j for w in range(0, n, window) for j in sorted(order[w : w + window], key=lengths.__getitem__)]
        batches = [order[i : i + size] for i in range(0, n - size + 1, size)]
        if cfg.length_bucketing:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        yield from batches


@dataclass
class _Session:
    """What one local training call works with, set up and torn down by :func:`_session`."""

    params: list[torch.nn.Parameter]
    names: dict[int, str]
    optimizer: torch.optim.Optimizer
    forward_model: Any  # the model, or Opacus' GradSampleModule around it under DP
    dp_opt: Any = None  # Opacus' DPOptimizer around ``optimizer`` under DP


def _prepare_model(model: Any, cfg: LocalTraining) -> Any:
    """The module that runs forward: Opacus' per-sample gradient hooks under DP."""
    return model if cfg.dp is None else _grad_sample_module(model)


def _local_optimizer(params: list[torch.nn.Parameter], cfg: LocalTraining) -> torch.optim.Optimizer:
    """The inner optimizer of the LoRA parameters (under DP, Opacus' DPOptimizer wraps it): AdamW, or SGD
    with momentum, which DP fine-tuning often prefers (no second-moment estimate of noisy gradients)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise TrainingError(f"train.optimizer {cfg.optimizer!r} is not one of adamw, sgd")


def _prepare_optimizer(optimizer: torch.optim.Optimizer, cfg: LocalTraining, n: int, device: torch.device) -> Any:
    """Opacus' DPOptimizer (per-sample clipping, noise of the expected logical batch) or ``None``."""
    if cfg.dp is None:
        return None
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(
        optimizer,
        noise_multiplier=cfg.dp.noise_multiplier,
        max_grad_norm=cfg.dp.max_grad_norm,
        expected_batch_size=max(1, round(cfg.dp.sample_rate * n)),
        loss_reduction="mean",
        secure_mode=cfg.dp.secure_mode,  # Opacus' noise robust to floating-point attacks
        generator=torch.Generator(device=device).manual_seed(_seed(cfg, 1)),
    )


def _seed(cfg: LocalTraining, offset: int) -> int:
    """The seed of a training call's draws: the run's (reproducible), or under DP's ``secure_mode`` one
    from the operating system's entropy, so that no one who knows the config can tell which records a
    step sampled or subtract its noise. (torch's generators are not cryptographic: Philox on CUDA,
    Mersenne Twister on a CPU; left unseeded they start from a fixed seed in every process.)"""
    if cfg.dp is not None and cfg.dp.secure_mode:
        return secrets.randbits(63)
    return cfg.seed + offset


@contextlib.contextmanager
def _session(model: Any, cfg: LocalTraining, n: int) -> Iterator[_Session]:
    """Trainable parameters, optimizer and (under DP) Opacus' hooks for one call, removed on exit.

    The resident model is reused across calls, so tear-down leaves it as it was: no Opacus hooks, no
    per-sample gradients, every LoRA A and head parameter trainable again.
    """
    params = _trainable(model, cfg.train_lora_a, cfg.train_head)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = _local_optimizer(params, cfg)
    forward_model = _prepare_model(model, cfg)
    try:
        dp_opt = _prepare_optimizer(optimizer, cfg, n, model_device(model))
        with warnings.catch_warnings():
            # Opacus' hook on the first LoRA layer, whose input (a frozen embedding) needs no gradient:
            # torch says so at every backward; the hook uses the output's gradient only
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            yield _Session(params, names, optimizer, forward_model, dp_opt)
    finally:
        if cfg.dp is not None:
            forward_model._close()  # remove Opacus hooks: the resident model is reused
            for p in params:
                p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' attribute, set at runtime
        for p in model.parameters():
            name = names.get(id(p), "")
            if "lora_A" in name or "modules_to_save" in name:
                p.requires_grad_(True)


def train_local(
    model: Any,
    examples: list[dict[str, list[int]]],
    pad_id: int,
    cfg: LocalTraining,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps on ``examples``; the model's LoRA weights are updated in place.

    ``on_step(step)`` is called after each optimizer step (progress, tests).
    """
    if not examples:
        raise TrainingError("this client has no training examples")
    gen = torch.Generator().manual_seed(_seed(cfg, 0))  # batch draws on the CPU: the same on every device
    device = model_device(model)
    model.train()
    keep_logits = _keeps_logits(model)
    losses: list[float] = []
    seen = empty = micro = 0
    t0 = time.perf_counter()
    with _session(model, cfg, len(examples)) as run:
        # FedProx anchors: the starting (= global) values of the trainable parameters
        anchors = {id(p): p.detach().clone() for p in run.params} if cfg.proximal_mu > 0 else {}
        before = [p.detach().clone() for p in run.params]
        batches = _batches([len(e["input_ids"]) for e in examples], cfg, gen)
        for step in range(cfg.steps):
            idx = next(batches)
            run.optimizer.zero_grad(set_to_none=True)
            if run.dp_opt is not None:
                run.dp_opt.zero_grad(set_to_none=True)
            if idx:
                loss = _accumulate(run, [examples[i] for i in idx], pad_id, device, keep_logits, cfg, step)
                losses.append(loss)
                seen += len(idx)
                micro += math.ceil(len(idx) / (cfg.physical_batch_size or len(idx)))
            else:  # an empty Poisson batch: a noise-only step
                empty += 1
                for p in run.params:  # Opacus' per-sample gradients: an attribute it adds to parameters at runtime
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.learning_rate * warmup_factor(step, cfg.warmup_steps)
            if run.dp_opt is None and cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
            _step(run.optimizer, run.dp_opt, anchors, cfg.proximal_mu)
            if step == 0:
                _check_moved(run.params, before, run.names)
            if on_step is not None:
                on_step(step)
    for p in run.params:
        if not torch.isfinite(p).all():
            raise TrainingError(f"non-finite LoRA weights in {run.names[id(p)]} after training")
    done = [v for v in losses if math.isfinite(v)]
    return TrainResult(
        steps=cfg.steps,
        num_examples=len(examples),
        loss_first=done[0] if done else float("nan"),
        loss_last=done[-1] if done else float("nan"),
        loss_mean=float(np.mean(done)) if done else float("nan"),
        seconds=time.perf_counter() - t0,
        samples_seen=seen,
        empty_batches=empty,
        losses=losses,
        micro_batches=micro,
    )


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Share of the learning rate at local step ``step`` (0-based): ``(step + 1) / (warmup + 1)``, then 1."""
    return min(1.0, (step + 1) / (warmup_steps + 1))


def round_learning_rate(base: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """The learning rate of round ``server_round`` (1-based) of ``num_rounds``: constant, or cosine decay
    from ``base`` in round 1 to ``base / 10`` in the last round."""
    if schedule == "constant" or num_rounds <= 1:
        return base
    progress = min(max(server_round - 1, 0) / (num_rounds - 1), 1.0)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _accumulate(
    run: _Session,
    batch: list[dict[str, Any]],
    pad_id: int,
    device: torch.device,
    keep_logits: bool,
    cfg: LocalTraining,
    step: int,
) -> float:
    """Gradients of one logical batch, in physical micro-batches of at most ``cfg.physical_batch_size``.

    Opacus' ``BatchMemoryManager`` semantics: under DP each micro-batch's per-sample gradients are
    clipped and summed (``signal_skip_step`` + ``pre_step``: no noise, no step), and the step that
    follows adds the noise of the logical batch once; the accountant sees one step. Without DP the
    micro-batch losses are scaled to the logical batch's mean, so the summed gradients are its gradient.
    Returns the logical batch's mean loss.
    """
    size = cfg.physical_batch_size or len(batch)
    total = 0.0
    for k in range(0, len(batch), size):
        if k and run.dp_opt is not None:  # clip and keep the previous micro-batch's per-sample gradients
            run.dp_opt.signal_skip_step(do_skip=True)
            run.dp_opt.pre_step()
            run.dp_opt.zero_grad(set_to_none=True)  # drops grad_sample; the clipped sum is kept
        chunk = batch[k : k + size]
        per_example = batch_losses(run.forward_model, collate_on(chunk, pad_id, device), keep_logits)
        if not torch.isfinite(per_example).all():
            raise TrainingError(f"non-finite loss at step {step}")
        # Opacus' per-sample gradients of a mean loss are rescaled by the micro-batch size itself
        loss = per_example.mean() if run.dp_opt is not None else per_example.sum() / len(batch)
        loss.backward()
        total += per_example.detach().sum().item()
    return total / len(batch)


def _grad_sample_module(model: Any) -> Any:
    return _checkpoint_safe_gsm()(model, batch_first=True, loss_reduction="mean")


@functools.cache
def _checkpoint_safe_gsm() -> type:
    """Opacus' per-sample gradient hooks, made safe for (non-reentrant) gradient checkpointing.

    Checkpointing runs a layer's forward a second time inside backward to rebuild what it dropped.
    Opacus' forward hook would record the activations again and count a second forward per
    parameter, so the backward hook (which fires once, on the original graph) never completes the
    per-sample gradient ("Per sample gradient is not initialized") and a stale activation is left
    behind. The recomputed inputs equal the recorded ones, so the hook skips the recomputation: it is
    the only forward that runs while autograd is executing a backward graph.
    """
    from opacus import GradSampleModule

    class CheckpointSafeGradSampleModule(GradSampleModule):  # type: ignore[misc]
        def capture_activations_hook(self, module: Any, forward_input: Any, forward_output: Any) -> None:
            if torch._C._current_graph_task_id() != -1:  # inside backward: a checkpoint recomputation
                return
            super().capture_activations_hook(module, forward_input, forward_output)

    return CheckpointSafeGradSampleModule


def _step(optimizer: Any, dp_opt: Any, anchors: dict[int, torch.Tensor], mu: float) -> None:
    """One optimizer step; the FedProx term is data-independent, so it is added after DP noise."""
    if dp_opt is not None and not dp_opt.pre_step():
        return
    if mu > 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                prox = mu * (p.detach() - anchors[id(p)])
                p.grad = prox if p.grad is None else p.grad + prox
    optimizer.step()


def _check_moved(params: list[torch.nn.Parameter], before: list[torch.Tensor], names: dict[int, str]) -> None:
    """Guard against opacus#820: hooks/optimizer bound to stale parameters leave LoRA untouched."""
    moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    if not moved:
        raise TrainingError(
            "LoRA weights did not change after the first optimizer step (see opacus issue 820):"
            f" the optimizer is bound to parameters the model no longer uses ({names[id(params[0])]})"
        )


# -- evaluation --------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(ch for ch in first.lower() if ch.isalnum() or ch == " ").strip()


def count_correct(texts: list[str], answers: list[str]) -> int:
    """How many ``texts`` match their ``answers`` after :func:`normalize_answer` (exact match)."""
    return sum(normalize_answer(t) == normalize_answer(a) for t, a in zip(texts, answers, strict=True))


# generation settings that leave greedy decoding a plain argmax (sampling ones are off with do_sample=False)
_PLAIN_GREEDY_KEYS = frozenset(
    {
        "_from_model_config", "transformers_version", "use_cache", "cache_implementation",
        "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
        "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
        "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "num_beams", "num_return_sequences",
    }
)  # fmt: skip


def greedy_stop_ids(model: Any) -> frozenset[int]:
    """The tokens that end ``model.generate``'s greedy answers, if its generation config adds nothing
    to the argmax (no repetition penalty, forced or suppressed tokens, minimum length, beams ...);
    empty otherwise, and then every answer is generated."""
    gc = getattr(model, "generation_config", None)
    if gc is None or not set(gc.to_diff_dict()) <= _PLAIN_GREEDY_KEYS or (gc.num_beams or 1) != 1:
        return frozenset()
    eos = gc.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


def _forced_verdict(
    tokenizer: Any, example: dict[str, list[int]], prompt_ids: list[int], answer: str, hit: bool,
    stop: frozenset[int], max_new_tokens: int,
) -> bool | None:  # fmt: skip
    """Whether the greedy answer to this prompt matches ``answer``, known without generating; None when
    only generating tells.

    ``hit``: the teacher-forced argmax at every answer position was the example's answer token, up to
    and including its end token. Greedy decoding then emits exactly those tokens and stops, provided
    the example holds the whole prompt the generation is given, the end token stops generation, no
    earlier answer token does, and the answer fits in ``max_new_tokens``. A miss is undecided: greedy
    decoding leaves the answer's tokenization there but may still spell an equal first line.
    """
    labels = [t for t in example["labels"] if t != IGNORE]
    if not (hit and stop and labels and labels[-1] in stop and len(labels) <= max_new_tokens):
        return None
    if stop.intersection(labels[:-1]) or not _holds_prompt(example, prompt_ids):
        return None
    said = tokenizer.decode(labels[:-1], skip_special_tokens=True)
    return normalize_answer(said) == normalize_answer(answer)


def _holds_prompt(example: dict[str, list[int]], prompt_ids: list[int]) -> bool:
    """Whether the example's prompt (its tokens before the answer) is the whole prompt a generation is given."""
    n_prompt = sum(t == IGNORE for t in example["labels"])
    return n_prompt == len(prompt_ids) and example["input_ids"][:n_prompt] == prompt_ids


def _certain_miss(
    tokenizer: Any, example: dict[str, list[int]], prompt_ids: list[int], answer: str, first: int
) -> bool:
    """Whether the greedy answer to this prompt surely misses ``answer``, known from its first token.

    ``first`` (the argmax after the prompt) starts the answer's first line when its text is ASCII,
    holds a letter or digit and no line break: every later token only extends that line, so the
    normalized answer (:func:`normalize_answer`, compared without spaces, which decoding in context
    may add or drop) starts with that text's, or greedy decoding cannot spell it. The base model's
    answers before any training are all such misses: none of them needs generating.
    """
    if first < 0 or not _holds_prompt(example, prompt_ids):
        return False
    text = tokenizer.decode([first], skip_special_tokens=True)
    if not text.isascii() or text.splitlines() != [text] or not any(ch.isalnum() for ch in text):
        return False
    piece = "".join(ch for ch in text.lower() if ch.isalnum())
    return not normalize_answer(answer).replace(" ", "").startswith(piece)


@torch.no_grad()
def generated_matches(
    model: Any, tokenizer: Any, prompts: list[str], answers: list[str], *, batch_size: int, max_new_tokens: int
) -> int:
    """How many greedy answers (``max_new_tokens`` at most, batches left-padded) match ``answers``."""
    correct = 0
    pad = tokenizer.pad_token_id
    device = model_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += count_correct(texts, answers[i : i + batch_size])
    finally:
        tokenizer.padding_side = side
    return correct


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, list[int]]],
    prompts: list[str],
    answers: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    forced: bool = True,
) -> dict[str, float]:
    """Loss and perplexity on answer tokens, and exact-match accuracy of greedy answers.

    With ``forced`` (``examples[k]`` then encodes ``prompts[k]`` and ``answers[k]``) the loss pass
    decides most answers: where the argmax at every answer position is the answer token, greedy
    decoding would emit the answer and stop (see :func:`_forced_verdict`); where the argmax after the
    prompt already spells something else, it cannot (:func:`_certain_miss`). Only the other
    prompts are generated. Both ways score the same model's greedy answers; they can differ only
    where two logits tie within the float noise of batching, as generating in other batches can.
    ``eval_generated`` is the share of prompts that were generated.
    """
    model.eval()
    nll = tokens = 0.0
    hits: list[bool] = []
    firsts: list[int] = []
    stop = greedy_stop_ids(model) if forced and prompts and len(examples) == len(prompts) else frozenset()
    keep_logits = _keeps_logits(model)
    device = model_device(model)
    shared = shared_prompt_length(examples)  # the chat template's system turn, run once
    prompt = PromptCache(model, examples[0]["input_ids"][:shared]) if shared > 1 else None
    cut = prompt.length if prompt else 0
    for i in range(0, len(examples), batch_size):
        rest = [{"input_ids": e["input_ids"][cut:], "labels": e["labels"][cut:]} for e in examples[i : i + batch_size]]
        batch = collate_on(rest, tokenizer.pad_token_id, device)
        out = prompt.losses(batch, keep_logits) if prompt else forward_losses(model, batch, keep_logits)
        summed, counted = out.total()
        nll += summed
        tokens += counted
        if stop:
            hits.extend(out.argmax_hits().tolist())
            firsts.extend(out.first_argmax().tolist())
    correct, undecided = 0, list(range(len(prompts)))
    if stop:
        undecided = []
        for k, ids in enumerate(tokenizer(prompts, add_special_tokens=False)["input_ids"]):
            verdict = _forced_verdict(tokenizer, examples[k], ids, answers[k], hits[k], stop, max_new_tokens)
            if verdict is None and _certain_miss(tokenizer, examples[k], ids, answers[k], firsts[k]):
                verdict = False
            if verdict is None:
                undecided.append(k)
            else:
                correct += verdict
    correct += generated_matches(
        model,
        tokenizer,
        [prompts[k] for k in undecided],
        [answers[k] for k in undecided],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    loss = nll / max(tokens, 1.0)
    n = max(len(prompts), 1)
    return {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_accuracy": correct / n,
        "eval_generated": len(undecided) / n,
    }


def classification_metrics(y_true: list[int], y_pred: list[int], num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 (a class never predicted has precision 0)."""
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    precision, recall, f1 = [], [], []
    for c in range(num_classes):
        tp = float(np.sum((p == c) & (t == c)))
        pc = tp / max(float(np.sum(p == c)), 1.0)
        rc = tp / max(float(np.sum(t == c)), 1.0)
        precision.append(pc)
        recall.append(rc)
        f1.append(2 * pc * rc / (pc + rc) if pc + rc > 0 else 0.0)
    return {
        "eval_accuracy": float(np.mean(t == p)) if len(t) else 0.0,
        "eval_precision": float(np.mean(precision)),
        "eval_recall": float(np.mean(recall)),
        "eval_f1": float(np.mean(f1)),
    }


@torch.no_grad()
def evaluate_classification(
    model: Any, examples: list[dict[str, Any]], pad_id: int, num_classes: int, *, batch_size: int
) -> dict[str, float]:
    """Loss, accuracy and macro precision/recall/F1 of the predicted classes."""
    model.eval()
    losses, preds, truth = [], [], []
    device = model_device(model)
    for i in range(0, len(examples), batch_size):
        batch = collate_on(examples[i : i + batch_size], pad_id, device)
        out = forward_losses(model, batch, keep_logits=False)  # a classifier projects no vocabulary
        losses.extend(out.per_example().tolist())
        preds.extend(out.logits.argmax(-1).tolist())
        truth.extend(batch["labels"].tolist())
    loss = float(np.mean(losses)) if losses else float("nan")
    return {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        **classification_metrics(truth, preds, num_classes),
    }
