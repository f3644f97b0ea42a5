"""bench/gpu.py without a CUDA device (hidden with CUDA_VISIBLE_DEVICES=""): it says so and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_without_cuda_says_so_and_exits_0() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--steps", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout and "nothing measured" in done.stdout
    assert "| model shape |" not in done.stdout  # no table of figures that were never measured


def test_gpu_bench_shapes_match_the_issue_table() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import SHAPES

    # (hidden, layers, vocab) of each family and the batch x tokens of issue 14's reference table
    got = {
        k: (v[0]["hidden_size"], v[0]["num_hidden_layers"], v[0]["vocab_size"], v[1], v[2]) for k, v in SHAPES.items()
    }
    assert got == {
        "smollm2-135m-8x128": (576, 30, 49152, 8, 128),
        "smollm2-135m-32x256": (576, 30, 49152, 32, 256),
        "llama-3.2-1b": (2048, 16, 128256, 32, 256),
        "qwen2.5-1.5b": (1536, 28, 151936, 32, 256),
        "llama-3.2-3b": (3072, 28, 128256, 32, 256),
    }
