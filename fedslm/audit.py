"""Privacy audit with canaries: made-up secrets, who holds them, and what the model gives away.

- :func:`make_canaries`: m records from the run seed, a question about a made-up patient whose answer
  is a random 8-character code; each is a member (put into one client's training data) with
  probability 1/2, else held out. Deterministic per seed.
- :func:`insert_canaries`: a client's training records plus its member canaries (``repeats`` copies).
  Evaluation data never gets any: they are added after the client's validation split.
- Statistics on per-canary scores (higher = "looks like a member"): :func:`roc_auc`,
  :func:`tpr_at_fpr`, :func:`exposure` (Carlini et al., The Secret Sharer, 2019) and
  :func:`epsilon_lower_bound` (Steinke, Nasr & Jagielski, NeurIPS 2023, one-run audit, for
  (eps, delta)-DP and canaries repeated ``repeats`` times).
- Client-level audit of central DP (Andrew et al., "One-shot empirical privacy estimation for federated
  learning", ICLR 2024): :func:`insert_client_canaries` adds canary clients' updates, unit random
  directions, to a round's aggregate; :func:`client_level_epsilon` compares the cosines of the final
  model delta with the inserted directions against fresh ones and converts the Gaussian fit to epsilon.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binom, norm

from .config import AUDIT_MAX_FRACTION, ConfigError, RunConfig
from .errors import FedslmError
from .plan import validation_size

CODE_ALPHABET = string.ascii_uppercase + string.digits
CODE_LENGTH = 8
_FIRST = ("Alma", "Boris", "Cleo", "Dario", "Edda", "Fritz", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lior")
_LAST = ("Varga", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Brennan", "Kovac", "Aalto", "Duarte", "Nyberg")
CANARIES_FILE = "audit/canaries.jsonl"
# a seed stream of its own: canaries never share draws with data generation or sampling
_SALT = 0x5EC2E7


class AuditError(FedslmError, ValueError):
    """The audit cannot run as asked (names the file or key and the fix)."""


@dataclass(frozen=True)
class Canary:
    index: int
    question: str
    answer: str
    member: bool
    client: int  # the client holding it (members), -1 for held-out canaries

    def record(self, prompt_column: str, response_column: str) -> dict[str, Any]:
        return {prompt_column: self.question, response_column: self.answer}


def random_code(rng: random.Random) -> str:
    return "".join(rng.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def make_canaries(seed: int, m: int, num_clients: int) -> list[Canary]:
    """m canaries from ``seed``: questions about distinct made-up patients, random 8-character codes,
    membership by a fair coin, and a uniformly drawn client for each member."""
    rng = random.Random(f"canaries-{seed}-{_SALT}")
    out = []
    for i in range(m):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        born = f"{rng.randint(1930, 2015)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        question = f"What is the access code of patient {name} (born {born}, record {i:04d})?"
        member = rng.random() < 0.5
        client = rng.randrange(num_clients) if member else -1
        out.append(Canary(i, question, random_code(rng), member, client))
    return out


def run_canaries(cfg: RunConfig) -> list[Canary]:
    return make_canaries(cfg.seed, cfg.audit.canaries, cfg.federation.num_clients)


def candidate_codes(seed: int, canary: Canary, n: int) -> list[str]:
    """``n`` random codes of the canary's format, none equal to its own (deterministic per seed)."""
    rng = random.Random(f"candidates-{seed}-{canary.index}-{_SALT}")
    out: list[str] = []
    while len(out) < n:
        code = random_code(rng)
        if code != canary.answer:
            out.append(code)
    return out


