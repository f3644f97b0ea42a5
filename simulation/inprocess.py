"""Flower's simulation engine without Ray: the ClientApp runs in this process, one message at a time.

Flower's engine (``flwr.simulation.run_simulation``) keeps its whole path: the in-memory SuperLink
state, the ``InMemoryGrid`` the ServerApp talks to, each node's ``Context``, the queues and the worker
loop of ``vce_api``. Only its backend changes: where ``RayBackend`` would start Ray and a pool of
actors, each a process that imports torch and loads its own copy of the base model,
:class:`InProcessBackend` calls the ClientApp directly, as a Ray actor does
(``flwr.simulation.ray_transport.ray_actor.ClientAppActor.run``).

Where only one client trains at a time (``federation.client_cpus`` = the machine's CPUs, as on a
2-core laptop), Ray buys nothing: clients run one after another either way. In this process they
also share the server's resident model (:data:`fedslm.model.RESIDENT`) instead of loading their own.

Flower 1.42's engine builds ``RayBackend`` by importing it from its module at start
(``vce_api.start_vce``), whatever backend is named; :func:`inprocess_engine` serves that import this
backend instead while the block runs. It is process-wide: one simulation at a time per process.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import traceback
import types
from collections.abc import Callable, Iterator

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from fedslm.errors import Interrupted

RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


class InProcessBackend(Backend):
    """A backend with one worker: this process, running each message's ClientApp in turn."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True  # the engine's single worker thread calls process_message only when it is free

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise ValueError("InProcessBackend.build() was not called before the first message")
        # copies in and out, as Ray's serialization makes them: the engine's state keeps the very objects
        # the server sent, and a client's mods (SecAgg+'s) change what they are given
        message, context = copy.deepcopy(message), copy.deepcopy(context)
        try:
            app = self.app_fn()
            return copy.deepcopy(app(message=message, context=context)), context
        except LoadClientAppError:
            raise
        except Exception as ex:  # the server gets the client's traceback as its error, as from a Ray actor
            raise ClientAppException("".join(traceback.format_exception(ex))) from ex

    def terminate(self) -> None:
        self.app_fn = None


_interrupted = False  # a run in this process was stopped by Ctrl-C (see :func:`interrupted`)


def interrupted() -> bool:
    """Whether Ctrl-C stopped an in-process run here. Torch then ran in the engine's worker thread when
    the interrupt came, and a normal interpreter exit afterwards can abort in a C++ destructor
    ("terminate called without an active exception"); the ``fedslm`` command leaves with ``os._exit``
    instead, its checkpoint written and its line printed."""
    return _interrupted


@contextlib.contextmanager
def inprocess_engine() -> Iterator[None]:
    """While the block runs, Flower's simulation engine runs the ClientApp in this process (and never
    starts Ray)."""
    global _interrupted
    stand_in = types.ModuleType(RAY_BACKEND_MODULE)
    stand_in.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    saved = sys.modules.get(RAY_BACKEND_MODULE)
    sys.modules[RAY_BACKEND_MODULE] = stand_in
    try:
        yield
    except (KeyboardInterrupt, Interrupted):
        _interrupted = True
        raise
    finally:
        if saved is None:
            sys.modules.pop(RAY_BACKEND_MODULE, None)
        else:
            sys.modules[RAY_BACKEND_MODULE] = saved


__all__ = ["InProcessBackend", "inprocess_engine", "interrupted"]
