"""Records, splits, partitions and tokenized batches.

- ``load_records``: the bundled triage data (generated, written once to the cache), a local
  JSONL/CSV/Parquet file, or a ``datasets`` hub name when online; columns come from the config.
- ``split``: a held-out global test split no client ever sees.
- ``partition``: IID, Dirichlet(alpha) over a label column, or natural (one client per value of a
  client column); deterministic for a seed, disjoint, covering.
- ``encode`` / ``collate``: chat-template formatting, loss on response tokens only, fixed max length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import triage
from .config import DataConfig
from .errors import FedslmError
from .fs import atomic_write
from .logs import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

IGNORE = -100


class DataError(FedslmError, ValueError):
    """Data could not be loaded or split as configured (names the file/column and the fix)."""


# -- records ---------------------------------------------------------------------------------


def _triage_file(cfg: DataConfig, cache: Path) -> Path:
    path = cache / "data" / f"triage-n{cfg.num_records}-s{cfg.seed}.jsonl"
    if not path.is_file():
        atomic_write(path, "".join(json.dumps(rec) + "\n" for rec in triage.generate(cfg.num_records, cfg.seed)))
    return path


def load_records(cfg: DataConfig, cache: Path) -> list[dict[str, Any]]:
    """All records of the configured source, checked for the configured columns.

    Values arrive as written: JSONL through ``json`` and CSV through ``csv`` (text stays text, "007"
    is not turned into 7.0), and a record whose prompt or response is missing, null or empty is refused
    with its file and line instead of training on "nan".
    """
    if cfg.source == "triage":
        path = _triage_file(cfg, cache)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        lines = list(range(1, len(records) + 1))
    else:
        records, lines = read_records(cfg.source)
    if not records:
        raise DataError(f"data.source {cfg.source!r} has no records")
    for col in (cfg.prompt_column, cfg.response_column):
        if col not in records[0]:
            raise DataError(f"data.source {cfg.source!r} has no column {col!r}; its columns are {sorted(records[0])}")
    key = {cfg.prompt_column: "data.prompt_column", cfg.response_column: "data.response_column"}
    for rec, line in zip(records, lines, strict=True):
        for col in (cfg.prompt_column, cfg.response_column):
            value = rec.get(col)
            if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
                raise DataError(
                    f"{cfg.source}:{line}: column {col!r} ({key[col]}) is empty or null; fill it or remove the record"
                )
    return records


def read_records(source: str) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, the file line of each record) of a local file, or of a hub dataset when online."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv", ".parquet"):
        if not path.is_file():
            raise DataError(f"data.source {source!r}: no such file")
        if suffix == ".jsonl":
            return _read_jsonl(path, source)
        if suffix == ".csv":
            return _read_csv(path, source)
        return _read_parquet(path, source)
    if path.exists():
        raise DataError(f"data.source {source!r}: unsupported file type; use .jsonl, .csv or .parquet")
    try:
        from datasets import load_dataset

        records = list(load_dataset(source, split="train"))
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise DataError(
            f"data.source {source!r} is not 'triage', a .jsonl/.csv/.parquet file or a reachable"
            f" dataset ({type(e).__name__}: {e})"
        ) from None
    return records, list(range(1, len(records) + 1))


def read_text(path: Path, source: str) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped); a byte that is not UTF-8 is a
    :class:`DataError` naming the file, the line and the encoding expected."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{source}:{line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8; the file must be"
            " UTF-8 encoded (re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_parquet(path: Path, source: str) -> tuple[list[dict[str, Any]], list[int]]:
    import pandas as pd
    import pyarrow as pa

    try:
        records = pd.read_parquet(path).to_dict("records")
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return records, list(range(1, len(records) + 1))


def _read_jsonl(path: Path, source: str) -> tuple[list[dict[str, Any]], list[int]]:
    records, lines = [], []
    # split on "\n" only: str.splitlines also splits inside a JSON string holding U+2028 or \x1c
    for number, line in enumerate(read_text(path, source).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{number}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{source}:{number}: expected a JSON object per line, got {type(rec).__name__}")
        records.append(rec)
        lines.append(number)
    return records, lines


def _read_csv(path: Path, source: str) -> tuple[list[dict[str, Any]], list[int]]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(read_text(path, source), newline=""))
    records, lines = [], []
    try:
        for rec in reader:
            if None in rec:  # more fields than the header names
                header = len(reader.fieldnames or [])
                raise DataError(f"{source}:{reader.line_num}: more fields than the header's {header}")
            records.append(rec)
            lines.append(reader.line_num)
    except csv.Error as e:  # e.g. a field over the csv module's size limit (128 Ki characters)
        raise DataError(f"{source}:{reader.reader.line_num}: not valid CSV ({e})") from None
    return records, lines


def split(records: list[dict[str, Any]], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(train indices, held-out test indices), seeded."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(records))
    n_test = max(1, int(round(len(records) * cfg.test_fraction)))
    return sorted(order[n_test:].tolist()), sorted(order[:n_test].tolist())


# -- partitioning ----------------------------------------------------------------------------


def partition(records: list[dict[str, Any]], indices: list[int], num_clients: int, cfg: DataConfig) -> list[list[int]]:
    """Split ``indices`` over ``num_clients``: disjoint, covering, deterministic for ``cfg.seed``.

    A client left without records is refused (:class:`DataError` naming it and the partitioner
    setting that caused it): it could only fail every round it is sampled for.
    """
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    rng = np.random.default_rng(cfg.seed + 1)
    idx = np.asarray(indices)
    if cfg.partitioner == "iid":
        parts = [sorted(p.tolist()) for p in np.array_split(rng.permutation(idx), num_clients)]
    elif cfg.partitioner == "natural":
        parts = _natural(records, idx, num_clients, cfg)
    else:
        parts = _dirichlet(records, idx, num_clients, cfg, rng)
    empty = [c for c, p in enumerate(parts) if not p]
    if empty:
        raise DataError(_empty_client_message(empty, len(indices), num_clients, cfg))
    return parts


def _empty_client_message(empty: list[int], n_train: int, n: int, cfg: DataConfig) -> str:
    who = f"client {empty[0]}" + (f" (and {len(empty) - 1} more of {n})" if len(empty) > 1 else "")
    if cfg.partitioner == "dirichlet":
        return (
            f"data.partitioner 'dirichlet' (data.dirichlet_alpha={cfg.dirichlet_alpha}) left {who} without training"
            " records; raise data.dirichlet_alpha or data.num_records, or change data.seed"
        )
    return (
        f"data.partitioner {cfg.partitioner!r} spreads {n_train} training records (data.source {cfg.source!r},"
        f" less the data.test_fraction={cfg.test_fraction} test split) over federation.num_clients={n}: {who}"
        " gets none; lower federation.num_clients or add records"
    )


def _column(records: list[dict[str, Any]], idx: np.ndarray, col: str, partitioner: str) -> list[Any]:
    if col not in records[0]:
        raise DataError(f"data.partitioner {partitioner!r} needs column {col!r}; columns are {sorted(records[0])}")
    return [records[i][col] for i in idx]


def _natural(records: list[dict[str, Any]], idx: np.ndarray, n: int, cfg: DataConfig) -> list[list[int]]:
    values = _column(records, idx, cfg.client_column, "natural")
    groups = sorted(set(map(str, values)))
    if n > len(groups):
        raise DataError(
            f"data.partitioner 'natural': {len(groups)} distinct values of {cfg.client_column!r}"
            f" ({groups}) cannot serve {n} clients; lower federation.num_clients or use 'dirichlet'"
        )
    # several groups per client when there are more groups than clients (round-robin, sorted)
    owner = {g: i % n for i, g in enumerate(groups)}
    parts: list[list[int]] = [[] for _ in range(n)]
    for i, v in zip(idx.tolist(), values, strict=True):
        parts[owner[str(v)]].append(i)
    return [sorted(p) for p in parts]


def _dirichlet(
    records: list[dict[str, Any]], idx: np.ndarray, n: int, cfg: DataConfig, rng: np.random.Generator
) -> list[list[int]]:
    labels = np.asarray([str(v) for v in _column(records, idx, cfg.label_column, "dirichlet")])
    parts: list[list[int]] = [[] for _ in range(n)]
    for label in sorted(set(labels.tolist())):
        members = rng.permutation(idx[labels == label])
        shares = rng.dirichlet([cfg.dirichlet_alpha] * n)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for c, chunk in enumerate(np.split(members, cuts)):
            parts[c].extend(chunk.tolist())
    return [sorted(p) for p in parts]


@dataclass
class ClientData:
    """What one client sees: its own training records (and nothing else)."""

    partition_id: int
    records: list[dict[str, Any]]


def client_partitions(
    cfg: DataConfig, cache: Path, num_partitions: int, records: list[dict[str, Any]] | None = None
) -> list[list[dict[str, Any]]]:
    """The training records of every simulated client, in client-id order (what each one trains on;
    the preflight calls this too, so that it refuses exactly what the run would meet). ``records``:
    :func:`load_records` of ``cfg`` when the caller has them already."""
    records = load_records(cfg, cache) if records is None else records
    train_idx, _ = split(records, cfg)
    return [[records[i] for i in part] for part in partition(records, train_idx, num_partitions, cfg)]


def client_records(cfg: DataConfig, cache: Path, partition_id: int, num_partitions: int) -> ClientData:
    """The training records of one simulated client (built deterministically, on demand)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} not in [0, {num_partitions})")
    return ClientData(partition_id, client_partitions(cfg, cache, num_partitions)[partition_id])


