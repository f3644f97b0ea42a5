"""Score a run's canaries with its shipped adapter (the best round): ``audit.json``, ``audit-roc.png``,
and the audit's epsilon lower bound beside the accountant's epsilon in ``summary.json``.

Called after the last round (when ``audit.enabled``) and by ``fedslm audit RUN_DIR``. Each canary's
answer is scored twice: its loss under the global model, and that loss relative to the base model (base
minus global: memorised secrets get cheaper than under the base). ``audit.score`` picks the one behind
AUC, TPR and the epsilon bound; ``audit.json`` has the ROC figures of both. The loss alone is the
default: canaries are random codes of one format, so the base model's loss on them carries nothing about
membership, and subtracting it adds its own spread. In three control runs of the audit bench (no DP)
TPR at 1% FPR was 0.47, 0.77 and 0.13 by the loss against 0.30, 0.53 and 0.07 relative to the base.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedslm import audit
from fedslm.audit import AuditError
from fedslm.config import ConfigError, RunConfig, load_config
from fedslm.errors import RunFailedError
from fedslm.logs import get_logger

log = get_logger(__name__)

AUDIT_JSON = "audit.json"
ROC_PNG = "audit-roc.png"


class PrivacyAuditFailure(RunFailedError):
    """The empirical lower bound exceeds the accountant's epsilon: the DP implementation leaks more than
    it claims (a privacy bug). The run finished; its results must not be trusted (exit 1)."""


def start(run_dir: Path, cfg: RunConfig) -> None:
    """Record the run's canaries (inserted or not, and where) before training starts."""
    if cfg.audit.enabled:
        audit.write_canaries(Path(run_dir) / audit.CANARIES_FILE, audit.run_canaries(cfg))


def _run_config(run_dir: Path) -> RunConfig:
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise AuditError(f"{run_dir} is not a finished run directory (no config.yaml)")
    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise AuditError(f"{run_dir / 'config.yaml'}: {e}") from None


def _adapter_dirs(run_dir: Path) -> tuple[Path, Path]:
    """(the adapter the run ships, its last round's adapter). The shipped one is the best round, as
    export and generate pick it (:func:`fedslm.export.run_adapter`), else the last one."""
    from fedslm.export import run_adapter

    rounds = sorted((run_dir / "adapters").glob("round-*"))
    if not rounds or not (rounds[-1] / "adapter_model.safetensors").is_file():
        raise AuditError(f"{run_dir} is a partial run: no adapters/round-NNN/adapter_model.safetensors")
    return run_adapter(run_dir)[1], rounds[-1]


def _round_state(path: Path) -> tuple[int, dict[str, Any]]:
    """(round, adapter state with its frozen residuals) of an ``adapters/round-NNN`` dir."""
    from safetensors.torch import load_file

    state = load_file(str(path / "adapter_model.safetensors"))
    residuals = path / "frozen_residuals.safetensors"
    if residuals.is_file():
        state.update(load_file(str(residuals)))
    return int(path.name.removeprefix("round-")), state


def accountant_epsilon(run_dir: Path, key: str = "epsilon_max") -> float | None:
    """The largest figure under ``key`` in the run's metrics rows: ``epsilon_max`` the cumulative client
    (local DP) epsilon, ``epsilon_central`` the central (client-level) one; None when never reported."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def client_level(cfg: RunConfig, state: dict[str, Any], initial: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The client-level audit of central DP: Andrew et al.'s estimate from the final adapter's delta
    (:func:`fedslm.audit.client_level_epsilon`), beside the central accountant's epsilon.

    The canaries live in the space of the tensors the aggregate holds, sorted by key; those are the
    ones that moved (central DP noises every one of them), so keys equal to the initial adapter are left
    out."""
    moved = {
        k: (v.double() - initial[k].double()).numpy()
        for k, v in state.items()
        if k in initial and not bool((v == initial[k]).all())
    }
    if not moved:
        raise AuditError(f"{run_dir}: the last adapter equals the initial one; no client-level audit")
    p = cfg.privacy
    estimate = audit.client_level_epsilon(audit.flatten(moved), cfg.seed, cfg.audit.client_canaries, p.central_delta)
    return {**estimate, "epsilon_central": accountant_epsilon(run_dir, "epsilon_central")}