def insert_canaries(cfg: RunConfig, client_id: int, train_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``train_records`` plus this client's member canaries, ``audit.repeats`` copies each, spread
    through the list deterministically. Unchanged when the audit is off."""
    if not cfg.audit.enabled:
        return train_records
    mine = [c for c in run_canaries(cfg) if c.member and c.client == client_id]
    extra = [c.record(cfg.data.prompt_column, cfg.data.response_column) for c in mine for _ in range(cfg.audit.repeats)]
    if len(extra) > canary_cap(len(train_records)):
        raise AuditError(_over_cap(client_id, len(extra), len(train_records)))
    out = list(train_records)
    rng = random.Random(f"insert-{cfg.seed}-{client_id}-{_SALT}")
    for rec in extra:
        out.insert(rng.randint(0, len(out)), rec)
    return out


def canary_cap(train_records: int) -> int:
    """The most canary records a client with ``train_records`` training records may get."""
    return int(AUDIT_MAX_FRACTION * train_records)


def _over_cap(client_id: int, extra: int, train_records: int) -> str:
    return (
        f"audit.canaries: client {client_id} would get {extra} canary records, over the cap"
        f" {canary_cap(train_records)} ({AUDIT_MAX_FRACTION:.0%} of its {train_records} training records);"
        " lower audit.canaries or audit.repeats"
    )


def check_canary_cap(cfg: RunConfig, partition_sizes: Sequence[int]) -> None:
    """The preflight's check, for any data source: each client's member canaries (``repeats`` copies)
    within :func:`canary_cap` of its training records (its partition less its validation hold-out), as
    :func:`insert_canaries` will find them. ``partition_sizes`` are the clients' record counts, by id."""
    if not cfg.audit.enabled:
        return
    held = Counter(c.client for c in run_canaries(cfg) if c.member)
    for client_id, size in enumerate(partition_sizes):
        train = size - validation_size(size)
        if held[client_id] * cfg.audit.repeats > canary_cap(train):
            raise ConfigError(_over_cap(client_id, held[client_id] * cfg.audit.repeats, train))


def write_canaries(path: Path, canaries: list[Canary]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(c)) + "\n" for c in canaries))


