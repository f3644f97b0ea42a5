#!/usr/bin/env bash
# fedslm's GPU checks (issue 14) on a CUDA machine without a package index, from bench/gpu_kit.py's kit.
#
#   bench/gpu_session.sh stow PART_DIR...    keep kit parts (bench/out/gpu-kit/partN) in $FEDSLM_KIT
#   bench/gpu_session.sh run STAGE...        unpack the kit once, then run the stages in order:
#     env    the GPU, torch and bitsandbytes on it (a 4-bit matmul), and what fedslm resolves
#     check  `fedslm check` of the demo on model.device=cuda
#     demo   the README's main job on the GPU: `fedslm simulate configs/demo.yaml --set model.device=cuda`
#     fed1b  the demo's 4 clients and 3 rounds on a random Llama-3.2-1B-shaped model, sharing the GPU
#            through Ray (client_gpus auto); prints the clients' training seconds in all (goal <= 60 s)
#     bench  bench/gpu.py: fedslm's client step against a plain PEFT + bitsandbytes + Opacus loop
#     dputil (optional, minutes more) bench/dp_utility.py --gpu on triage at epsilon 8 and without DP
#     grads  (optional, about a minute) bench/grad_dtypes.py: per-sample gradients in bf16 and fp16
#            (with and without loss scaling) against fp32, on the GPU's own kernels
#
# Logs go to $OUT (default bench/out/gpu), at most 7 files: session.log (every stage's output and each
# run's summary.json), the end of each run's run.log, and the tables. A stage that fails is reported
# and the next one runs; the exit status is the number of failed stages.
# FEDSLM_SESSION_DEVICE (default cuda), FEDSLM_SESSION_SET (extra --set overrides for the
# federations) and FEDSLM_FED_SHAPE (fed1b's model shape, a bench/gpu.py one) let the same script be
# tried on a CPU first (see BENCHMARKS.md).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
KIT=${FEDSLM_KIT:-/tmp/fedslm-kit}
OUT=${OUT:-$REPO/bench/out/gpu}
PY=${PYTHON:-python3}
DEVICE=${FEDSLM_SESSION_DEVICE:-cuda}
read -r -a EXTRA <<<"${FEDSLM_SESSION_SET:-}"
RUNS=$KIT/runs

note() { echo "[gpu_session $(date +%H:%M:%S)] $*"; }  # in a stage, whose output session.log gets
say() { note "$@" | tee -a "$OUT/session.log"; }

stow() {
    mkdir -p "$KIT/parts"
    for part in "$@"; do
        [ -f "$part/kit.tar.xz.part" ] || { echo "gpu_session: $part holds no kit.tar.xz.part" >&2; exit 2; }
        cp -r "$part" "$KIT/parts/" && echo "stowed $(basename "$part") in $KIT/parts"
    done
    du -sh "$KIT/parts"/* 2>/dev/null
}

unpack() {
    [ -f "$KIT/site/.complete" ] && return 0
    local manifest
    manifest=$(ls "$KIT"/parts/*/manifest.json 2>/dev/null | head -1)
    [ -n "$manifest" ] || { say "no kit: stow its last part (the one with manifest.json) first"; return 1; }
    "$PY" - "$KIT" "$manifest" "$REPO/bench" <<'EOF' || return 1
import hashlib, json, sys
from pathlib import Path
kit, manifest = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
missing = [p for p in manifest["parts"] if not (kit / "parts" / p / "kit.tar.xz.part").is_file()]
if missing:
    sys.exit(f"gpu_session: kit parts missing: {missing} (stow them)")
sys.path.insert(0, sys.argv[3])
import torch
from gpu_kit import cuda_mismatch
why = cuda_mismatch(manifest["cuda_libs"], torch.version.cuda) if "cuda_libs" in manifest else None
if why:
    sys.exit(f"gpu_session: {why}")
h = hashlib.sha256()
with open(kit / "kit.tar.xz", "wb") as out:
    for p in sorted(manifest["parts"], key=lambda n: int(n.removeprefix("part"))):
        data = (kit / "parts" / p / "kit.tar.xz.part").read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["parts"][p]:
            sys.exit(f"gpu_session: {p} is damaged (SHA-256 differs from the manifest)")
        h.update(data)
        out.write(data)
if h.hexdigest() != manifest["archive_sha256"]:
    sys.exit("gpu_session: the joined kit differs from the manifest")
print(f"kit: {len(manifest['packages'])} packages for CPython {manifest['python']}")
EOF
    rm -rf "$KIT/site.tmp" && mkdir -p "$KIT/site.tmp" &&
        tar -C "$KIT/site.tmp" -xJf "$KIT/kit.tar.xz" &&
        rm -f "$KIT/kit.tar.xz" && rm -rf "$KIT/site" && mv "$KIT/site.tmp" "$KIT/site" &&
        touch "$KIT/site/.complete" && say "kit unpacked in $KIT/site"
}

fedslm() {
    "$PY" -c 'import sys; from fedslm.simulation.cli import console_main; sys.argv[0] = "fedslm"; sys.exit(console_main())' "$@"
}

keep() {  # a run's summary into session.log, the end of its run.log into $OUT (at most 7 files come back)
    local run=$1 name=$2
    [ -f "$run/summary.json" ] && echo "$name summary.json:" && cat "$run/summary.json" && echo
    [ -f "$run/run.log" ] && tail -n 400 "$run/run.log" >"$OUT/$name-run.log"
    return 0
}

