"""The only writers of files that must survive a crash: write a temp beside the target, fsync, rename.

A crash (or ``kill -9``) at any point leaves either the old file or directory or the new one, never
a torn one; the parent directory is fsynced so the rename itself is durable. :func:`check_out_dir` is
the one ``--out`` refusal: a folder that exists and is not empty is the user's, replaced only under
``--force``.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import FedslmError


class OutDirError(FedslmError, ValueError):
    """An output folder that would overwrite the user's files (names it and what to do instead)."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread at once)."""
    try:
        with Path("/proc/self/status").open(encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; once the block succeeds it replaces ``path`` (fsynced).

    ``mode`` (e.g. ``0o600``) is set on the temp file before anything is written into it; by default
    the file keeps the mode of the one it replaces, and a new one gets what ``open(path, "w")`` gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        if mode != 0o600:  # mkstemp's own; the owner may write it until the block ends
            tmp.chmod(mode | stat.S_IWUSR)
        yield tmp
        if not mode & stat.S_IWUSR:
            tmp.chmod(mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int | None = None) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically and durably."""
    with atomic_file(path, mode) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_dir(target: str | os.PathLike[str], keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp directory beside ``target``; once the block succeeds it becomes ``target``.

    Every file in it is fsynced first. An existing ``target`` is replaced (it is moved aside, the new
    one renamed in, then the old one removed), or kept where ``keep_existing(target)`` is true (e.g.
    another process finished building the same cache entry first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp)
        if keep_existing is not None and target.exists() and keep_existing(target):
            return
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # put the old one back
                os.replace(old / target.name, target)
                old = None
            if keep_existing is None or not (target.exists() and keep_existing(target)):
                raise
        _fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_out_dir(
    out: str | os.PathLike[str],
    force: bool = False,
    *,
    hint: str = "choose a new folder",
    reads: Sequence[str | os.PathLike[str]] = (),
    error: type[FedslmError] = OutDirError,
) -> tuple[str, ...]:
    """Refuse an ``--out`` that is a file or, without ``force``, a folder that is not empty.

    Returns the entries that ``force`` replaces (empty when ``out`` is new or empty). Even with
    ``force``, a folder that holds the current directory or the home directory, or one of ``reads``
    (the files the command itself reads: its config, its data), is refused. ``hint`` is the advice
    given besides ``--force`` (e.g. how to resume the run found there).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file, not a folder; choose a new folder")
    entries = tuple(sorted(p.name for p in out.iterdir())) if out.is_dir() else ()
    if not entries:
        return entries
    if not force:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise error(
            f"--out {out} exists and is not empty ({len(entries)} entries: {shown});"
            f" {hint}, or pass --force to replace it"
        )
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    held = [p for p in (cwd, home, *(Path(r).expanduser().resolve() for r in reads)) if p == out or out in p.parents]
    if held:
        raise error(f"--out {out} holds {held[0]}, which --force would delete; choose a new folder")
    return entries


def clear_dir(path: str | os.PathLike[str]) -> None:
    """Remove every entry of ``path`` (what :func:`check_out_dir` returned under ``--force``)."""
    for entry in Path(path).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
