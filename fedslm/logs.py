"""Logging for fedslm: one logger tree under ``fedslm``, lazy ``%s`` arguments, no prints.

The console and a run's ``run.log`` see different things. ``run.log`` gets every line at DEBUG:
ours, Flower's, the other libraries' and Python's warnings (captured into logging), from the
driver and from the simulation's Ray workers alike. The console of a process set up here shows
its level (WARNING for ``fedslm simulate``, which has its own plan, progress bar and table), less
the known noise of :data:`NOISE`, unless ``--verbose``. Nothing is ignored: what the console leaves
out, ``run.log`` keeps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_ROOT = "fedslm"
VERBOSE_ENV = "FEDSLM_VERBOSE"  # "1": the libraries' chatter on the console too (--verbose; Ray workers inherit it)
RUN_LOG_ENV = "FEDSLM_RUN_LOG"  # set while a simulation runs: its Ray workers append their lines to this file

# What the console leaves out unless --verbose (run.log keeps it): (logger, regular expression on the message)
NOISE: tuple[tuple[str, str], ...] = (
    # Python warnings of these categories come from the libraries, not from the run: torch.jit's
    # script_method, transformers' is_gradient_checkpointing (called by PEFT), Ray's accelerator tip
    ("py.warnings", r": (Deprecation|PendingDeprecation|Future)Warning: "),
    ("py.warnings", r": UserWarning: Full backward hook is firing"),  # torch, at Opacus' hook on a frozen input
    ("bitsandbytes", r"^Failed to load CPU gemm_4bit_forward from kernels"),  # an optional kernel
    ("flwr", r"DEPRECATED FEATURE"),  # run_simulation: `fedslm simulate` is the supported entry point
    ("flwr", r"fraction_evaluate is set to 0"),  # the server evaluates centrally, on purpose
    ("flwr", r"^Manually terminating ClientAppActor"),  # each Ray worker, as the simulation ends
)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FILE_FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s: %(message)s"
_OWN_CONSOLES = ("fedslm", "flwr")  # loggers with a console handler of their own (they do not propagate)
_APPENDING: set[str] = set()  # the run.log files this process already appends to


def get_logger(name: str) -> logging.Logger:
    """A child of the ``fedslm`` logger (``name`` is usually ``__name__``)."""
    return logging.getLogger(name if name == _ROOT or name.startswith(f"{_ROOT}.") else f"{_ROOT}.{name}")


def verbose() -> bool:
    """``--verbose`` in this process or in the driver that started it (:data:`VERBOSE_ENV`)."""
    return os.environ.get(VERBOSE_ENV) == "1"


class _Console(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on ``sys.stderr`` as it is at each line (pytest's capture and tqdm replace it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class NoiseFilter(logging.Filter):
    """Drops the records :data:`NOISE` names (console handlers only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        name, message = record.name, record.getMessage()
        return not any(
            (name == logger or name.startswith(f"{logger}.")) and re.search(pattern, message)
            for logger, pattern in NOISE
        )


def setup_logging(level: str | int | None = None, *, verbose_console: bool | None = None) -> None:
    """Console logging for a process of ours (the CLI, a simulation's Ray worker, the resident
    worker); library code never calls this. ``FEDSLM_LOG`` sets the level when ``level`` is None.

    Our records and Flower's keep their own console handlers (``fedslm`` and ``flwr`` do not
    propagate); the rest (other libraries, Python warnings) reach one handler on the root logger.
    ``verbose_console`` (default: :func:`verbose`) keeps :data:`NOISE` and the loading bars.
    """
    level = level or os.environ.get("FEDSLM_LOG", "INFO")
    loud = verbose() if verbose_console is None else verbose_console
    formatter = logging.Formatter(_FORMAT, "%H:%M:%S")
    root = logging.getLogger()
    ours = logging.getLogger(_ROOT)
    for logger in (ours, root):
        handler = next((h for h in logger.handlers if getattr(h, "_fedslm", False)), None)
        if handler is None:
            handler = _Console()
            handler.setFormatter(formatter)
            handler._fedslm = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        _set_console(handler, level, loud)
    ours.setLevel(logging.DEBUG)  # the console handler has the level; run.log takes everything
    ours.propagate = False
    flwr = logging.getLogger("flwr")
    flwr.propagate = False  # Flower prints its own lines; run.log is attached to it directly
    with contextlib.suppress(ImportError):
        from flwr.common.logger import console_handler  # attached when flwr is imported: import it now

        _set_console(console_handler, level, loud)
    logging.captureWarnings(True)  # into run.log; the console shows them less NOISE


def _set_console(handler: logging.Handler, level: str | int, loud: bool) -> None:
    handler.setLevel(level)
    for f in [f for f in handler.filters if isinstance(f, NoiseFilter)]:
        handler.removeFilter(f)
    if not loud:
        handler.addFilter(NoiseFilter())


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar from transformers while the block runs, unless :func:`verbose`:
    every Ray worker would print one per model load on the driver's console."""
    from transformers.utils import logging as hf_logging

    if verbose() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=False)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT, "%Y-%m-%d %H:%M:%S"))
    return handler


def _run_log_targets() -> list[logging.Logger]:
    """The root logger, and those of ours and Flower's that do not propagate to it."""
    named = [logging.getLogger(n) for n in _OWN_CONSOLES]
    return [logging.getLogger(), *[lg for lg in named if not lg.propagate]]


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """While the block runs, every log line of this process goes to ``path`` at DEBUG, and the Ray
    workers it starts append theirs (:data:`RUN_LOG_ENV`, inherited); nothing else changes."""
    handler = _file_handler(path)
    targets = _run_log_targets()
    ours = logging.getLogger(_ROOT)
    level, previous = ours.level, os.environ.get(RUN_LOG_ENV)
    for logger in targets:
        logger.addHandler(handler)
    if ours.getEffectiveLevel() > logging.DEBUG:
        ours.setLevel(logging.DEBUG)  # our INFO and DEBUG lines exist only if the logger lets them through
    os.environ[RUN_LOG_ENV] = str(path)
    _APPENDING.add(str(path))  # so that importing fedslm.client here does not add a second handler
    try:
        yield path
    finally:
        _APPENDING.discard(str(path))
        for logger in targets:
            logger.removeHandler(handler)
        handler.close()
        ours.setLevel(level)
        if previous is None:
            os.environ.pop(RUN_LOG_ENV, None)
        else:
            os.environ[RUN_LOG_ENV] = previous


def setup_worker() -> None:
    """In a Ray worker of a simulation (:data:`RUN_LOG_ENV` set): the console of :func:`setup_logging`
    at WARNING, every line appended to the run's ``run.log``. A no-op anywhere else, and when repeated."""
    path = os.environ.get(RUN_LOG_ENV)
    if not path or path in _APPENDING or not Path(path).parent.is_dir():  # not there: another machine
        return
    _APPENDING.add(path)
    setup_logging(os.environ.get("FEDSLM_LOG", "WARNING"))
    handler = _file_handler(Path(path))
    for logger in _run_log_targets():
        logger.addHandler(handler)
