"""Data: generated triage records, local files, partitioners, response-only labels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from fedslm import data, triage
from fedslm.config import DataConfig


def test_generation_is_deterministic_and_non_iid() -> None:
    a, b = triage.generate(400, seed=1), triage.generate(400, seed=1)
    assert a == b and a != triage.generate(400, seed=2)
    heart = Counter(r["specialty"] for r in a if r["hospital"] == "st-heart")
    derm = Counter(r["specialty"] for r in a if r["hospital"] == "riverside-clinic")
    assert heart.most_common(1)[0][0] == "Cardiology" and derm["Cardiology"] < heart["Cardiology"] / 3
    assert all(r["answer"] in triage.SPECIALTIES for r in a)


@pytest.mark.parametrize("partitioner", ["iid", "natural", "dirichlet"])
def test_partitions_are_disjoint_covering_and_deterministic(tmp_path: Path, partitioner: str) -> None:
    cfg = DataConfig(partitioner=partitioner, num_records=400)
    records = data.load_records(cfg, tmp_path)
    train, test = data.split(records, cfg)
    assert len(test) == 40 and not set(train) & set(test) and len(train) + len(test) == 400
    parts = data.partition(records, train, 4, cfg)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == sorted(train) and len(flat) == len(set(flat))
    assert parts == data.partition(records, train, 4, cfg)
    sizes = [len(p) for p in parts]
    if partitioner == "iid":
        assert max(sizes) - min(sizes) <= 1
    if partitioner == "natural":
        assert [{records[i]["hospital"] for i in p} for p in parts] == [{h} for h in sorted(triage.HOSPITALS)]


def test_dirichlet_small_alpha_is_more_skewed(tmp_path: Path) -> None:
    def skew(alpha: float) -> float:
        cfg = DataConfig(partitioner="dirichlet", dirichlet_alpha=alpha, num_records=1200, seed=3)
        records = data.load_records(cfg, tmp_path)
        train, _ = data.split(records, cfg)
        parts = data.partition(records, train, 4, cfg)
        return sum(Counter(records[i]["specialty"] for i in p).most_common(1)[0][1] / len(p) for p in parts) / 4

    assert skew(0.1) > skew(100.0) + 0.2


def test_natural_partitioner_errors_name_the_fix(tmp_path: Path) -> None:
    cfg = DataConfig(partitioner="natural", num_records=100)
    records = data.load_records(cfg, tmp_path)
    with pytest.raises(data.DataError, match="cannot serve 9 clients"):
        data.partition(records, list(range(100)), 9, cfg)
    merged = data.partition(records, list(range(100)), 2, cfg)  # 4 hospitals over 2 clients
    assert sum(map(len, merged)) == 100


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_user_files_with_own_columns(tmp_path: Path, suffix: str) -> None:
    rows = [{"q": f"question {i}", "a": f"answer {i}", "site": f"s{i % 3}"} for i in range(30)]
    path = tmp_path / f"mine{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    cfg = DataConfig(source=str(path), prompt_column="q", response_column="a", client_column="site")
    records = data.load_records(cfg, tmp_path)
    assert [r["q"] for r in records] == [r["q"] for r in rows]
    parts = data.partition(records, list(range(30)), 3, cfg)
    assert [len(p) for p in parts] == [10, 10, 10]
    with pytest.raises(data.DataError, match="no column 'question'.*'a', 'q', 'site'"):
        data.load_records(DataConfig(source=str(path)), tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_user_text_arrives_as_written(tmp_path: Path, suffix: str) -> None:
    """ "007" stays "007" (no type guessing), and a null or empty answer is refused with file:line."""
    path = tmp_path / f"codes{suffix}"
    if suffix == ".jsonl":
        path.write_text('{"q": "code?", "a": "007"}\n{"q": "zip?", "a": "01234"}\n')
    else:
        path.write_text("q,a\ncode?,007\nzip?,01234\n")
    cfg = DataConfig(source=str(path), prompt_column="q", response_column="a")
    assert [r["a"] for r in data.load_records(cfg, tmp_path)] == ["007", "01234"]
    if suffix == ".jsonl":
        path.write_text('{"q": "code?", "a": "007"}\n{"q": "zip?", "a": null}\n')
    else:
        path.write_text("q,a\ncode?,007\nzip?,\n")
    line = 2 if suffix == ".jsonl" else 3  # the CSV header is line 1
    refused = rf"codes\{suffix}:{line}: column 'a' \(data.response_column\) is empty or null"
    with pytest.raises(data.DataError, match=refused):
        data.load_records(cfg, tmp_path)


def test_broken_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"q": "a", "a": "b"}\n\n{"q": "c", "a": \n')
    with pytest.raises(data.DataError, match=r"broken.jsonl:3: not a JSON object"):
        data.load_records(DataConfig(source=str(path), prompt_column="q", response_column="a"), tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_file_not_in_utf8_names_the_line_and_the_encoding(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    if suffix == ".jsonl":
        text = '{"q": "a", "a": "b"}\n{"q": "c", "a": "d"}\n{"q": "caf\u00e9?", "a": "oui"}\n'
    else:
        text = "q,a\na,b\nc,d\ncaf\u00e9?,oui\n"
    path.write_bytes(text.encode("latin-1"))  # "é" is the one byte 0xe9, not UTF-8
    line = 3 if suffix == ".jsonl" else 4
    cfg = DataConfig(source=str(path), prompt_column="q", response_column="a")
    with pytest.raises(data.DataError) as err:
        data.load_records(cfg, tmp_path)
    assert str(err.value).startswith(f"{path}:{line}: byte 0xe9 at column ")
    assert "must be UTF-8 encoded" in str(err.value)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark (Excel's CSV)
    assert [r["q"] for r in data.load_records(cfg, tmp_path)] == ["a", "c", "caf\u00e9?"]


def test_jsonl_text_with_unicode_line_separators_arrives_as_written(tmp_path: Path) -> None:
    path = tmp_path / "seps.jsonl"
    answers = ["one\u2028two", "x\x1cy", "p\u0085q"]  # str.splitlines would cut each of these in two
    path.write_text("".join(json.dumps({"q": "?", "a": a}, ensure_ascii=False) + "\n" for a in answers), "utf-8")
    cfg = DataConfig(source=str(path), prompt_column="q", response_column="a")
    assert [r["a"] for r in data.load_records(cfg, tmp_path)] == answers


def test_corrupt_parquet_and_bad_csv_are_data_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    pd.DataFrame({"q": ["a"] * 10, "a": ["b"] * 10}).to_parquet(path)
    path.write_bytes(path.read_bytes()[:40] + b"\0" * 40)  # a truncated, overwritten file
    with pytest.raises(data.DataError, match=rf"^{path}: not a readable Parquet file \(Arrow"):
        data.load_records(DataConfig(source=str(path), prompt_column="q", response_column="a"), tmp_path)
    path = tmp_path / "huge.csv"
    path.write_text("q,a\na,b\nc," + "d" * 200_000 + "\n")  # over the csv module's 131072-character field limit
    with pytest.raises(data.DataError, match=rf"^{path}:3: not valid CSV \(field larger than field limit"):
        data.load_records(DataConfig(source=str(path), prompt_column="q", response_column="a"), tmp_path)


def test_bad_source_errors(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.load_records(DataConfig(source=str(tmp_path / "x.txt")), tmp_path)
    with pytest.raises(data.DataError, match="no such file"):
        data.load_records(DataConfig(source=str(tmp_path / "absent.csv")), tmp_path)


def test_loss_only_on_response_tokens(tiny_peft) -> None:
    tok = tiny_peft.base.tokenizer
    ex = data.encode(tok, "Chest pain. Which department?", "Cardiology", 96, "Answer with the department only.")
    labelled = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != data.IGNORE]
    assert tok.decode(labelled) == "Cardiology" + tok.eos_token
    assert ex["labels"][: len(ex["labels"]) - len(labelled)] == [data.IGNORE] * (len(ex["labels"]) - len(labelled))
    assert "<|im_start|>assistant" in tok.decode(ex["input_ids"])
    short = data.encode(tok, "word " * 200, "Cardiology", 32, "")
    assert len(short["input_ids"]) == 32 and short["labels"][-len(labelled) :] == labelled
    batch = data.collate([ex, short], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(ex["input_ids"]), 32))
    assert int(batch["attention_mask"].sum()) == len(ex["input_ids"]) + 32
