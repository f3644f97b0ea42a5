"""Run results: ``summary.json`` and a PNG plot of loss, accuracy and epsilon per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedslm.config import RunConfig
from fedslm.fs import atomic_file, atomic_write
from fedslm.logs import get_logger

log = get_logger(__name__)

KEYS = (
    "train_loss",
    "eval_loss",
    "perplexity",
    "eval_accuracy",
    "bytes_up",
    "bytes_down",
    "wall_s",
    "epsilon_max",
    "epsilon_mean",
    "epsilon_central",
)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    best = rows[-1].get("best_round") if rows else None
    row = next((r for r in rows if r["round"] == best), None)
    return None if row is None else {"round": best, **{k: row.get(k) for k in KEYS}}


def summarize(
    cfg: RunConfig, rows: list[dict[str, Any]], clients: dict[int, dict[str, float]] | None = None
) -> dict[str, Any]:
    from fedslm.model import resolve_hardware

    hardware = resolve_hardware(cfg.model)
    evaluated = [r for r in rows if r.get("eval_accuracy") is not None]
    first, last = evaluated[0], evaluated[-1]
    return {
        "rounds": len(rows) - 1,
        "first": {"round": first["round"], **{k: first.get(k) for k in KEYS}},
        "last": {"round": last["round"], **{k: last.get(k) for k in KEYS}},
        # the best kept round (highest central accuracy, then lowest eval loss): what export, generate and
        # chat use by default
        "best": _best(rows),
        "diverged_rounds": [r["round"] for r in rows if r.get("diverged")],
        "totals": {
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "wall_s": sum(r["wall_s"] for r in rows),
            "failed": sum(r["failed"] for r in rows),
            "no_reply": sum(r.get("no_reply", 0) for r in rows),
            "declined": sum(r["declined"] for r in rows),
            "rejected": sum(r["rejected"] for r in rows),
            "skipped_rounds": sum(1 for r in rows if r["skipped"]),
        },
        "model": cfg.model.name,
        "quantization": cfg.model.quantization,
        # as resolved on the machine that ran the server (each node resolves auto for itself)
        "device": hardware.device,
        "compute_dtype": hardware.compute_dtype,
        # what the clients computed in, over the run (a run recorded before the key: none)
        "client_compute_dtypes": sorted({d for r in rows for d in r.get("compute_dtypes", [])}),
        "strategy": cfg.strategy.name,
        "privacy": {
            "mode": cfg.privacy.mode,
            "target_epsilon": cfg.privacy.target_epsilon,
            "delta": cfg.privacy.delta,
            "max_grad_norm": cfg.privacy.max_grad_norm,
            "accountant": cfg.privacy.accountant,
            "central_noise_multiplier": cfg.privacy.central_noise_multiplier if cfg.privacy.central else None,
            "central_clipping_norm": cfg.privacy.central_clipping_norm if cfg.privacy.central else None,
            "central_delta": cfg.privacy.central_delta if cfg.privacy.central else None,
            # per client: cumulative epsilon, calibrated noise multiplier, Poisson sampling rate
            "clients": {str(k): v for k, v in sorted((clients or {}).items())},
        },
    }


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r["round"] for r in rows]
    for key, label in (("train_loss", "train loss"), ("eval_loss", "eval loss")):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax_loss.set_xlabel("round")
    ax_loss.set_xticks(rounds)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    pts = [(r["round"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    if pts:
        ax_acc.plot(*zip(*pts, strict=True), marker="o", color="tab:green", label="eval accuracy")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("exact-match accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_xticks(rounds)
    eps = [(r["round"], r["epsilon_max"]) for r in rows if r.get("epsilon_max") is not None]
    if eps:
        ax_eps = ax_acc.twinx()
        ax_eps.plot(*zip(*eps, strict=True), marker="s", linestyle="--", color="tab:red", label="epsilon (max client)")
        ax_eps.set_ylabel("cumulative epsilon")
        ax_eps.legend(loc="lower right")
    ax_acc.legend(loc="upper left")
    fig.tight_layout()
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out


def write_results(
    out_dir: Path, cfg: RunConfig, rows: list[dict[str, Any]], clients: dict[int, dict[str, float]] | None = None
) -> dict[str, Any]:
    summary = summarize(cfg, rows, clients)
    atomic_write(Path(out_dir) / "summary.json", json.dumps(summary, indent=2))
    plot(rows, Path(out_dir) / "metrics.png")
    log.info("Results written to %s", out_dir)
    return summary


def no_round_trained(rows: list[dict[str, Any]], out_dir: Path) -> str | None:
    """Why the run trained nothing (every round skipped, every client failed), or None if it trained.

    Such a run's results table would look like a run; it is a failure, and the clients' own errors
    say why. ``fedslm simulate`` and the deployed ServerApp both end with this as their error.
    """
    rounds = [r for r in rows if r.get("round", 0) >= 1]
    if not rounds or any(not r.get("skipped") and r.get("clients", 0) > 0 for r in rounds):
        return None
    reasons = sorted({e for r in rounds for e in r.get("errors", [])})
    failed, declined = sum(r.get("failed", 0) for r in rounds), sum(r.get("declined", 0) for r in rounds)
    why = "; ".join(reasons[:3]) if reasons else f"no client error was reported (see {out_dir / 'run.log'})"
    return (
        f"no round trained: {len(rounds)} of {len(rounds)} rounds skipped ({failed} client failures,"
        f" {declined} declines, federation.min_train_clients not met); clients said: {why}; run dir {out_dir}"
    )
