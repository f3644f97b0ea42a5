"""bench/gpu.py where it cannot measure (it says so: exit 0 without a GPU, 1 beside a GPU torch cannot use),
and its two loops in miniature on a CPU, so that an API change breaks here rather than on a lent GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch uses the GPU here: the script would benchmark it")
def test_gpu_bench_beside_a_gpu_torch_cannot_use_fails(tmp_path: Path) -> None:
    """A CPU build of torch on a GPU machine (nvidia-smi answers) must not pass for a run without a GPU."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100'\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{tmp_path}:{env['PATH']}", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "an NVIDIA GPU is here, but torch" in done.stdout and "cannot use it" in done.stdout


def test_why_nothing_is_measured_on_every_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``missing_cuda`` with torch's and the machine's answers faked (also where a GPU works)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu.missing_cuda() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    why, status = gpu.missing_cuda() or ("", -1)
    assert status == 1 and "an NVIDIA GPU is here, but torch" in why
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: nothing to measure, not a fault
    assert gpu.missing_cuda() == ("no CUDA device here (torch.cuda.is_available() is False); nothing measured", 0)


def test_gpu_bench_refuses_too_few_steps_to_time() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--steps", "2"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--steps 2: at least 3" in done.stderr


def test_both_gpu_bench_loops_run_in_miniature_on_a_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedslm's step and the plain PEFT + bitsandbytes + Opacus loop, each 3 full-batch DP steps of a
    2-layer model of SmolLM2's family: both run, and each times the one step after its 2 warm-up steps."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    shape = {**gpu.SHAPES["smollm2-135m-8x128"][0], "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    path = gpu.write_random_model(shape, tmp_path / "mini")
    from transformers import AutoTokenizer  # a federation on it (gpu_session.sh fed1b) formats chat prompts

    tok = AutoTokenizer.from_pretrained(str(path))
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    for loop in (gpu.plain_step, gpu.fedslm_step):
        times, peak = loop(path, 2, 16, 3)
        assert len(times) == 1 and 0 < times[0] < 60, (loop.__name__, times)
        assert peak == 0.0  # GPU memory is measured on a GPU only
