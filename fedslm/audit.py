"""Privacy audit with canaries: made-up secrets, who holds them, and what the model gives away.

- :func:`make_canaries`: m records from the run seed, a question about a made-up patient whose answer
  is a random 8-character code; each is a member (put into one client's training data) with
  probability 1/2, else held out. Deterministic per seed.
- :func:`insert_canaries`: a client's training records plus its member canaries (``repeats`` copies).
  Evaluation data never gets any: they are added after the client's validation split.
- Statistics on per-canary scores (higher = "looks like a member"): :func:`roc_auc`,
  :func:`tpr_at_fpr`, :func:`exposure` (Carlini et al., The Secret Sharer, 2019) and
  :func:`epsilon_lower_bound` (Steinke, Nasr & Jagielski, NeurIPS 2023, one-run audit).
"""

from __future__ import annotations

import json
import math
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scipy.stats import binom

from .config import AUDIT_MAX_FRACTION, RunConfig

CODE_ALPHABET = string.ascii_uppercase + string.digits
CODE_LENGTH = 8
_FIRST = ("Alma", "Boris", "Cleo", "Dario", "Edda", "Fritz", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lior")
_LAST = ("Varga", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Brennan", "Kovac", "Aalto", "Duarte", "Nyberg")
CANARIES_FILE = "audit/canaries.jsonl"
# a seed stream of its own: canaries never share draws with data generation or sampling
_SALT = 0x5EC2E7


class AuditError(ValueError):
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
    cap = int(AUDIT_MAX_FRACTION * len(train_records))
    if len(extra) > cap:
        raise AuditError(
            f"audit.canaries: client {client_id} would get {len(extra)} canary records, over the cap {cap}"
            f" ({AUDIT_MAX_FRACTION:.0%} of its {len(train_records)} training records); lower audit.canaries"
            " or audit.repeats"
        )
    out = list(train_records)
    rng = random.Random(f"insert-{cfg.seed}-{client_id}-{_SALT}")
    for rec in extra:
        out.insert(rng.randint(0, len(out)), rec)
    return out


def write_canaries(path: Path, canaries: list[Canary]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(c)) + "\n" for c in canaries))


def read_canaries(path: Path) -> list[Canary]:
    return [Canary(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# -- statistics ------------------------------------------------------------------------------


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


def epsilon_lower_bound(r: int, v: int, confidence: float = 0.95) -> float:
    """Empirical epsilon lower bound of a one-run audit (Steinke, Nasr & Jagielski 2023, pure-DP case,
    delta = 0): under epsilon-DP with each canary a member independently with probability 1/2, the
    number of correct guesses among ``r`` is stochastically dominated by Binomial(r, e^eps/(1+e^eps)).
    The bound is the largest eps whose tail P[Binomial(r, p(eps)) >= v] is at most 1 - confidence:
    every smaller eps is rejected at that confidence. 0 when even eps = 0 is not rejected."""
    if not 0 <= v <= r:
        raise AuditError(f"correct guesses {v} not in [0, {r}]")
    beta = 1.0 - confidence

    def tail(eps: float) -> float:
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(binom.sf(v - 1, r, p))  # P[X >= v]

    if r == 0 or tail(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= beta:  # the tail grows with eps; find where it passes beta
        hi *= 2.0
        if hi > 1e3:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= beta else (lo, mid)
    return lo


# -- scoring with a model --------------------------------------------------------------------


def answer_losses(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], max_length: int, system: str, batch_size: int = 32
) -> list[float]:
    """Mean NLL of each answer given its question (the training loss of that record), in order."""
    import torch

    from .data import collate, encode
    from .training import model_device, sequence_losses

    device = model_device(model)
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                ex = [encode(tokenizer, q, a, max_length, system) for q, a in pairs[i : i + batch_size]]
                batch = {k: v.to(device) for k, v in collate(ex, tokenizer.pad_token_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                out.extend(sequence_losses(logits, batch["labels"]).tolist())
    finally:
        model.train(was_training)
    return out