def score(run_dir: Path) -> dict[str, Any]:
    """Audit a finished run; writes ``audit.json`` and the ROC plot, updates ``summary.json``."""
    from fedslm import tasks
    from fedslm.adapters import load_adapter_state

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    if not cfg.audit.enabled:
        raise AuditError(f"{run_dir} was run without an audit: section (audit.enabled is false); nothing to score")
    cpath = run_dir / audit.CANARIES_FILE
    if not cpath.is_file():
        raise AuditError(f"{run_dir} is a partial run: no {audit.CANARIES_FILE}")
    canaries = audit.read_canaries(cpath)
    shipped, last = _adapter_dirs(run_dir)
    round_, state = _round_state(shipped)
    resident = tasks.resident_model(cfg)
    model, tok = resident.model, resident.base.tokenizer
    a, d = cfg.audit, cfg.data
    pairs = [(c.question, c.answer) for c in canaries]
    length, system = cfg.model.max_length, d.system_prompt
    load_adapter_state(model, dict(resident.initial))  # B = 0: the base model
    base = audit.answer_losses(model, tok, pairs, length, system)
    load_adapter_state(model, {**resident.initial, **state})
    final = audit.answer_losses(model, tok, pairs, length, system)  # the same passes as base: comparable
    exposures = _exposures(cfg, canaries[: a.exposure_canaries], model, tok)
    load_adapter_state(model, dict(resident.initial))
    by_score = {"loss": [-f for f in final], "relative": [b - f for b, f in zip(base, final, strict=True)]}
    scores = by_score[a.score]
    members = [c.member for c in canaries]
    mem, non = audit.split_scores(scores, members)
    k = max(1, round(a.guess_fraction * len(canaries) / 2))
    r, v = audit.guesses(scores, members, k, k)
    # the per-record (eps, delta) claim of local DP, each member canary inserted `repeats` times
    delta = cfg.privacy.delta
    lower = audit.epsilon_lower_bound(r, v, a.confidence, m=len(canaries), delta=delta, group=a.repeats)
    eps = accountant_epsilon(run_dir)
    clients = None
    if a.client_canaries:  # the mechanism's leak: the final model, whichever round ships
        last_round, last_state = _round_state(last)
        clients = {"round": last_round, **client_level(cfg, last_state, resident.initial, run_dir)}
    figures = _roc_figures(mem, non)
    result = {
        "round": round_,  # the adapter scored: the one export and generate use
        "canaries": len(canaries),
        "members": len(mem),
        "repeats": a.repeats,
        "score": a.score,  # the one behind the figures below; "scores" has the ROC figures of both
        **figures,
        "scores": {name: _roc_figures(*audit.split_scores(s, members)) for name, s in by_score.items()},
        "exposure_canaries": len(exposures),
        **_exposure_means(exposures, members),
        "guesses": r,
        "correct": v,
        "confidence": a.confidence,
        "delta": delta,
        "epsilon_lower_bound": lower,
        "epsilon_accountant": eps,
        "client_level": clients,  # audit.client_canaries: Andrew et al.'s estimate vs epsilon_central
        "per_canary": [
            {"index": c.index, "member": c.member, "client": c.client, "loss": f, "base_loss": b, "exposure": e}
            for c, f, b, e in zip(canaries, final, base, _padded(exposures, len(canaries)), strict=True)
        ],
    }
    result["score_s"] = time.perf_counter() - t0  # the audit's own cost: scoring (model loads included)
    (run_dir / AUDIT_JSON).write_text(json.dumps(result, indent=2))
    _plot(audit.roc_curve(mem, non), figures["auc"], run_dir / ROC_PNG)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["audit"] = {
            "round": round_,
            "epsilon_lower_bound": lower,
            "epsilon_accountant": eps,
            "auc": result["auc"],
            "client_level_epsilon": None if clients is None else clients["epsilon_lower_bound"],
            "epsilon_central": None if clients is None else clients["epsilon_central"],
        }
        summary_path.write_text(json.dumps(summary, indent=2))
    log.info("audit: %s", table_line(result))
    bug = privacy_bug(lower, eps, a.confidence, delta)
    if bug:
        raise PrivacyAuditFailure(bug)
    return result


