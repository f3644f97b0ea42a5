"""Local training: loss goes down; DP-SGD clips each sample, handles empty batches, moves LoRA."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from fedslm import data
from fedslm.adapters import adapter_state, load_adapter_state
from fedslm.config import DataConfig, load_config
from fedslm.model import cache_root
from fedslm.training import (
    BUCKET_WINDOW,
    DPSettings,
    LocalTraining,
    TrainingError,
    _batches,
    _certain_miss,
    _forced_verdict,
    answer_positions,
    collate_on,
    evaluate,
    forward_losses,
    greedy_stop_ids,
    round_learning_rate,
    sequence_losses,
    sequence_losses_at,
    shared_prompt_length,
    train_local,
    warmup_factor,
)

ROOT = Path(__file__).resolve().parent.parent


def _examples(tok, n: int = 64) -> list[dict[str, list[int]]]:
    cfg = DataConfig(num_records=240)
    records = data.client_records(cfg, cache_root(), 3, 4).records[:n]
    return data.encode_all(tok, records, cfg, 96)


@pytest.fixture
def fresh(tiny_peft):
    """The shared tiny LoRA model at its initial adapter (reset by the conftest fixture)."""
    return tiny_peft


def test_sequence_losses_are_per_sequence_token_means() -> None:
    logits = torch.zeros(2, 4, 3)
    logits[0, 0, 1] = 10.0  # sequence 0 predicts token 1 at position 1 confidently
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 0, -100]])
    got = sequence_losses(logits, labels)
    nll_confident = torch.nn.functional.cross_entropy(logits[0, 0:1], torch.tensor([1])).item()
    uniform = torch.log(torch.tensor(3.0)).item()
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx((nll_confident + uniform) / 2, rel=1e-6)
    assert got[1].item() == pytest.approx(uniform, rel=1e-6)


def test_only_answer_logits_give_the_same_loss_and_gradients(fresh) -> None:
    """Training projects only the positions that predict answer tokens (``logits_to_keep``)."""
    tok = fresh.base.tokenizer
    batch = data.collate(_examples(tok, 8), tok.pad_token_id)
    keep = answer_positions(batch["labels"])
    assert 0 < len(keep) < batch["labels"].shape[1] // 3  # measured: 16 of 59 positions
    grads = []
    for kwargs in ({}, {"logits_to_keep": keep}):
        fresh.model.zero_grad(set_to_none=True)
        out = fresh.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        if kwargs:
            loss = sequence_losses_at(out.logits, batch["labels"], keep).mean()
        else:
            loss = sequence_losses(out.logits, batch["labels"]).mean()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for n, p in fresh.model.named_parameters() if "lora_" in n]))
    (full, g_full), (kept, g_kept) = grads
    fresh.model.zero_grad(set_to_none=True)
    assert kept == pytest.approx(full, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_full, g_kept, strict=True))


def test_plain_training_lowers_loss(fresh) -> None:
    tok = fresh.base.tokenizer
    ex = _examples(tok)
    result = train_local(fresh.model, ex, tok.pad_token_id, LocalTraining(steps=25, batch_size=8, learning_rate=0.05))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.25, result.losses  # measured: 10.47 -> 10.15
    assert result.num_examples == len(ex) == 53 and result.samples_seen == 25 * 8


def test_dp_per_sample_clipping_bounds_each_contribution(fresh) -> None:
    """Before noise: the summed gradient is exactly sum_i g_i * min(1, C/|g_i|), each term <= C."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    tok = fresh.base.tokenizer
    model = fresh.model
    params = [p for p in model.parameters() if p.requires_grad]
    batch = data.collate(_examples(tok, 6), tok.pad_token_id)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=6,
        loss_reduction="mean",
    )
    try:
        out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        sequence_losses(out.logits, batch["labels"]).mean().backward()
        per_sample = torch.stack([p.grad_sample.reshape(6, -1).norm(dim=1) for p in params], 1).norm(dim=1)
        assert (per_sample > 0.05).all(), per_sample  # every sample needs clipping at C=0.05
        factors = (0.05 / (per_sample + 1e-6)).clamp(max=1.0)
        expected = [torch.einsum("i,i...->...", factors, p.grad_sample) / 6 for p in params]
        assert opt.pre_step()
        for p, e in zip(params, expected, strict=True):
            assert torch.allclose(p.grad, e, atol=1e-7)
        clipped = torch.cat([factors[:, None] * p.grad_sample.reshape(6, -1) for p in params], 1)
        assert (clipped.norm(dim=1) <= 0.05 + 1e-6).all()
    finally:
        gsm._close()
        for p in params:
            p.grad_sample = None


