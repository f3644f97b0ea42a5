"""The one error root: everything fedslm raises about the user's input or the environment.

The ``fedslm`` command prints any :class:`FedslmError` as one line and exits with its
:attr:`~FedslmError.exit_code` (2: the input is wrong; 1: a run was started and failed);
``fedslm --debug`` shows the traceback instead. Any other exception in normal use is a bug.
"""

from __future__ import annotations


class FedslmError(Exception):
    """A mistake in the user's input or environment; the message says what and how to fix it."""

    exit_code = 2


class RunFailedError(FedslmError):
    """A run was started and did not finish (no round trained, a process died, ...)."""

    exit_code = 1


class Interrupted(FedslmError):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130


class UsageError(FedslmError):
    """Command-line options that contradict each other; the message names them and what to drop."""
