"""The offline GPU kit (bench/gpu_kit.py) and its unpacking on the GPU machine (bench/gpu_session.sh):
parts joined in order and checked against the manifest, a damaged or missing part refused, nothing
unpacked half. Building a real kit needs the package index and is not run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SESSION = ROOT / "bench" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "bench"))

from gpu_kit import cuda_mismatch, sha256, split, strip  # noqa: E402


def _kit(tmp: Path, part_bytes: int, cuda_libs: list[str] | None = None) -> Path:
    """A kit of one module (and 300 kB of incompressible filler), split like gpu_kit.py splits."""
    site = tmp / "site"
    (site / "kitmod").mkdir(parents=True)
    (site / "kitmod" / "__init__.py").write_text("ANSWER = 42\n")
    (site / "filler.bin").write_bytes(os.urandom(300_000))
    archive = tmp / "kit.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(site, arcname=".")
    out = tmp / "gpu-kit"
    out.mkdir()
    parts = split(archive, out, part_bytes)
    manifest = {"python": "3.12", "packages": ["kitmod==1"], "archive_sha256": sha256(archive),
                "archive_bytes": archive.stat().st_size,
                "parts": {p.name: sha256(p / "kit.tar.xz.part") for p in parts}}  # fmt: skip
    if cuda_libs is not None:
        manifest["cuda_libs"] = cuda_libs
    (parts[-1] / "manifest.json").write_text(json.dumps(manifest))
    return out


def _session(*argv: str, kit: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FEDSLM_KIT=str(kit), OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SESSION), *argv], env=env, capture_output=True, text=True, timeout=120)


def test_parts_stowed_in_any_order_unpack_into_an_importable_site(tmp_path: Path) -> None:
    built = _kit(tmp_path, 120_000)
    parts = sorted(built.iterdir())
    assert [p.name for p in parts] == ["part1", "part2", "part3"]
    kit, out = tmp_path / "machine-kit", tmp_path / "out"
    for part in reversed(parts):
        assert _session("stow", str(part), kit=kit, out=out).returncode == 0
    done = _session("run", kit=kit, out=out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kit: 1 packages for CPython 3.12" in done.stdout
    site = kit / "site"
    assert (site / ".complete").is_file() and (site / "kitmod" / "__init__.py").read_text() == "ANSWER = 42\n"
    assert not (kit / "kit.tar.xz").exists()  # the joined archive is not kept beside the site
    imported = subprocess.run([sys.executable, "-c", "import kitmod; print(kitmod.ANSWER)"],
                              env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)  # fmt: skip
    assert imported.stdout.strip() == "42", imported.stderr
    assert "kit unpacked" in (out / "session.log").read_text()


def test_a_damaged_or_missing_part_is_refused_and_nothing_unpacks(tmp_path: Path) -> None:
    built = _kit(tmp_path, 120_000)
    kit, out = tmp_path / "machine-kit", tmp_path / "out"
    _session("stow", str(built / "part1"), str(built / "part3"), kit=kit, out=out)
    missing = _session("run", "env", kit=kit, out=out)
    assert missing.returncode == 100 and "kit parts missing: ['part2']" in missing.stderr
    _session("stow", str(built / "part2"), kit=kit, out=out)
    damaged = kit / "parts" / "part2" / "kit.tar.xz.part"
    data = bytearray(damaged.read_bytes())
    data[1000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    done = _session("run", kit=kit, out=out)
    assert done.returncode == 100 and "part2 is damaged" in done.stderr
    assert not (kit / "site").exists()


def test_bitsandbytes_kernels_of_another_cuda_major_are_refused_before_unpacking(tmp_path: Path) -> None:
    """bitsandbytes loads a kernel of torch's CUDA major only: a CUDA 13 kit on a CUDA 12 torch would
    fail at the first 4-bit layer, after the copies and the unpacking."""
    lent = ["cuda130", "cuda132"]
    assert cuda_mismatch(lent, "13.0") is None and cuda_mismatch(lent, "13.1") is None  # within a major
    assert cuda_mismatch(lent, None) is None  # a CPU build of torch: no kernel to load
    why = cuda_mismatch(lent, "12.8")
    assert why is not None and "CUDA 12.8" in why and "--cuda-libs cuda128" in why
    built = _kit(tmp_path, 10**6, cuda_libs=lent)
    kit, out = tmp_path / "machine-kit", tmp_path / "out"
    _session("stow", str(built / "part1"), kit=kit, out=out)
    fake = tmp_path / "cu128"  # a torch whose build says CUDA 12.8
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("class version:\n    cuda = '12.8'\n")
    env = dict(os.environ, FEDSLM_KIT=str(kit), OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(fake))
    done = subprocess.run(["bash", str(SESSION), "run"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 100 and "--cuda-libs cuda128" in done.stderr, done.stdout + done.stderr
    assert not (kit / "site").exists()
    assert _session("run", kit=kit, out=out).returncode == 0  # this CPU torch: nothing to check


def test_an_unknown_stage_is_counted_as_failed(tmp_path: Path) -> None:
    built = _kit(tmp_path, 10**6)
    kit, out = tmp_path / "machine-kit", tmp_path / "out"
    _session("stow", str(built / "part1"), kit=kit, out=out)
    done = _session("run", "warp", kit=kit, out=out)
    assert done.returncode == 1 and "unknown stage warp" in done.stdout


def test_the_kit_leaves_out_kernels_and_jars_a_gpu_run_never_loads(tmp_path: Path) -> None:
    libs = ["cpu", "cuda118", "cuda126", "cuda130", "cuda132", "rocm70"]
    for kind in libs:
        (tmp_path / "bitsandbytes").mkdir(exist_ok=True)
        (tmp_path / "bitsandbytes" / f"libbitsandbytes_{kind}.so").write_bytes(b"x" * 10)
    (tmp_path / "ray" / "jars").mkdir(parents=True)
    (tmp_path / "ray" / "jars" / "ray_dist.jar").write_bytes(b"j" * 5)
    (tmp_path / "ray" / "_raylet.so").write_bytes(b"r")
    assert strip(tmp_path, ("cuda130", "cuda132")) == 3 * 10 + 5
    kept = sorted(p.name for p in (tmp_path / "bitsandbytes").iterdir())
    assert kept == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
    assert (tmp_path / "ray" / "_raylet.so").is_file() and not (tmp_path / "ray" / "jars" / "ray_dist.jar").exists()


def test_the_usage_the_stages_and_the_unknown_stage_message_name_the_same_stages() -> None:
    import re

    text = SESSION.read_text()
    usage = text[text.index("run STAGE...") : text.index("# Logs go to")]
    listed = re.findall(r"^#     (\w+) ", usage, flags=re.M)
    defined = re.findall(r"^stage_(\w+)\(\) \{", text, flags=re.M)
    (named,) = re.findall(r"unknown stage \$stage \(([\w ]+)\)", text)
    assert listed == defined == named.split() == ["env", "check", "demo", "fed1b", "bench", "dputil", "grads"]
