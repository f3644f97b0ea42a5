"""bench/grad_dtypes.py in miniature (the tiny model, 2 records), so the GPU session's `grads` stage
cannot break unseen: its table holds what fp16 and bf16 arithmetic must give."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_grad_dtypes_ranks_fp16_closer_to_fp32_than_bf16_and_undoes_its_loss_scale() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "grad_dtypes.py"), "--config", "configs/tiny.yaml", "--batch", "2"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0] in ("float32", "bfloat16", "float16"):
            rows[(cells[0], float(cells[1]))] = (float(cells[4]), float(cells[5]), cells[8], cells[2])
    want = [("bfloat16", 1.0), ("float16", 1.0), ("float16", 1024.0), ("float16", 65536.0), ("float32", 1.0)]
    assert sorted(rows) == want
    assert rows[("float32", 1.0)] == (0.0, 0.0, "True", "0.0000%")  # the reference against itself
    fp16, bf16 = rows[("float16", 1.0)][0], rows[("bfloat16", 1.0)][0]
    assert 0 < fp16 < bf16 < 0.2, rows  # 10 mantissa bits against 7: fp16 rounds less
    codes = {dtype: float(rows[(dtype, 1.0)][3].rstrip("%")) for dtype in ("float16", "bfloat16")}
    assert 0 < codes["float16"] < codes["bfloat16"] < 2, rows  # and so moves fewer weights across an NF4 bin
    for scale in (1024.0, 65536.0):  # the scaled loss's gradients, divided back: the same gradients
        assert abs(rows[("float16", scale)][0] - fp16) < 0.002 and rows[("float16", scale)][2] == "True", rows
