"""A deployed node's per-message cost: a fresh process per message (what Flower 1.42's ``flwr-clientapp``
does alone) against the node's resident worker (``client/resident.py``), side by side in one run.

The same train messages (demo config, real SmolLM2: the global adapter in, one client's DP-SGD round
out) go (a) each to a new Python process that imports torch, loads the base model and trains, and
(b) to one resident worker over its Unix socket. Both run the same ``client.handlers.handle``; the
difference is importing and loading. Flower's own per-message process start (``flwr-clientapp``,
which imports only flwr on the resident path: 0.4 s) is the same in both and not included.

    .venv/bin/python bench/resident.py [--messages 3] [--set train.local_steps=3 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table

CHILD = """
import sys, time
from pathlib import Path
from fedslm.client.handlers import handle
from fedslm.client.resident import read_frame
with open(sys.argv[1], "rb") as f:
    header, arrays = read_frame(f)
outcome = handle("train", header["config"], arrays, header["node_config"])
print("loss", outcome.metrics["train-loss"], "loads", outcome.metrics["model-loads"])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--set", action="append", default=["train.local_steps=3"], metavar="KEY=VALUE")
    args = parser.parse_args()

    from fedslm.client.node import NodeSpec, resident_argv
    from fedslm.client.resident import forward, wait_until_listening, write_frame

    from fedslm import wire
    from fedslm.adapters import PEFT_CACHE
    from fedslm.config import load_config

    cfg = load_config(args.config, args.set)
    start = wire.encode(dict(PEFT_CACHE.get(cfg.model, cfg.lora).initial), cfg.communication.dtype)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDSLM_LOG": "WARNING"}
    with tempfile.TemporaryDirectory() as tmp:

        def message(rnd: int, kind: str) -> tuple[dict[str, object], dict[str, object]]:
            config = {"run-config": cfg.to_yaml(), "run-name": kind, "server-round": rnd}
            return config, {"partition-id": 0, "num-partitions": cfg.federation.num_clients, "state-dir": tmp}

        fresh = []
        for rnd in range(1, args.messages + 1):
            config, node = message(rnd, "fresh")
            frame = Path(tmp) / f"msg-{rnd}.bin"
            with frame.open("wb") as f:
                write_frame(f, {"kind": "train", "config": config, "node_config": node}, start)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(frame)], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            fresh.append(time.perf_counter() - t0)
            print(f"fresh process, message {rnd}: {fresh[-1]:.1f} s ({out.stdout.strip()})", flush=True)

        spec = NodeSpec(key=None, data=Path(tmp) / "d.jsonl", client_id=0, insecure=True, runtime_port=39000)
        worker = subprocess.Popen(resident_argv(spec), env=env)
        resident = []
        try:
            wait_until_listening(spec.resident_socket, alive=lambda: worker.poll() is None)
            for rnd in range(1, args.messages + 1):
                config, node = message(rnd, "resident")
                t0 = time.perf_counter()
                outcome = forward(spec.resident_socket, "train", config, start, node)
                resident.append(time.perf_counter() - t0)
                print(
                    f"resident worker, message {rnd}: {resident[-1]:.1f} s"
                    f" (loss {outcome.metrics['train-loss']:.4f}, loads {outcome.metrics['model-loads']})",
                    flush=True,
                )
        finally:
            worker.terminate()
            worker.wait(30)

    later_f, later_r = statistics.median(fresh[1:] or fresh), statistics.median(resident[1:] or resident)
    print()
    print(
        table(
            ["", "first message s", "later messages s (median)", "later vs resident", "base-model loads"],
            [
                [
                    "fresh process per message",
                    f"{fresh[0]:.1f}",
                    f"{later_f:.1f}",
                    f"{later_f / later_r:.2f}",
                    str(len(fresh)),
                ],
                ["resident worker", f"{resident[0]:.1f}", f"{later_r:.1f}", "1.00", "1"],
            ],
        )
    )
    print(f"({args.messages} train messages, {' '.join('--set ' + s for s in args.set)})")


if __name__ == "__main__":
    main()
