"""fedslm.fs: a failed write leaves the old file or directory untouched and no temp behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedslm.fs import atomic_dir, atomic_file, atomic_write


def test_atomic_write_replaces_and_sets_mode(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.json"
    atomic_write(p, "one")
    atomic_write(p, b"two", mode=0o600)
    assert p.read_text() == "two"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


def test_failed_file_write_keeps_the_old_one(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]


def test_atomic_dir_replaces_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "round-001"
    target.mkdir()
    (target / "stale.bin").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(x.name for x in target.iterdir()) == ["new.bin"]
    assert [x.name for x in tmp_path.iterdir()] == ["round-001"]  # no temp or old copy left


def test_failed_dir_write_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "round-001"
    target.mkdir()
    (target / "a").write_text("kept")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash")
    assert (target / "a").read_text() == "kept"
    assert [x.name for x in tmp_path.iterdir()] == ["round-001"]


def test_keep_existing_keeps_the_first_writer(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("first")
    with atomic_dir(target, keep_existing=lambda t: (t / "w").is_file()) as tmp:
        (tmp / "w").write_text("second")
    assert (target / "w").read_text() == "first"
    assert [x.name for x in tmp_path.iterdir()] == ["model"]
