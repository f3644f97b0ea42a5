"""Config validation: bad input fails at load, naming the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedslm.server.preflight import load_run

from fedslm.config import ConfigError, RunConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("model:\n  nmae: x\n", ["run.yaml", "model.nmae", "unknown key", "'name'"]),
        ("bogus: 1\n", ["bogus", "unknown key", "'federation'"]),
        ("model:\n  quantization: fp4\n", ["model.quantization", "'fp4'", "'nf4'", "'int8'", "'none'"]),
        ("train:\n  local_steps: ten\n", ["train.local_steps", "expected an integer", "'ten'"]),
        ("train:\n  local_steps: 0\n", ["train.local_steps", ">= 1"]),
        ("lora:\n  r: 0\n", ["lora.r", "not in [1, 512]"]),
        ("privacy:\n  mode: strong\n", ["privacy.mode", "'local'", "'central'"]),
        ("federation:\n  num_clients: 2\n  min_train_clients: 3\n", ["federation.min_train_clients", "num_clients=2"]),
        ("strategy:\n  name: fedavgx\n", ["strategy", "fedavgx", "fedavg"]),
        ("model: [1, 2]\n", ["model", "mapping"]),
        ("train:\n  learning_rate: true\n", ["train.learning_rate", "expected a number"]),
        ("train:\n  optimizer: lion\n", ["train.optimizer", "'lion'", "'adamw'", "'sgd'"]),
        ("train:\n  optimizer: sgd\n  momentum: 1.0\n", ["train.momentum", "1.0 not in [0, 1)"]),
        ("train:\n  momentum: -0.1\n", ["train.momentum", "-0.1 not in [0, 1)"]),
        ("eval:\n  per_client: sometimes\n", ["eval.per_client", "'sometimes' is not bool | 'last'"]),
        (
            "train:\n  length_bucketing: true\nprivacy:\n  mode: local\n",
            ["train.length_bucketing", "privacy.mode", "Poisson"],
        ),
    ],
)
def test_bad_configs_fail_with_file_key_and_allowed_values(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_run(_write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_unknown_strategy_parameter_lists_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.params\.mu.*allowed"):
        load_run(_write(tmp_path, "strategy:\n  name: fedavg\n  params: {mu: 0.1}\n"))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  local_steps: 3\n")
    cfg = load_config(path, ["train.local_steps=7", "privacy.mode=local", "lora.target_modules=[q_proj]"])
    assert cfg.train.local_steps == 7 and cfg.privacy.mode == "local" and cfg.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match="train.local_steps"):
        load_config(path, ["train.local_steps=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.local_steps"])


def test_ints_accepted_for_floats_and_round_trip() -> None:
    cfg = config_from_dict({"train": {"weight_decay": 0}, "privacy": {"target_epsilon": 3}})
    assert isinstance(cfg.train.weight_decay, float) and isinstance(cfg.privacy.target_epsilon, float)
    again = config_from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


def test_defaults_and_derived_figures() -> None:
    cfg = RunConfig()
    assert cfg.model.quantization == "nf4" and cfg.strategy.name == "fedavg"
    cfg = config_from_dict({"federation": {"num_clients": 10, "fraction_train": 0.3, "min_train_clients": 2}})
    assert cfg.federation.clients_per_round == 3


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    load_config(path)


def test_base_config_is_merged_and_overridden(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  local_steps: 4\n  batch_size: 2\nstrategy:\n  name: fedavg\n")
    child = _write(tmp_path, "base: base.yaml\ntrain:\n  local_steps: 9\n")
    cfg = load_config(child)
    assert (cfg.train.local_steps, cfg.train.batch_size) == (9, 2)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