training_seconds() {  # the clients' training seconds in all, from run.log's "client N round R: ... (X s)"
    "$PY" - "$1/run.log" <<'EOF'
import re, sys
times = [float(m) for m in re.findall(r"client \d+ round \d+: .*\(([\d.]+) s\)", open(sys.argv[1]).read())]
print(f"{len(times)} client trainings, {sum(times):.1f} s in all (longest {max(times, default=0):.1f} s)")
EOF
}

stage_env() {
    nvidia-smi || note "nvidia-smi failed"
    "$PY" - "$DEVICE" <<'EOF'
import sys, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if sys.argv[1].startswith("cuda"):
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(), "bf16", torch.cuda.is_bf16_supported())
import bitsandbytes as bnb, opacus, peft, transformers, flwr, ray
print("bitsandbytes", bnb.__version__, "opacus", opacus.__version__, "peft", peft.__version__,
      "transformers", transformers.__version__, "flwr", flwr.__version__, "ray", ray.__version__)
lin = bnb.nn.Linear4bit(576, 1536, bias=False, compute_dtype=torch.float32, quant_type="nf4")
lin = lin.to(sys.argv[1])
x = torch.randn(4, 576, device=sys.argv[1])
ref = x @ bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).t().float()
err = float((lin(x) - ref).abs().max() / ref.abs().max())
print(f"4-bit matmul on {sys.argv[1]}: max |error| vs the dequantized weight's, relative to max |output|: {err:.2e}")
if not err < 1e-4:  # fp32 rounding of the same products: ~1e-7 on a CPU
    sys.exit(f"the 4-bit kernel is off by {err:.2e} (more than 1e-4): bitsandbytes' library for this CUDA is suspect")
from fedslm.model import announce_hardware, resolve_hardware
from fedslm.config import ModelConfig
print("fedslm resolves:", resolve_hardware(ModelConfig(device="auto")))
EOF
}

stage_check() {
    fedslm check "$REPO/configs/demo.yaml" --set model.device="$DEVICE"
}

stage_demo() {
    local t0=$SECONDS
    rm -rf "$RUNS/demo"
    fedslm simulate "$REPO/configs/demo.yaml" --set model.device="$DEVICE" "${EXTRA[@]}" --out "$RUNS/demo" --no-progress
    local rc=$?
    note "demo: exit $rc in $((SECONDS - t0)) s; $(training_seconds "$RUNS/demo")"
    keep "$RUNS/demo" demo
    if [ "$rc" != 0 ]; then  # tell a Ray problem from a CUDA one: the same run with the clients in this process
        t0=$SECONDS
        rm -rf "$RUNS/demo-inprocess"
        fedslm simulate "$REPO/configs/demo.yaml" --set model.device="$DEVICE" --set federation.backend=inprocess \
            "${EXTRA[@]}" --out "$RUNS/demo-inprocess" --no-progress
        note "demo in-process (the stage still fails): exit $? in $((SECONDS - t0)) s"
        keep "$RUNS/demo-inprocess" demo-inprocess
    fi
    return $rc
}

stage_fed1b() {
    local shape=${FEDSLM_FED_SHAPE:-llama-3.2-1b} t0=$SECONDS
    local model=$KIT/models/$shape
    [ -f "$model/config.json" ] || "$PY" "$REPO/bench/gpu.py" --write-model "$shape" "$model" || return 1
    note "fed1b: random $shape-shaped model ready in $((SECONDS - t0)) s"
    rm -rf "$RUNS/fed1b"
    t0=$SECONDS
    fedslm simulate "$REPO/configs/demo.yaml" --set model.name="$model" --set model.device="$DEVICE" \
        --set federation.client_gpus=auto "${EXTRA[@]}" --out "$RUNS/fed1b" --no-progress
    local rc=$?
    note "fed1b: exit $rc in $((SECONDS - t0)) s; $(training_seconds "$RUNS/fed1b") (goal: <= 60 s in all)"
    keep "$RUNS/fed1b" fed1b
    return $rc
}

stage_bench() {
    "$PY" "$REPO/bench/gpu.py" --steps "${FEDSLM_BENCH_STEPS:-6}" | tee "$OUT/gpu-bench.txt"
}

stage_dputil() {
    "$PY" "$REPO/bench/dp_utility.py" --gpu --task triage --epsilons 8 none --out "$OUT/dp_utility.png" |
        tee "$OUT/dp-utility.txt"
}

stage_grads() {
    "$PY" "$REPO/bench/grad_dtypes.py" --device "$DEVICE"
}

case "${1:-}" in
    stow)
        shift
        stow "$@"
        ;;
    run)
        shift
        mkdir -p "$OUT"
        unpack || exit 100
        export PYTHONPATH="$KIT/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
        export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
        export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
        failed=0
        for stage in "$@"; do
            t0=$SECONDS
            say "---- $stage ----"
            if ! declare -F "stage_$stage" >/dev/null; then
                say "unknown stage $stage (env check demo fed1b bench dputil grads)"
                failed=$((failed + 1))
                continue
            fi
            "stage_$stage" 2>&1 | tee -a "$OUT/session.log"
            rc=${PIPESTATUS[0]}
            say "$stage: exit $rc after $((SECONDS - t0)) s"
            [ "$rc" = 0 ] || failed=$((failed + 1))
        done
        exit "$failed"
        ;;
    *)
        sed -n '2,21p' "$0" >&2
        exit 2
        ;;
esac
