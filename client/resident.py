"""A node's resident worker: one long-lived process that keeps the base model loaded between rounds.

Flower 1.42 runs every message (train, evaluate) in a fresh, single-task ``flwr-clientapp`` process
in both isolation modes (``flwr/supernode/runtime/run_clientapp.py`` pulls one task, replies and
exits), so a ClientApp alone would re-import torch and reload the base model for every message.
``fedslm node`` therefore starts this worker next to its SuperNode. The ClientApp process stays thin
(it never imports torch): it forwards the message's config and adapter arrays over a Unix socket
that only this user can open, the worker runs the same :func:`client.handlers.handle` a ClientApp
would run in-process, with its resident base model, and sends the reply back.

The wire is a length-prefixed JSON header followed by the raw bytes of each Flower ``Array`` (dtype,
shape and stype in the header): no pickle, nothing executable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import socketserver
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Array, ArrayRecord

from fedslm.errors import FedslmError
from fedslm.logs import get_logger

from .handlers import Outcome

log = get_logger(__name__)

MAX_HEADER = 16 << 20  # bytes of JSON header a frame may carry
MAX_ARRAYS = 8 << 30  # bytes of arrays a frame may carry
_LEN = struct.Struct(">Q")


class _Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class ResidentError(FedslmError, RuntimeError):
    """The resident worker failed to answer, or sent something that is not a reply."""


def socket_dir() -> Path:
    """A directory only this user can enter: ``$XDG_RUNTIME_DIR/fedslm``, else ``<tmp>/fedslm-<uid>``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "fedslm" if base else Path(tempfile.gettempdir()) / f"fedslm-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ResidentError(f"{path} must be owned by you with mode 0700 (it holds the worker's socket)")
    return path


def socket_path(runtime_port: int) -> Path:
    """The socket of the node whose SuperNode listens on ``runtime_port`` (unique per machine);
    short enough for the 107-byte limit of a Unix socket path."""
    return socket_dir() / f"node-{runtime_port}.sock"


# -- frames -----------------------------------------------------------------------------------------
def _array_meta(arrays: ArrayRecord) -> tuple[list[dict[str, Any]], list[bytes]]:
    meta: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in arrays.items():
        meta.append(
            {"name": name, "dtype": arr.dtype, "shape": list(arr.shape), "stype": arr.stype, "nbytes": len(arr.data)}
        )
        blobs.append(arr.data)
    return meta, blobs


def write_frame(out: _Writer, header: dict[str, Any], arrays: ArrayRecord | None = None) -> None:
    meta, blobs = _array_meta(arrays) if arrays is not None else ([], [])
    raw = json.dumps({**header, "arrays": meta}).encode()
    out.write(_LEN.pack(len(raw)) + raw)
    for blob in blobs:
        out.write(blob)
    out.flush()


def _read_exact(src: _Reader, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = src.read(left)
        if not chunk:
            raise ResidentError(f"connection closed after {n - left} of {n} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(src: _Reader) -> tuple[dict[str, Any], ArrayRecord]:
    (size,) = _LEN.unpack(_read_exact(src, _LEN.size))
    if size > MAX_HEADER:
        raise ResidentError(f"frame header of {size} bytes (at most {MAX_HEADER}): not a fedslm worker frame")
    header = json.loads(_read_exact(src, size))
    meta = header.pop("arrays")
    total = sum(int(m["nbytes"]) for m in meta)
    if total > MAX_ARRAYS:
        raise ResidentError(f"frame of {total} array bytes (at most {MAX_ARRAYS})")
    arrays = ArrayRecord()
    for m in meta:
        data = _read_exact(src, int(m["nbytes"]))
        arrays[m["name"]] = Array(dtype=m["dtype"], shape=tuple(m["shape"]), stype=m["stype"], data=data)
    return header, arrays


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A message config as JSON values (what a fedslm server puts in one: str, int, float, bool, lists)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, bytes | bytearray) or (
            isinstance(value, list) and any(isinstance(v, bytes | bytearray) for v in value)
        ):
            raise ResidentError(f"config key {key!r} holds bytes; the resident worker takes JSON values only")
        out[key] = value
    return out


# -- the ClientApp side -----------------------------------------------------------------------------
def forward(
    path: Path, kind: str, config: Mapping[str, Any], arrays: ArrayRecord, node_config: Mapping[str, Any]
) -> Outcome:
    """Have the worker at ``path`` handle one message. Raises ``ConnectionError``/``FileNotFoundError``
    when no worker listens there, :class:`ResidentError` when it fails while handling."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        with sock.makefile("rwb") as stream:
            header = {"kind": kind, "config": _plain(config), "node_config": _plain(node_config)}
            write_frame(stream, header, arrays)
            reply, out_arrays = read_frame(stream)
    if not reply.get("ok"):
        raise ResidentError(f"the resident worker failed on this {kind} message: {reply.get('error')}")
    return Outcome(
        arrays=out_arrays if reply["has_arrays"] else None, metrics=reply["metrics"], declined=reply["declined"]
    )


# -- the worker side --------------------------------------------------------------------------------
class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        from .handlers import handle

        try:
            header, arrays = read_frame(self.rfile)
        except (ResidentError, ValueError, KeyError) as err:
            log.warning("resident worker: dropped a malformed request: %s", err)
            return
        try:
            outcome = handle(header["kind"], header["config"], arrays, header["node_config"])
        except Exception as err:  # reported to the ClientApp, which fails the message with it
            log.exception("resident worker: %s message failed", header.get("kind"))
            write_frame(self.wfile, {"ok": False, "error": f"{type(err).__name__}: {err}"})
            return
        reply = {
            "ok": True,
            "metrics": outcome.metrics,
            "declined": outcome.declined,
            "has_arrays": outcome.arrays is not None,
        }
        try:
            write_frame(self.wfile, reply, outcome.arrays)
        except (BrokenPipeError, ConnectionResetError):
            log.warning("resident worker: the ClientApp hung up before its %s reply was sent", header["kind"])


class ResidentServer(socketserver.UnixStreamServer):
    """One message at a time (a node trains one round at a time; the model is not shared across threads)."""

    def __init__(self, path: Path) -> None:
        if path.exists():
            if _answers(path):
                raise ResidentError(f"a resident worker already listens on {path}")
            path.unlink()  # left behind by a worker that was killed
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o600)
        self.path = path

    def server_close(self) -> None:
        super().server_close()
        self.path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def wait_until_listening(path: Path, alive: Any, timeout: float = 60.0) -> None:
    """Block until a worker answers at ``path``; ``alive()`` false (the worker exited) or the timeout raises."""
    deadline = time.monotonic() + timeout
    while not _answers(path):
        if not alive():
            raise ResidentError(f"the resident worker exited before listening on {path}")
        if time.monotonic() > deadline:
            raise ResidentError(f"the resident worker did not listen on {path} within {timeout:.0f} s")
        time.sleep(0.1)


def _exit_with_parent(parent: int) -> None:
    """Stop when the process that started us (``fedslm node``) is gone, even if it was SIGKILLed."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            log.info("resident worker: its node exited; stopping")
            os._exit(0)


def serve(path: Path) -> None:
    server = ResidentServer(path)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    log.info("resident worker listening on %s (pid %d)", path, os.getpid())
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    from fedslm.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m client.resident", description=__doc__)
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket path to listen on")
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("FEDSLM_LOG"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds serve(): its socket file is removed
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