def _roc_figures(mem: list[float], non: list[float]) -> dict[str, float]:
    return {
        "auc": audit.roc_auc(mem, non),
        "tpr_at_1pct_fpr": audit.tpr_at_fpr(mem, non, 0.01),
        "tpr_at_0.1pct_fpr": audit.tpr_at_fpr(mem, non, 0.001),
    }


def _exposures(cfg: RunConfig, sample: list[audit.Canary], model: Any, tok: Any) -> list[float]:
    """Carlini et al.'s exposure of each canary in ``sample``: its secret ranked among ``audit.candidates``
    random codes of the same format. A secret and its candidates share one cached prompt pass and are
    scored in one call, so the rank compares losses of one computation."""
    k = cfg.audit.candidates + 1
    answers = [(c.question, x) for c in sample for x in [c.answer, *audit.candidate_codes(cfg.seed, c, k - 1)]]
    losses = audit.answer_losses(model, tok, answers, cfg.model.max_length, cfg.data.system_prompt)
    return [audit.exposure(losses[i * k], losses[i * k + 1 : (i + 1) * k]) for i in range(len(sample))]


def _exposure_means(exposures: list[float], members: list[bool]) -> dict[str, float | None]:
    """Mean exposure of the measured member and non-member canaries, and the largest (None where none)."""
    sampled = members[: len(exposures)]  # exposure is measured on the first canaries only
    mem = [e for e, m in zip(exposures, sampled, strict=True) if m]
    non = [e for e, m in zip(exposures, sampled, strict=True) if not m]
    return {
        "exposure_members_mean": sum(mem) / len(mem) if mem else None,
        "exposure_nonmembers_mean": sum(non) / len(non) if non else None,
        "exposure_max": max(exposures) if exposures else None,
    }


def _padded(values: list[float], n: int) -> list[float | None]:
    """``values`` followed by None up to ``n`` (canaries whose exposure was not measured)."""
    return [*values, *[None] * (n - len(values))]


def privacy_bug(lower: float, accountant: float | None, confidence: float, delta: float) -> str:
    """The one loud line when the audit's lower bound exceeds the accountant's epsilon ('' otherwise).

    ``lower`` is already the largest epsilon whose (eps, delta) claim the audit rejects at
    ``confidence``, so ``lower > accountant`` means the accountant's own claim is rejected."""
    if accountant is None or lower <= accountant:
        return ""
    return (
        f"PRIVACY BUG: the audit's epsilon lower bound {lower:.3f} exceeds the accountant's epsilon"
        f" {accountant:.3f} (delta {delta:g}, {confidence:.0%} confidence): the model leaks more than the"
        " DP accounting allows; do not use this run, and check the DP settings and code"
    )


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_line(result: dict[str, Any]) -> str:
    eps = result["epsilon_accountant"]
    return (
        f"audit (round {result['round']}, score: {result.get('score', 'relative')})"
        f"  AUC {result['auc']:.3f}  TPR@1%FPR {result['tpr_at_1pct_fpr']:.3f}"
        f"  TPR@0.1%FPR {result['tpr_at_0.1pct_fpr']:.3f}  exposure(max) {_num(result['exposure_max'], 2)}"
        f"  eps lower bound {result['epsilon_lower_bound']:.3f}"
        f"  accountant eps {'-' if eps is None else f'{eps:.3f}'}" + _client_part(result.get("client_level"))
    )


def _client_part(clients: dict[str, Any] | None) -> str:
    if not clients:
        return ""
    central = clients["epsilon_central"]
    return (
        f"  client-level eps estimate {clients['epsilon_lower_bound']:.3f} (mu {clients['mu']:.2f})"
        f"  central eps {'-' if central is None else f'{central:.3f}'}"
    )


def _plot(points: list[tuple[float, float]], auc: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(*zip(*points, strict=True), marker=".", label=f"canaries (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
