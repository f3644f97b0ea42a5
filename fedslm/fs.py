"""The only writers of files that must survive a crash: write a temp beside the target, fsync, rename.

A crash (or ``kill -9``) at any point leaves either the old file or directory or the new one, never
a torn one; the parent directory is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; once the block succeeds it replaces ``path`` (fsynced).

    ``mode`` (e.g. ``0o600``) is set on the temp file before anything is written into it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
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