def test_dp_empty_poisson_batches_take_noise_only_steps(fresh) -> None:
    tok = fresh.base.tokenizer
    before = adapter_state(fresh.model)
    cfg = LocalTraining(steps=3, batch_size=4, learning_rate=0.01, dp=DPSettings(1.0, 1.0, sample_rate=1e-9))
    result = train_local(fresh.model, _examples(tok, 16), tok.pad_token_id, cfg)
    after = adapter_state(fresh.model)
    assert result.empty_batches == 3 and result.samples_seen == 0
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the noise moved the weights


def test_dp_training_lowers_loss_on_tiny_model(fresh) -> None:
    tok = fresh.base.tokenizer
    cfg = LocalTraining(steps=30, batch_size=16, learning_rate=0.05, dp=DPSettings(0.5, 1.0, 16 / 64))
    result = train_local(fresh.model, _examples(tok), tok.pad_token_id, cfg)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.1, result.losses  # seeded noise


def test_dp_training_with_gradient_checkpointing_takes_the_same_steps(fresh) -> None:
    """Opacus' hooks under (non-reentrant) checkpointing: the recomputation in backward is not
    recorded again, so the per-sample gradients, the clipped and noised steps and the adapter are
    the ones training without checkpointing produces (plain Opacus fails: 'Per sample gradient is
    not initialized')."""
    from fedslm.adapters import attach_lora, load_adapter_state
    from fedslm.model import load_base_model

    tok = fresh.base.tokenizer
    ex = _examples(tok)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.gradient_checkpointing=true"])
    ckpt_model = attach_lora(load_base_model(cfg.model).model, cfg.lora)  # its own copy, not the resident one
    assert ckpt_model.base_model.model.is_activation_checkpointing
    assert not fresh.model.base_model.model.is_activation_checkpointing
    spec = LocalTraining(steps=6, batch_size=8, learning_rate=0.05, dp=DPSettings(0.5, 1.0, 8 / 53), seed=3)
    runs = []
    for model in (fresh.model, ckpt_model):
        load_adapter_state(model, fresh.initial)
        result = train_local(model, ex, tok.pad_token_id, spec)
        left = [n for n, m in model.named_modules() if getattr(m, "activations", None)]
        assert left == [], left  # no activation left behind for the next step or client
        runs.append((result.losses, adapter_state(model)))
    (plain_losses, plain), (ckpt_losses, checkpointed) = runs
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6) and len(plain_losses) >= 5
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=1e-4, atol=1e-6) for k in plain)
    assert any(not torch.equal(plain[k], fresh.initial[k]) for k in plain)  # DP-SGD moved LoRA


