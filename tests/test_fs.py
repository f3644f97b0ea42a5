"""fedslm.fs: a failed write leaves the old file or directory untouched and no temp behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedslm.fs import OutDirError, atomic_dir, atomic_file, atomic_write, check_out_dir, clear_dir


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


def test_check_out_dir_refuses_a_non_empty_folder_or_a_file(tmp_path: Path) -> None:
    assert check_out_dir(tmp_path / "new") == ()  # new: nothing to replace
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == ()
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("a", "b", "c", "d", "e", "f"):
        (mine / name).write_text(name)
    with pytest.raises(OutDirError) as err:
        check_out_dir(mine, hint="resume it")
    assert str(err.value) == (
        f"--out {mine} exists and is not empty (6 entries: a, b, c, d, e, ...);"
        " resume it, or pass --force to replace it"
    )
    assert check_out_dir(mine, force=True) == ("a", "b", "c", "d", "e", "f")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutDirError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "file", force=True)
    assert len(list(mine.iterdir())) == 6  # checking never touches anything


def test_force_never_replaces_what_the_command_reads_or_the_current_or_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("{}\n")
    with pytest.raises(OutDirError, match=r"holds .*train.jsonl, which --force would delete"):
        check_out_dir(project, force=True, reads=[project / "data" / "train.jsonl"])
    monkeypatch.chdir(project / "data")
    with pytest.raises(OutDirError, match="which --force would delete"):
        check_out_dir(project, force=True)  # an ancestor of the current directory
    with pytest.raises(OutDirError, match="which --force would delete"):
        check_out_dir(".", force=True)
    monkeypatch.setenv("HOME", str(project))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutDirError, match="which --force would delete"):
        check_out_dir(project, force=True)
    assert (project / "data" / "train.jsonl").read_text() == "{}\n"


def test_clear_dir_removes_files_folders_and_links_not_their_targets(tmp_path: Path) -> None:
    keep = tmp_path / "elsewhere"
    keep.mkdir()
    (keep / "x").write_text("x")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "f").write_text("f")
    (out / "g").write_text("g")
    (out / "link").symlink_to(keep, target_is_directory=True)
    clear_dir(out)
    assert list(out.iterdir()) == [] and (keep / "x").read_text() == "x"


def test_atomic_write_gives_the_mode_open_would_and_keeps_an_existing_one(tmp_path: Path) -> None:
    import os

    old = os.umask(0o027)
    try:
        new = atomic_write(tmp_path / "new.json", "{}")
        assert stat.S_IMODE(new.stat().st_mode) == 0o640  # 0o666 less the umask, as open(path, "w")
    finally:
        os.umask(old)
    (tmp_path / "mine.toml").write_text("a = 1\n")
    (tmp_path / "mine.toml").chmod(0o604)
    atomic_write(tmp_path / "mine.toml", "a = 2\n")
    assert stat.S_IMODE((tmp_path / "mine.toml").stat().st_mode) == 0o604  # the user's choice stays
    atomic_write(tmp_path / "ro.txt", "x", mode=0o444)  # read-only: written first, then locked
    assert stat.S_IMODE((tmp_path / "ro.txt").stat().st_mode) == 0o444 and (tmp_path / "ro.txt").read_text() == "x"
    atomic_write(tmp_path / "ro.txt", "y")  # replacing it keeps it read-only
    assert stat.S_IMODE((tmp_path / "ro.txt").stat().st_mode) == 0o444 and (tmp_path / "ro.txt").read_text() == "y"
