"""The one preflight (server/preflight.py): every run mistake refused before Ray, Flower or a model
process starts, in one line that names the config file and the key (or the data file and line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fedslm.server.preflight import load_run, preflight, preflight_node

from fedslm.config import ConfigError, load_config
from fedslm.data import DataError
from fedslm.errors import FedslmError
from fedslm.modelinfo import (
    ADAPTABLE,
    ModelInfo,
    ModelLoadError,
    _meta_module_names,
    gguf_architecture,
    gguf_value,
    num_layers,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def _jsonl(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _qa(n: int, **extra: str) -> list[str]:
    return [json.dumps({"question": f"q{i}", "answer": f"a{i}", **extra}) for i in range(n)]


def _model_dir(tmp_path: Path, weights: bool) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        (d / "model.safetensors").write_bytes(b"")  # never read by the preflight
    return d


def _cases(tmp: Path) -> list[tuple[list[str], type[FedslmError], str]]:
    """(--set overrides, error class, what its one line must say)."""
    bad_line = _jsonl(tmp / "broken.jsonl", [*_qa(3), '{"question": "q", "answer": ', *_qa(2)])
    no_col = _jsonl(tmp / "nocol.jsonl", [json.dumps({"prompt": "p", "answer": "a"})] * 30)
    few = _jsonl(tmp / "few.jsonl", _qa(4))
    return [
        # the strategy: types against its constructor, values by building it
        (["strategy.name=fedadam", "strategy.params.eta=abc"], ConfigError,
         "strategy.params.eta: expected a number, got str 'abc'"),
        (["strategy.name=fedprox", "strategy.params.proximal_mu=true"], ConfigError,
         "strategy.params.proximal_mu: expected a number, got bool True"),
        (["strategy.name=krum", "strategy.params.num_malicious_nodes=1.5"], ConfigError,
         "strategy.params.num_malicious_nodes: expected an integer, got float 1.5"),
        (["strategy.name=trimmed-mean", "strategy.params.beta=0.7"], ConfigError,
         "strategy.params.beta must be in [0, 0.5), got 0.7"),
        (["strategy.name=norm-bound", "strategy.params.inner=fedadam", "strategy.params.inner_params={eta: -1}"],
         ConfigError, "server optimizer needs eta > 0"),
        (["strategy.name=norm-bound", "strategy.params.inner=fedavgx"], ConfigError, "unknown strategy 'fedavgx'"),
        # the data, partitioned as the clients will partition it
        (["data.partitioner=dirichlet", "data.dirichlet_alpha=0.01"], DataError,
         "data.partitioner 'dirichlet' (data.dirichlet_alpha=0.01) left client 0 without training records"),
        (["data.partitioner=iid", "federation.num_clients=300"], DataError,
         "spreads 216 training records (data.source 'triage', less the data.test_fraction=0.1 test split) over"
         " federation.num_clients=300: client 216 (and 83 more of 300) gets none"),
        ([f"data.source={few}", "data.partitioner=iid"], DataError,
         "spreads 3 training records (data.source"),
        ([f"data.source={tmp / 'missing.jsonl'}"], DataError, "missing.jsonl': no such file"),
        ([f"data.source={bad_line}"], DataError, "broken.jsonl:4: not a JSON object"),
        ([f"data.source={no_col}"], DataError, "has no column 'question'; its columns are ['answer', 'prompt']"),
        # the model, from its config only, and the LoRA targets of its architecture
        (["lora.target_modules=[q_proj, qv_proj]"], ModelLoadError,
         "lora.target_modules: ['qv_proj'] not in tiny-llama (llama); its adaptable layers are ['down_proj'"),
        (["lora.last_layers=3"], ModelLoadError, "lora.last_layers: 3 > the 2 layers of tiny-llama"),
        (["model.name=tiny-gpt9"], ModelLoadError, "model.name 'tiny-gpt9': unknown tiny family"),
        ([f"model.name={tmp}"], ModelLoadError, "is a directory without config.json, so it holds no model"),
        ([f"model.name={_model_dir(tmp, weights=False)}"], ModelLoadError, "has a config.json but no weights"),
        ([f"model.name={tmp / 'none.gguf'}"], ModelLoadError, "none.gguf': no such GGUF file"),
    ]  # fmt: skip


def test_each_preflight_error_names_the_file_and_the_key(tmp_path: Path) -> None:
    for overrides, cls, needle in _cases(tmp_path):
        with pytest.raises(cls) as err:
            load_run(TINY, overrides)
        message = str(err.value)
        assert message.startswith(f"{TINY}: ") and needle in message, (overrides, message)


def test_a_good_config_reports_what_the_run_will_meet() -> None:
    checked = preflight(load_config(TINY), TINY)
    assert checked.model is not None and checked.model.model_type == "llama"
    assert checked.lora_targets == ("q_proj", "v_proj")  # llama's default
    # 240 records, 24 held out (test_fraction 0.1), the 216 others split by hospital over 4 clients
    assert sum(checked.client_records) == 216 and len(checked.client_records) == 4
    assert min(checked.client_records) > 0 and checked.test_records == 16  # data.eval_size
    from fedslm.data import client_records
    from fedslm.model import cache_root

    cfg = checked.cfg
    sizes = [len(client_records(cfg.data, cache_root(cfg.model), c, 4).records) for c in range(4)]
    assert tuple(sizes) == checked.client_records  # exactly what each client will train on


def test_model_dir_with_weights_passes_without_reading_them(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, weights=True)  # an empty "weights" file: loading it would fail
    checked = preflight(load_config(TINY, [f"model.name={model}"]), TINY)
    assert checked.model is not None and checked.model.source == model


def test_bundled_gguf_architecture_from_its_header() -> None:
    from fedslm.modelinfo import locate_bundled_gguf

    t0 = time.perf_counter()
    assert gguf_architecture(locate_bundled_gguf()) == "llama"
    assert time.perf_counter() - t0 < 0.5  # the header only: the 100 MB of tensors are not read
    # lora.last_layers is checked against the layer count, from the same header (no transformers)
    info = ModelInfo("smollm2-135m-instruct", "llama", locate_bundled_gguf())
    assert gguf_value(info.source, "llama.block_count") == num_layers(info) == 30
    assert gguf_value(info.source, "no.such.key") is None


@pytest.mark.parametrize("task", sorted(ADAPTABLE))
def test_adaptable_layer_table_matches_each_architecture(task: str) -> None:
    """The fast path's table equals the Linear/Embedding leaves of each family built on the meta device."""
    import transformers

    from fedslm.tiny import DECODERS, FAMILIES

    families = sorted(FAMILIES) if task == "classification" else sorted(DECODERS)
    assert sorted(ADAPTABLE[task]) == families
    for family in families:
        config_name, _, kwargs = FAMILIES[family]
        config = getattr(transformers, config_name)(**kwargs).to_dict()
        names = _meta_module_names(ModelInfo(f"tiny-{family}", family, None, config), task)
        assert {n.rsplit(".", 1)[-1] for n in names} == ADAPTABLE[task][family], family