def test_secure_mode_draws_batches_and_noise_the_seed_cannot_predict(fresh, monkeypatch) -> None:
    """Without secure_mode two calls from the same adapter and seed take identical DP steps; with it,
    the batches and the noise come from the OS's entropy, so they differ though the seed is the same:
    the batches drawn, and the adapters also where the batches are made the same again."""
    import fedslm.training as training

    tok = fresh.base.tokenizer
    ex = _examples(tok, 32)
    drawn: list[list[int]] = []  # every step's sampled record indices, in order
    real_batches, real_seed = training._batches, training._seed

    def recorded(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            drawn.append(sorted(batch))
            yield batch

    monkeypatch.setattr(training, "_batches", recorded)

    def two_calls(secure: bool) -> tuple[bool, bool]:
        spec = LocalTraining(steps=4, batch_size=8, learning_rate=0.05, dp=DPSettings(1.0, 1.0, 8 / 32, secure))
        runs = []
        for _ in range(2):
            drawn.clear()
            load_adapter_state(fresh.model, fresh.initial)
            train_local(fresh.model, ex, tok.pad_token_id, spec)
            runs.append((list(drawn), adapter_state(fresh.model)))
        (batches_a, a), (batches_b, b) = runs
        assert len(batches_a) == len(batches_b) == 4 and all(torch.isfinite(v).all() for v in b.values())
        return batches_a == batches_b, all(torch.equal(a[k], b[k]) for k in a)

    assert two_calls(secure=False) == (True, True)
    assert two_calls(secure=True) == (False, False)  # 4 Poisson draws over 32 records at q 1/4 differ
    # the batches from the seed again: the noise alone still differs
    monkeypatch.setattr(training, "_seed", lambda cfg, offset: cfg.seed if offset == 0 else real_seed(cfg, offset))
    assert two_calls(secure=True) == (True, False)


def test_no_examples_is_an_error(fresh) -> None:
    with pytest.raises(TrainingError, match="no training examples"):
        train_local(fresh.model, [], 0, LocalTraining(steps=1, batch_size=1, learning_rate=0.1))


def _epoch(lengths: list[int], bucketing: bool, seed: int = 0) -> list[list[int]]:
    spec = LocalTraining(steps=1, batch_size=4, learning_rate=0.1, length_bucketing=bucketing)
    batches = _batches(lengths, spec, torch.Generator().manual_seed(seed))
    return [next(batches) for _ in range(len(lengths) // 4)]


def _padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_bucketing_keeps_every_record_once_per_epoch_and_pads_less() -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(20, 100, (4 * BUCKET_WINDOW * 3,), generator=gen).tolist()  # 3 windows
    plain, bucketed = _epoch(lengths, False), _epoch(lengths, True)
    assert sorted(i for b in bucketed for i in b) == list(range(len(lengths)))  # each record once
    assert all(len(b) == 4 for b in bucketed)
    # lengths uniform in [20, 100): a random batch of 4 pads ~3 x 32 tokens, a sorted one of 64 ~3 x 1.3
    assert _padding(lengths, bucketed) < 0.1 * _padding(lengths, plain), (
        _padding(lengths, bucketed),
        _padding(lengths, plain),
    )
    assert _epoch(lengths, True) == bucketed != _epoch(lengths, True, seed=2)  # seeded, and seed-dependent


def test_length_bucketing_is_refused_under_dp() -> None:
    spec = LocalTraining(steps=1, batch_size=4, learning_rate=0.1, length_bucketing=True, dp=DPSettings(1, 1, 0.1))
    with pytest.raises(TrainingError, match="DP-SGD"):
        next(_batches([10] * 40, spec, torch.Generator()))


def test_eval_loss_from_answer_logits_only_equals_the_full_computation(fresh) -> None:
    tok = fresh.base.tokenizer
    ex = _examples(tok, 12)
    got = evaluate(fresh.model, tok, ex, [], [], batch_size=5, max_new_tokens=1)["eval_loss"]
    nll = count = 0.0
    with torch.no_grad():
        for e in ex:  # one example at a time, every position's logits
            logits = fresh.model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].float()
            target = torch.tensor(e["labels"][1:])
            nll += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += (target != -100).sum().item()
    assert got == pytest.approx(nll / count, rel=1e-5)


def test_evaluation_runs_the_shared_system_turn_once() -> None:
    """The tokens every prompt starts with (the chat template's system turn) are cached once; each
    example keeps at least its last prompt token. (That the losses are unchanged: the test above.)"""
    ignore = data.IGNORE
    a = {"input_ids": [1, 2, 3, 4, 9], "labels": [ignore] * 4 + [9]}
    b = {"input_ids": [1, 2, 3, 5, 5, 8], "labels": [ignore] * 5 + [8]}
    assert shared_prompt_length([a, b]) == 3
    short = {"input_ids": [1, 2, 7], "labels": [ignore, ignore, 7]}  # a prompt of 2: only its first token
    assert shared_prompt_length([a, b, short]) == 1
    assert shared_prompt_length([a, {"input_ids": [6, 2, 3, 4, 9], "labels": a["labels"]}]) == 0
    assert shared_prompt_length([a]) == 3  # one example: its prompt but the last token
    assert shared_prompt_length([]) == 0


def test_triage_examples_share_the_system_turn(tiny_peft) -> None:
    tok = tiny_peft.base.tokenizer
    ex = _examples(tok, 48)
    k = shared_prompt_length(ex)
    system = DataConfig().system_prompt
    assert tok.decode(ex[0]["input_ids"][:k]) == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    assert k / (sum(len(e["input_ids"]) for e in ex) / len(ex)) > 0.2  # a fifth of the tokens evaluation runs


def test_poisson_batches_come_from_opacus_sampler_with_the_former_draws() -> None:
    """Opacus' UniformWithReplacementSampler gives, for a seed, exactly the batches the former
    hand-written loop drew (one ``torch.rand(n) < q`` per step): runs before and after agree."""
    n, q, steps, seed = 50, 0.2, 40, 7
    spec = LocalTraining(steps=steps, batch_size=10, learning_rate=0.1, dp=DPSettings(1.0, 1.0, q))
    got = list(_batches([10] * n, spec, torch.Generator().manual_seed(seed)))
    gen = torch.Generator().manual_seed(seed)
    former = [torch.nonzero(torch.rand(n, generator=gen) < q).flatten().tolist() for _ in range(steps)]
    assert got == former and len(got) == steps
    sizes = [len(b) for b in got]
    assert 6 < sum(sizes) / steps < 14  # Poisson around q * n = 10
    assert len(set(map(len, got))) > 3  # the batch size varies


def test_batch_losses_are_the_training_loss_and_sum_to_the_eval_nll(fresh) -> None:
    """One batch-loss helper: per-sequence means for training, token sums for evaluation."""
    from fedslm.training import _keeps_logits, _token_nll, answer_logits, batch_losses

    tok = fresh.base.tokenizer
    batch = data.collate(_examples(tok, 5), tok.pad_token_id)
    fresh.model.eval()
    with torch.no_grad():
        keep = _keeps_logits(fresh.model)
        per_seq = batch_losses(fresh.model, batch, keep)
        full = sequence_losses(
            fresh.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
        logits, target = answer_logits(fresh.model, batch, keep)
        nll = _token_nll(logits, target)
    assert per_seq.shape == (5,) and torch.allclose(per_seq, full, atol=1e-5)
    counts = (target != -100).sum(1)
    assert torch.allclose(nll.sum(1), per_seq * counts, rtol=1e-5)  # a sequence's mean x its answer tokens


def _split_vs_whole(fresh, cfg: LocalTraining, ex: list[dict[str, list[int]]]):  # noqa: ANN202
    """train_local in one piece and in micro-batches of 3: (result, gradients each step, adapter) of each."""
    out = []
    for physical in (0, 3):
        load_adapter_state(fresh.model, fresh.initial)
        lora = [(n, p) for n, p in fresh.model.named_parameters() if "lora_" in n]
        grads: list[dict[str, torch.Tensor]] = []

        def keep(step: int, lora=lora, grads=grads) -> None:  # the update the optimizer just applied
            grads.append({n: p.grad.detach().clone() for n, p in lora if p.grad is not None})

        run = dataclasses.replace(cfg, physical_batch_size=physical)
        result = train_local(fresh.model, ex, fresh.base.tokenizer.pad_token_id, run, on_step=keep)
        out.append((result, grads, adapter_state(fresh.model)))
    return out


def _max_gap(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> float:
    assert [sorted(x) for x in a] == [sorted(x) for x in b] and a
    return max((x[k] - y[k]).abs().max().item() for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_a_logical_batch_in_micro_batches_takes_the_same_dp_steps(fresh, noise: float) -> None:
    """Opacus' BatchMemoryManager semantics: Poisson batches of ~16 in micro-batches of 3 give the same
    clipped, noised update (same noise seed) as in one piece, and one optimizer step per logical batch."""
    ex = _examples(fresh.base.tokenizer, 48)
    cfg = LocalTraining(steps=4, batch_size=16, learning_rate=0.01, seed=3, dp=DPSettings(noise, 0.5, 16 / 48))
    (whole, g_whole, a_whole), (split, g_split, a_split) = _split_vs_whole(fresh, cfg, ex)
    assert len(g_whole) == len(g_split) == 4  # one optimizer step (one accountant event) per logical batch
    assert whole.samples_seen == split.samples_seen > 4 * 3 and whole.micro_batches == 4
    assert split.micro_batches == sum(-(-n // 3) for n in _poisson_sizes(48, 16 / 48, 3, 4)) > 4
    assert _max_gap(g_whole, g_split) < 1e-6  # the clipped, noised update of every step
    assert max(v.abs().max().item() for g in g_whole for v in g.values()) > 1e-3  # ... which is not ~0
    assert whole.losses == pytest.approx(split.losses, rel=1e-6)  # float32 sums over other padding widths
    assert max((a_whole[k] - a_split[k]).abs().max().item() for k in a_whole) < 1e-6
    assert any(not torch.equal(v, fresh.initial[k]) for k, v in a_split.items())  # the steps moved LoRA


def test_a_logical_batch_in_micro_batches_takes_the_same_plain_steps(fresh) -> None:
    """Without DP the micro-batch gradients, scaled to the logical batch, sum to its gradient. (The
    adapters after AdamW drift ~1e-6 apart: its first step is ~lr * sign(g), which float32 rounding
    of a near-zero gradient can flip; the gradients themselves agree.)"""
    ex = _examples(fresh.base.tokenizer, 48)
    cfg = LocalTraining(steps=3, batch_size=8, learning_rate=0.01, seed=1)
    (whole, g_whole, _), (split, g_split, _) = _split_vs_whole(fresh, cfg, ex)
    assert (whole.micro_batches, split.micro_batches) == (3, 9)  # batches of 8 in micro-batches of 3, 3, 2
    assert _max_gap(g_whole, g_split) < 1e-6
    assert max(v.abs().max().item() for g in g_whole for v in g.values()) > 1e-3
    assert whole.losses == pytest.approx(split.losses, rel=1e-6)


def _poisson_sizes(n: int, q: float, seed: int, steps: int) -> list[int]:
    """The sizes of the Poisson batches that train_local draws for ``seed``."""
    cfg = LocalTraining(steps=steps, batch_size=1, learning_rate=0.1, dp=DPSettings(1.0, 1.0, q))
    return [len(b) for b in _batches([1] * n, cfg, torch.Generator().manual_seed(seed))]


def test_plain_training_clips_the_step_gradient_and_warms_up(fresh) -> None:
    """train.max_grad_norm outside DP: every step's gradient has L2 norm <= the bound; the warm-up's
    learning rates are (step + 1) / (warmup + 1) of the base."""
    tok = fresh.base.tokenizer
    ex = _examples(tok, 32)
    lora = [p for n, p in fresh.model.named_parameters() if "lora_" in n]
    norms: dict[float, list[float]] = {}
    for clip in (0.0, 1e-3):
        load_adapter_state(fresh.model, fresh.initial)
        seen = norms.setdefault(clip, [])
        cfg = LocalTraining(steps=3, batch_size=8, learning_rate=0.01, max_grad_norm=clip, warmup_steps=2)
        train_local(
            fresh.model,
            ex,
            tok.pad_token_id,
            cfg,
            on_step=lambda _, seen=seen: seen.append(torch.cat([p.grad.flatten() for p in lora]).norm().item()),
        )
    assert min(norms[0.0]) > 0.01  # measured ~0.1: the bound below really clips
    assert max(norms[1e-3]) <= 1e-3 * (1 + 1e-5)
    assert [warmup_factor(s, 2) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_round_learning_rate_schedule() -> None:
    assert [round_learning_rate(0.01, "cosine", r, 3) for r in (1, 2, 3)] == pytest.approx([0.01, 0.0055, 0.001])
    assert round_learning_rate(0.01, "constant", 3, 3) == 0.01 == round_learning_rate(0.01, "cosine", 1, 1)


def test_ffa_lora_under_dp_trains_b_only_and_lowers_loss(fresh) -> None:
    """FFA-LoRA (strategy ffa-lora sends train-lora-a false) under DP-SGD: every A stays bitwise at its
    init, every B moves and stays finite, and the loss goes down (opacus#820's symptom is the opposite)."""
    tok = fresh.base.tokenizer
    cfg = LocalTraining(
        steps=30, batch_size=16, learning_rate=0.05, train_lora_a=False, dp=DPSettings(0.5, 1.0, 16 / 64)
    )
    result = train_local(fresh.model, _examples(tok), tok.pad_token_id, cfg)
    after = adapter_state(fresh.model)
    a_keys = [k for k in after if "lora_A" in k]
    b_keys = [k for k in after if "lora_B" in k]
    assert a_keys and len(a_keys) == len(b_keys)
    assert all(torch.equal(after[k], fresh.initial[k]) for k in a_keys)
    assert all(not torch.equal(after[k], fresh.initial[k]) and torch.isfinite(after[k]).all() for k in b_keys)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.1, result.losses
    assert all(p.requires_grad for n, p in fresh.model.named_parameters() if "lora_A" in n)  # restored on exit


def _hooks(model) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every submodule's hook ids: forward, forward-pre, backward and backward-pre."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {name: tuple(tuple(getattr(m, k)) for k in kinds) for name, m in model.named_modules()}


def test_dp_training_leaves_no_opacus_hooks_on_the_resident_model(fresh) -> None:
    """The resident model is reused by the next call (plain, or another client's DP): Opacus'
    per-sample hooks and gradients are gone after train_local, its own hooks (the frozen head's) kept."""
    tok = fresh.base.tokenizer
    before = _hooks(fresh.model)
    hooked = lambda: sum(any(h) for h in _hooks(fresh.model).values())  # noqa: E731
    during: list[int] = []
    cfg = LocalTraining(steps=2, batch_size=8, learning_rate=0.01, dp=DPSettings(1.0, 1.0, 8 / 32))
    train_local(fresh.model, _examples(tok, 32), tok.pad_token_id, cfg, on_step=lambda _: during.append(hooked()))
    # while training, Opacus hooked every LoRA A and B of the 2 layers x (q, v) (plus the head's own hook)
    assert min(during) - sum(any(h) for h in before.values()) >= 8
    assert _hooks(fresh.model) == before
    assert all(getattr(p, "grad_sample", None) is None for p in fresh.model.parameters())
    assert all(p.requires_grad for n, p in fresh.model.named_parameters() if "lora_" in n)


def test_sgd_under_dp_moves_lora_keeps_it_finite_and_lowers_loss(fresh) -> None:
    """train.optimizer sgd: Opacus' DPOptimizer wraps SGD with momentum as it wraps AdamW (opacus#820's
    symptom would be LoRA that never moves)."""
    tok = fresh.base.tokenizer
    cfg = LocalTraining(
        steps=30, batch_size=16, learning_rate=0.2, optimizer="sgd", momentum=0.9, dp=DPSettings(0.5, 1.0, 16 / 64)
    )
    result = train_local(fresh.model, _examples(tok), tok.pad_token_id, cfg)
    after = adapter_state(fresh.model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert sum(not torch.equal(after[k], fresh.initial[k]) for k in after) == len(after)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.1, result.losses  # measured: 10.54 -> 10.39 (lr 0.5: 10.52 -> 10.44, 2.0 rises)


def test_one_plain_sgd_step_is_w_minus_lr_grad(fresh) -> None:
    """Without DP and without clipping, the first SGD step (momentum buffer = the gradient) is w - lr * g,
    g the gradient of the batch's mean per-sequence loss, computed here by hand."""
    tok = fresh.base.tokenizer
    ex = _examples(tok, 8)
    model = fresh.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    model.train()
    model.zero_grad(set_to_none=True)
    batch = data.collate(ex, tok.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    sequence_losses(out.logits, batch["labels"]).mean().backward()
    lr = 0.3
    expected = {n: (p.detach() - lr * p.grad).clone() for n, p in lora.items()}
    assert max(p.grad.abs().max().item() for p in lora.values()) > 1e-4  # the step is not a no-op
    model.zero_grad(set_to_none=True)
    cfg = LocalTraining(steps=1, batch_size=8, learning_rate=lr, optimizer="sgd", momentum=0.9, max_grad_norm=0.0)
    train_local(model, ex, tok.pad_token_id, cfg)
    for n, p in lora.items():
        assert torch.allclose(p.detach(), expected[n], rtol=0, atol=1e-6), n


@pytest.fixture(scope="module")
def taught(_tiny_resident):
    """A copy of the tiny Llama whose every weight was trained 30 steps on 6 triage answers, with 12
    records (the 6, and 6 it never saw) as its prompts, examples and answers."""
    tok = _tiny_resident.base.tokenizer
    model = copy.deepcopy(_tiny_resident.model.get_base_model())
    cfg = DataConfig(num_records=240)
    records = data.client_records(cfg, cache_root(), 3, 4).records[:12]
    examples = data.encode_all(tok, records, cfg, 96)
    params = [p.requires_grad_(True) for n, p in model.named_parameters() if "lora_" not in n]
    opt = torch.optim.Adam(params, lr=0.01)
    torch.manual_seed(0)
    for _ in range(30):
        batch = collate_on(examples[:6], tok.pad_token_id, torch.device("cpu"))
        loss = forward_losses(model, batch, True).per_example().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompts = [data.prompt_text(tok, r["question"], cfg.system_prompt) for r in records]
    return model, tok, examples, prompts, [r["answer"] for r in records]


def test_exact_match_from_the_loss_pass_equals_generating_every_answer(taught) -> None:
    """Answers whose teacher-forced argmax is the answer and its end token are scored without
    generating; record by record the verdict is the one greedy generation gives."""
    model, tok, examples, prompts, answers = taught
    forced, generated = [], []
    for k in range(len(prompts)):
        one = ([examples[k]], [prompts[k]], [answers[k]])
        forced.append(evaluate(model, tok, *one, batch_size=4, max_new_tokens=6))
        generated.append(evaluate(model, tok, *one, batch_size=4, max_new_tokens=6, forced=False))
    assert [m["eval_accuracy"] for m in forced] == [m["eval_accuracy"] for m in generated]
    assert all(m["eval_generated"] == 1.0 for m in generated)
    skipped = [m["eval_accuracy"] for m in forced if m["eval_generated"] == 0.0]
    # measured: 6 of 12 right, each decided by the loss pass; of the 6 wrong ones, those whose first
    # greedy token already spells another answer too
    assert 0 < sum(m["eval_accuracy"] for m in generated) < len(prompts)
    assert skipped.count(1.0) == sum(m["eval_accuracy"] for m in generated) and 0.0 in skipped
    whole = evaluate(model, tok, examples, prompts, answers, batch_size=5, max_new_tokens=6)
    assert whole["eval_accuracy"] == pytest.approx(sum(m["eval_accuracy"] for m in generated) / len(prompts))
    assert whole["eval_generated"] == pytest.approx(1 - len(skipped) / len(prompts))


def test_exact_match_generates_every_answer_when_the_shortcut_cannot_tell(taught) -> None:
    model, tok, examples, prompts, answers = taught
    stop = greedy_stop_ids(model)
    assert stop == {tok.eos_token_id}
    ex, ids = examples[0], tok(prompts[0], add_special_tokens=False)["input_ids"]
    n_answer = sum(t != -100 for t in ex["labels"])
    assert (answers[0], n_answer) == ("Neurology", 4)  # three tokens and the end token
    assert _forced_verdict(tok, ex, ids, answers[0], True, stop, n_answer) is True
    assert _forced_verdict(tok, ex, ids, "Cardiology", True, stop, n_answer) is False
    assert _forced_verdict(tok, ex, ids, answers[0], False, stop, n_answer) is None  # a miss
    assert _forced_verdict(tok, ex, ids, answers[0], True, stop, n_answer - 1) is None  # cut by max_new_tokens
    assert _forced_verdict(tok, ex, ids, answers[0], True, frozenset({7}), n_answer) is None  # the end does not stop
    cut = {k: v[5:] for k, v in ex.items()}  # as data.encode cuts an over-long prompt: its end is kept
    assert _forced_verdict(tok, cut, ids, answers[0], True, stop, n_answer) is None
    # end to end: an answer longer than max_new_tokens is generated (and, truncated, wrong)
    short = evaluate(model, tok, examples, prompts, answers, batch_size=16, max_new_tokens=1)
    full = evaluate(model, tok, examples, prompts, answers, batch_size=16, max_new_tokens=6)
    assert short["eval_accuracy"] == 0.0 and short["eval_generated"] > full["eval_generated"]
    # a first greedy token that the answer does not start with decides a miss; one it starts with does not
    derm = tok(" Derm", add_special_tokens=False)["input_ids"][0]
    assert _certain_miss(tok, ex, ids, "Neurology", derm) is True
    assert _certain_miss(tok, ex, ids, "Dermatology", derm) is False
    assert _certain_miss(tok, ex, ids, "Neurology", tok.eos_token_id) is False  # an empty answer: generated
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert _certain_miss(tok, ex, ids, "Neurology", newline) is False  # the first line may start later
    assert _certain_miss(tok, cut, ids, "Neurology", derm) is False  # not the prompt the generation is given
    # a generation config that changes the argmax (a repetition penalty) leaves no shortcut
    model.generation_config.repetition_penalty = 1.3
    try:
        assert greedy_stop_ids(model) == frozenset()
        again = evaluate(model, tok, examples, prompts, answers, batch_size=16, max_new_tokens=6)
        assert again["eval_generated"] == 1.0
    finally:
        model.generation_config.repetition_penalty = 1.0