def test_records(cfg: DataConfig, cache: Path) -> list[dict[str, Any]]:
    """The held-out global test split (the server's; clients never see it)."""
    records = load_records(cfg, cache)
    _, test_idx = split(records, cfg)
    test = [records[i] for i in test_idx]
    return test[: cfg.eval_size] if cfg.eval_size else test


# -- tokenization ------------------------------------------------------------------------------


def prompt_text(tokenizer: Any, prompt: str, system: str) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, prompt: str, system: str) -> list[int]:
    """Token ids of the chat prompt, up to where the answer starts."""
    return tokenizer(prompt_text(tokenizer, prompt, system), add_special_tokens=False)["input_ids"]


def encode(tokenizer: Any, prompt: str, response: str, max_length: int, system: str) -> dict[str, list[int]]:
    """Token ids and labels of one example; labels are IGNORE on the prompt (loss on the answer)."""
    p_ids = prompt_ids(tokenizer, prompt, system)
    r_ids = tokenizer(str(response) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if len(r_ids) >= max_length:
        raise DataError(f"an answer of {len(r_ids)} tokens does not fit model.max_length={max_length}")
    p_ids = p_ids[-(max_length - len(r_ids)) :]  # keep the end of an over-long prompt
    return {"input_ids": p_ids + r_ids, "labels": [IGNORE] * len(p_ids) + r_ids}


def encode_all(
    tokenizer: Any,
    records: list[dict[str, Any]],
    cfg: DataConfig,
    max_length: int,
    labels: list[str] | None = None,
    *,
    chat: bool = False,
) -> list[dict[str, Any]]:
    """Tokenized examples: generation (prompt -> response) or, with ``labels``, classification of the
    raw prompt, or with ``chat`` of the chat prompt up to where the answer starts (its end kept)."""
    if labels is not None:
        index = {name: i for i, name in enumerate(labels)}
        out = []
        for r in records:
            value = str(r[cfg.label_column])
            if value not in index:
                raise DataError(f"label {value!r} of column {cfg.label_column!r} is not one of data.labels {labels}")
            text = str(r[cfg.prompt_column])
            if chat:  # the end kept, as for generation
                ids = prompt_ids(tokenizer, text, cfg.system_prompt)[-max_length:]
            else:
                ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            out.append({"input_ids": ids, "label": index[value]})
        return out
    return [
        encode(tokenizer, str(r[cfg.prompt_column]), str(r[cfg.response_column]), max_length, cfg.system_prompt)
        for r in records
    ]


def label_names(cfg: DataConfig, records: list[dict[str, Any]]) -> list[str]:
    """The class names: ``data.labels`` if given, else the sorted values of ``data.label_column``."""
    if cfg.labels:
        return list(cfg.labels)
    if cfg.label_column not in records[0]:
        raise DataError(f"classification needs column {cfg.label_column!r}; columns are {sorted(records[0])}")
    return sorted({str(r[cfg.label_column]) for r in records})


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, and labels (per token, IGNORE on padding and
    prompt; or one class index per example for classification)."""
    import torch  # the preflight reads and partitions the data without torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
    if "label" in examples[0]:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