def test_dotted_target_is_matched_on_full_module_names() -> None:
    load_run(TINY, ["lora.target_modules=[self_attn.q_proj, mlp.down_proj]"])
    with pytest.raises(ModelLoadError, match=r"\['mlp.q_proj'\] not in tiny-llama"):
        load_run(TINY, ["lora.target_modules=[mlp.q_proj]"])


def test_classification_labels_are_checked_against_the_records(tmp_path: Path) -> None:
    rows = _qa(20, specialty="cardiology") + _qa(1, specialty="oncology")
    src = _jsonl(tmp_path / "cls.jsonl", rows)
    sets = ["task=classification", f"data.source={src}", "data.partitioner=iid", "data.labels=[cardiology, x]"]
    with pytest.raises(DataError, match=r"record 21: label 'oncology' of column 'specialty'"):
        load_run(TINY, sets)


def test_server_scope_leaves_partitions_to_the_nodes() -> None:
    """A deployed run's ServerApp: nodes bring their own files, so the simulated split is not checked;
    the model and its LoRA targets are (the server loads it to evaluate)."""
    from fedslm.server.app import config_from_context

    skewed = "data.partitioner=dirichlet,data.dirichlet_alpha=0.01"
    cfg, _, _ = config_from_context(SimpleNamespace(run_config={"config": TINY, "set": skewed}))
    assert cfg.data.dirichlet_alpha == 0.01
    with pytest.raises(ModelLoadError, match="lora.target_modules"):
        config_from_context(SimpleNamespace(run_config={"config": TINY, "set": "lora.target_modules=[nope]"}))