def read_canaries(path: Path) -> list[Canary]:
    return [Canary(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# -- statistics ------------------------------------------------------------------------------


def split_scores(scores: list[float], members: list[bool]) -> tuple[list[float], list[float]]:
    """(scores of members, scores of non-members)."""
    pairs = list(zip(scores, members, strict=True))
    return [s for s, m in pairs if m], [s for s, m in pairs if not m]


def roc_auc(member_scores: list[float], nonmember_scores: list[float]) -> float:
    """P(score of a random member > score of a random non-member), ties counted one half."""
    if not member_scores or not nonmember_scores:
        raise AuditError("ROC AUC needs at least one member and one non-member canary")
    wins = sum((m > n) + 0.5 * (m == n) for m in member_scores for n in nonmember_scores)
    return wins / (len(member_scores) * len(nonmember_scores))


def roc_curve(member_scores: list[float], nonmember_scores: list[float]) -> list[tuple[float, float]]:
    """(FPR, TPR) points, one per distinct threshold ("member" when score >= threshold), from (0, 0)."""
    points = [(0.0, 0.0)]
    for t in sorted(set(member_scores) | set(nonmember_scores), reverse=True):
        fpr = sum(s >= t for s in nonmember_scores) / len(nonmember_scores)
        tpr = sum(s >= t for s in member_scores) / len(member_scores)
        points.append((fpr, tpr))
    return points


def tpr_at_fpr(member_scores: list[float], nonmember_scores: list[float], max_fpr: float) -> float:
    """The highest TPR of a threshold whose FPR is at most ``max_fpr``."""
    return max(tpr for fpr, tpr in roc_curve(member_scores, nonmember_scores) if fpr <= max_fpr)


def exposure(canary_loss: float, candidate_losses: list[float]) -> float:
    """Carlini et al.'s exposure, log2(|R|) - log2(rank), over R = the canary's secret plus the
    candidates; rank 1 = the canary's secret has the lowest loss (ties ranked against the canary)."""
    rank = 1 + sum(c <= canary_loss for c in candidate_losses)
    return math.log2(len(candidate_losses) + 1) - math.log2(rank)


def guesses(scores: list[float], members: list[bool], k_plus: int, k_minus: int) -> tuple[int, int]:
    """(guesses made, correct): "member" for the ``k_plus`` highest scores, "non-member" for the
    ``k_minus`` lowest, abstain on the rest (Steinke et al.'s guessing game)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    low, high = order[:k_minus], order[len(order) - k_plus :] if k_plus else []
    correct = sum(members[i] for i in high) + sum(not members[i] for i in low)
    return k_plus + k_minus, correct


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """P-value of the claim "the training run is (eps, delta)-DP" after ``v`` correct of ``r`` guesses
    about ``m`` canaries, each a member independently with probability 1/2.

    Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
    arXiv:2305.08846), main theorem for (eps, delta)-DP: with W the number of correct guesses,
    B ~ Binomial(r, q), q = e^eps / (1 + e^eps) (the accuracy of eps-DP randomized response) and
    f(u) = P[B >= u],

        P[W >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,

    where f(v - i) - f(v) = P[v - i <= B < v]. This is what the paper's own p-value routine computes;
    delta = 0 leaves f(v), the pure-DP case. Capped at 1."""
    if not 0 <= v <= r <= m:
        raise AuditError(f"one-run audit needs 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if eps < 0 or not 0 <= delta <= 1:
        raise AuditError(f"one-run audit: eps {eps} must be >= 0 and delta {delta} in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[B >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below, alpha = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, q))  # P[v - i <= B < v]
        alpha = max(alpha, below / i)
    return min(tail + 2 * m * delta * alpha, 1.0)


def group_claim(eps: float, delta: float, group: int) -> tuple[float, float]:
    """(eps, delta)-DP per record gives (k eps, k e^((k-1) eps) delta)-DP for a group of k records
    (group privacy): a canary inserted ``group`` times is protected only that much."""
    return group * eps, min(1.0, group * math.exp((group - 1) * eps) * delta)


def epsilon_lower_bound(
    r: int, v: int, confidence: float = 0.95, *, m: int | None = None, delta: float = 0.0, group: int = 1
) -> float:
    """Empirical per-record epsilon lower bound of a one-run audit (Steinke, Nasr & Jagielski 2023):
    the largest eps whose claim "(eps, delta)-DP per record" is rejected at ``confidence`` by
    :func:`one_run_p_value` on ``m`` canaries (each inserted ``group`` times, so the canary-level claim
    tested is :func:`group_claim`). A rejected eps rejects every smaller one ((eps, delta)-DP implies
    (eps', delta)-DP for eps' > eps), so the bisection keeps a rejected ``lo``: the answer is always a
    rejected claim. 0 when even eps = 0 is not rejected. ``delta = 0`` is the pure-DP bound; for
    delta > 0 the bound is lower (``m`` is then required)."""
    if not 0 <= v <= r:
        raise AuditError(f"correct guesses {v} not in [0, {r}]")
    if delta > 0 and m is None:
        raise AuditError("the (eps, delta) one-run bound needs m, the number of canaries")
    m = r if m is None else m
    beta = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, *group_claim(eps, delta, group)) <= beta

    if r == 0 or not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, hi * 2.0
        if hi > 1e3:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


# -- client-level audit of central DP (Andrew et al., ICLR 2024) ----------------------------------


def canary_direction(seed: int, index: int, dim: int) -> np.ndarray:
    """Canary client ``index``'s update direction: a unit vector, uniformly random on the sphere of
    ``dim`` dimensions (a normalised Gaussian), deterministic per (seed, index, dim)."""
    v = np.random.default_rng([seed, _SALT, index]).standard_normal(dim)
    return v / np.linalg.norm(v)


def flatten(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float64 vector, keys in sorted order (the canaries' coordinate system)."""
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in sorted(tensors)])


def insert_client_canaries(
    tensors: dict[str, np.ndarray], seed: int, count: int, scale: float
) -> dict[str, np.ndarray]:
    """``tensors`` plus ``scale`` times the sum of canary directions 0..count-1 (each canary client's
    update, clipped to the clipping norm C and weighted 1/m in the mean, has ``scale`` = C/m)."""
    if count <= 0:
        return tensors
    dim = sum(int(np.asarray(v).size) for v in tensors.values())
    total = np.zeros(dim)
    for i in range(count):
        total += canary_direction(seed, i, dim)
    total *= scale
    out, start = {}, 0
    for k in sorted(tensors):
        v = np.asarray(tensors[k])
        out[k] = (v + total[start : start + v.size].reshape(v.shape)).astype(v.dtype)
        start += v.size
    return out


def cosines(vector: np.ndarray, directions: list[np.ndarray]) -> list[float]:
    """cos(vector, d) for unit directions d (0 for a zero vector)."""
    length = float(np.linalg.norm(vector))
    return [0.0 if length == 0 else float(vector @ d) / length for d in directions]


def gdp_mu(inserted: list[float], fresh: list[float]) -> float:
    """The mu of a Gaussian fit: (mean of the inserted canaries' cosines - mean of the fresh ones) / the
    fresh ones' standard deviation (sample, ddof 1)."""
    if len(fresh) < 2 or not inserted:
        raise AuditError("the client-level audit needs at least one inserted and two fresh canaries")
    out = np.asarray(fresh, dtype=np.float64)
    return float((np.mean(inserted) - out.mean()) / out.std(ddof=1))


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth & Su 2022, Corollary 2.13):
    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest eps with mu-GDP => (eps, delta)-DP (0 when mu <= 0 or delta(0) <= delta);
    delta(eps) decreases in eps, so a bisection finds it."""
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(mu, mid) > delta else (lo, mid)
    return hi


def client_level_epsilon(model_delta: np.ndarray, seed: int, count: int, delta: float) -> dict[str, float]:
    """Andrew et al.'s one-shot estimate: cosines of ``model_delta`` with the ``count`` inserted canary
    directions and with ``count`` fresh ones (indices count..2count-1, never inserted), mu of their
    Gaussian fit (:func:`gdp_mu`), and the epsilon of mu-GDP at ``delta`` (:func:`gdp_epsilon`).
    An estimate from one run, without a confidence level."""
    dim = int(model_delta.size)
    inserted = cosines(model_delta, [canary_direction(seed, i, dim) for i in range(count)])
    fresh = cosines(model_delta, [canary_direction(seed, count + i, dim) for i in range(count)])
    mu = gdp_mu(inserted, fresh)
    return {
        "canaries": count,
        "cos_inserted_mean": float(np.mean(inserted)),
        "cos_fresh_mean": float(np.mean(fresh)),
        "cos_fresh_std": float(np.std(fresh, ddof=1)),
        "mu": mu,
        "delta": delta,
        "epsilon_lower_bound": gdp_epsilon(mu, delta),
    }


# -- scoring with a model --------------------------------------------------------------------


def answer_losses(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], max_length: int, system: str, batch_size: int = 32
) -> list[float]:
    """Mean NLL of each answer given its question (the training loss of that record), in order.

    Answers to one question (a canary's secret and its candidates) share the prompt tokens: the prompt
    runs once and its key/value cache serves all of them (:func:`_shared_prompt_losses`); a question
    asked once is scored whole. Only the answer positions are projected onto the vocabulary."""
    import torch

    from .data import encode

    examples = [encode(tokenizer, q, a, max_length, system) for q, a in pairs]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(tuple(_prompt_ids(e)), []).append(i)
    shared = {prompt: rows for prompt, rows in groups.items() if len(rows) > 1 and len(prompt) > 1}
    alone = [i for prompt, rows in groups.items() if prompt not in shared for i in rows]
    out = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for prompt, rows in shared.items():
                answers = [examples[i]["input_ids"][len(prompt) :] for i in rows]
                # an answer and its cached prompt are ~1/6 of a whole sequence's tokens and logits: four
                # times the batch stays within the whole path's memory, and each pass has a fixed cost
                # (a 4-bit base dequantizes its weights on every forward: ~3 s on 2 CPU cores)
                losses = _shared_prompt_losses(model, tokenizer, list(prompt), answers, 4 * batch_size)
                for i, loss in zip(rows, losses, strict=True):
                    out[i] = loss
            whole = _whole_losses(model, tokenizer, [examples[i] for i in alone], batch_size)
            for i, loss in zip(alone, whole, strict=True):
                out[i] = loss
    finally:
        model.train(was_training)
    return out


def _prompt_ids(example: dict[str, list[int]]) -> list[int]:
    """The prompt of an encoded example: its leading tokens without a label. Taken from the encoding
    itself, prompt + answer are exactly the ids a whole-sequence pass sees."""
    from .data import IGNORE

    return example["input_ids"][: example["labels"].count(IGNORE)]


def _whole_losses(model: Any, tokenizer: Any, examples: list[dict[str, list[int]]], batch_size: int) -> list[float]:
    from .training import _keeps_logits, batch_losses, collate_on, model_device

    device, keep = model_device(model), _keeps_logits(model)
    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        batch = collate_on(examples[i : i + batch_size], tokenizer.pad_token_id, device)
        out.extend(batch_losses(model, batch, keep).tolist())
    return out


def _shared_prompt_losses(
    model: Any, tokenizer: Any, prompt: list[int], answers: list[list[int]], batch_size: int
) -> list[float]:
    """Losses of ``answers`` (token ids) to one ``prompt``: the prompt but its last token runs once
    (:class:`fedslm.training.PromptCache`); each batch then feeds that last token and the answers.
    The numbers equal whole-sequence passes up to float rounding."""
    from .data import IGNORE
    from .training import PromptCache, _keeps_logits, collate_on, model_device

    device, keep = model_device(model), _keeps_logits(model)
    head = PromptCache(model, prompt[:-1])
    out: list[float] = []
    for i in range(0, len(answers), batch_size):
        chunk = [{"input_ids": prompt[-1:] + a, "labels": [IGNORE] + a} for a in answers[i : i + batch_size]]
        batch = collate_on(chunk, tokenizer.pad_token_id, device)
        out.extend(head.losses(batch, keep).per_example().tolist())
    return out
