"""Federation overhead: ``fedslm simulate`` (Flower's simulation engine, its clients in Ray workers and
in this process: ``federation.backend``) against a single-process loop that does the same client work
on the same data.

The loop runs the same code a simulated client runs (``client.runner.ClientRunner.train``, the same
seeds, DP-SGD with the same calibrated noise and accountant), averages the replies by example count
(FedAvg) and evaluates centrally on the same held-out records every round, all in one process with
one resident model. All three are measured in this one invocation; the ratios are the cost of Flower's
simulation engine, Ray workers, message encoding and the server's separate model (``inprocess``: the
engine and the encoding, on the server's model).

    .venv/bin/python bench/overhead.py [--config configs/demo.yaml] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, run, table


def single_process_loop(config: str, overrides: list[str]) -> tuple[list[dict[str, Any]], float]:
    """FedAvg rounds in plain Python: every client trains in turn on this process's one model."""
    import torch
    from fedslm.client.runner import ClientRunner
    from fedslm.client.state import ClientStore
    from fedslm.server.evaluation import CentralEvaluator

    from fedslm import wire
    from fedslm.adapters import from_arrayrecord, to_arrayrecord
    from fedslm.config import load_config
    from fedslm.protocol import LoRAPlan

    cfg = load_config(config, [*overrides, "eval.per_client=false"])
    fed = cfg.federation
    if fed.fraction_train < 1.0:
        raise SystemExit("the loop replays every client every round: use federation.fraction_train=1")
    t0 = time.perf_counter()
    evaluator = CentralEvaluator(cfg)
    global_state = from_arrayrecord(evaluator.initial_arrays())
    rows = [{"round": 0, **evaluator(to_arrayrecord(global_state))}]
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, fed.num_rounds + 1):
            sent = wire.encode(global_state, cfg.communication.dtype)
            replies = []
            for cid in range(fed.num_clients):
                runner = ClientRunner(
                    cfg=cfg,
                    client_id=cid,
                    num_clients=fed.num_clients,
                    data_path="",
                    server_round=rnd,
                    plan=LoRAPlan(),
                    store=ClientStore(Path(tmp) / f"client-{cid}"),
                )
                arrays, metrics = runner.train(sent)
                replies.append((wire.decode(arrays), int(metrics["num-examples"]), metrics))
            total = sum(n for _, n, _ in replies)
            global_state = {
                k: sum((state[k].float() * (n / total) for state, n, _ in replies), torch.zeros_like(v))
                for k, v in global_state.items()
            }
            row = {"round": rnd, **evaluator(to_arrayrecord(global_state))}
            row["epsilon_max"] = max(float(m.get("epsilon", 0.0)) for _, _, m in replies)
            row["train_s_sum"] = sum(float(m["train-seconds"]) for _, _, m in replies)
            row["client_s_sum"] = sum(float(m["client-seconds"]) for _, _, m in replies)
            rows.append(row)
            print(f"loop round {rnd}: accuracy {row['eval_accuracy']:.3f}, loss {row['eval_loss']:.4f}", flush=True)
    return rows, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", action="append", default=[], help="overrides for both")
    args = parser.parse_args()

    loop_rows, loop_s = single_process_loop(args.config, args.set)
    print(f"single-process loop: {loop_s:.0f} s", flush=True)
    fed = run("fedslm simulate, Ray", args.config, [*args.set, "federation.backend=ray"])
    inprocess = run("fedslm simulate, in this process", args.config, [*args.set, "federation.backend=inprocess"])

    def line(label: str, rows: list[dict[str, Any]], wall: float) -> list[str]:
        steps = sum(float(r.get("train_s_sum") or 0) for r in rows)
        client = sum(float(r.get("client_s_sum") or 0) for r in rows)
        return [
            label,
            f"{wall:.0f}",
            f"{wall / loop_s:.2f}",
            f"{steps:.0f}",
            f"{client:.0f}",
            f"{wall - client:.0f}" if client <= wall else "- (clients in parallel)",
            f"{rows[-1]['eval_accuracy']:.3f}",
            f"{rows[-1]['eval_loss']:.4f}",
            f"{rows[-1].get('epsilon_max') or 0:.3f}",
        ]

    header = ["", "wall s", "vs loop", "clients' steps s", "clients' messages s", "outside clients s"]
    header += ["final acc", "final loss", "epsilon (max client)"]
    lines = [
        line("fedslm simulate (Flower, Ray)", fed.rows, fed.wall_s),
        line("fedslm simulate (Flower, in this process)", inprocess.rows, inprocess.wall_s),
        line("single-process loop", loop_rows, loop_s),
    ]
    print()
    print(table(header, lines))
    print("(clients' steps: summed time in optimizer steps; messages: all of each train message on the client;")
    print(" outside clients: wall minus messages (loading, evaluation, messaging, Ray) when clients run one at a time)")
    print("(goal: fedslm simulate <= 1.15x the loop; both include model loading and every round's evaluation)")


if __name__ == "__main__":
    main()