def test_node_preflight_reads_its_file_as_its_clients_will(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    good = _jsonl(tmp_path / "good.jsonl", _qa(12))
    assert preflight_node(good, cfg, TINY) == 12 and preflight_node(good) == 12
    no_col = _jsonl(tmp_path / "nocol.jsonl", [json.dumps({"prompt": "p", "answer": "a"})])
    with pytest.raises(DataError, match=r"tiny.yaml: data.source '.*nocol.jsonl' has no column 'question'"):
        preflight_node(no_col, cfg, TINY)
    broken = _jsonl(tmp_path / "broken.jsonl", [*_qa(1), "{oops"])
    with pytest.raises(DataError, match=r"broken.jsonl:2: not a JSON object"):
        preflight_node(broken)  # no --config: the file must still parse
    with pytest.raises(ConfigError, match=r"unknown client profile 'phone'"):
        preflight_node(good, cfg, TINY, profile="phone")


# -- from the command line: exit 2, one line, no traceback, before Ray, in under 3 s -----------------

_PROBE = (
    "import sys, time; t0 = time.perf_counter(); from fedslm.simulation.cli import main; rc = main(sys.argv[1:]); "
    "print(f'probe: {time.perf_counter() - t0:.3f} ray={\"ray\" in sys.modules}', file=sys.stderr); sys.exit(rc)"
)


def _cli(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["check", TINY, "--set", "strategy.name=fedadam", "--set", "strategy.params.eta=abc"],
         "strategy.params.eta: expected a number"),
        (["simulate", TINY, "--out", "RUN", "--set", "data.partitioner=dirichlet", "--set", "data.dirichlet_alpha=.01"],
         "left client 0 without training records; raise data.dirichlet_alpha"),
        (["simulate", TINY, "--out", "RUN", "--set", "lora.target_modules=[nope]"], "lora.target_modules: ['nope']"),
    ],
)  # fmt: skip
def test_cli_refuses_before_ray_in_under_3_s(argv: list[str], needle: str, tmp_path: Path) -> None:
    proc, wall = _cli(*(str(tmp_path / "run") if a == "RUN" else a for a in argv), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedslm: ")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "probe:" in proc.stderr and "ray=False" in proc.stderr  # Ray was never imported, let alone started
    assert wall < 3.0, f"{wall:.2f} s (whole process, interpreter start included; shared busy machine)"
    assert not (tmp_path / "run").exists()  # no run directory was made


def test_node_cli_refuses_a_broken_data_file_before_starting(tmp_path: Path) -> None:
    broken = _jsonl(tmp_path / "broken.jsonl", [*_qa(2), "{oops"])
    proc, wall = _cli("node", "--insecure", "--data", str(broken), "--config", TINY, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedslm: ")]
    assert len(lines) == 1 and "broken.jsonl:3: not a JSON object" in lines[0], proc.stderr
    assert "ray=False" in proc.stderr and wall < 3.0
