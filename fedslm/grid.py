"""The one view of a Flower ``Grid`` that fedslm's round loops and strategies talk through.

A :class:`GridView` wraps the engine's grid and adds, each only where asked for:

- **bytes counted**: every message sent and every reply received, by :func:`payload_nbytes` (what
  ``metrics.jsonl`` reports as ``bytes_down`` / ``bytes_up``; the main loop and the SecAgg+ workflow
  both count this way);
- **a stop event**: Flower's ``send_and_receive`` polls for replies until the round's timeout; after
  Ctrl-C no reply will come, and the ServerApp thread (not a daemon) would keep the process alive
  that long. With ``stop``, the same polling loop raises :class:`Interrupted` as soon as it is set;
- **available nodes**: nodes in the order of their client ids (Flower's node ids are random per
  run, client ids are not: sampling is then the same in every run with the same seed, and after a
  resume), without the clients that said their privacy budget is spent;
- **a sample**: only the nodes a strategy picked (Flower's own sampler then takes them all).

Views derived with :meth:`GridView.available` and :meth:`GridView.only` share the counter and the
stop event of the view they come from. Everything else (``run``, ``push_messages`` ...) is the grid's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from .errors import Interrupted


def payload_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message as Flower serializes it: array bytes and key names, string/bytes
    lengths, 8 per number (protobuf's 64-bit ints and doubles), 1 per bool."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            for key, value in record.items():
                total += len(key) + sum(_value_nbytes(v) for v in (value if isinstance(value, list) else [value]))
    return total


def _value_nbytes(value: Any) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, (str, bytes)):
        return len(value)
    return 8


@dataclass
class Traffic:
    """Payload bytes sent down to nodes and up from them since the last :meth:`take`."""

    up: int = 0
    down: int = 0

    def take(self) -> tuple[int, int]:
        """(bytes up, bytes down) since the last call."""
        up, down = self.up, self.down
        self.up = self.down = 0
        return up, down


class GridView:
    """A Grid that counts its bytes, may be stopped, and lists only the nodes it is asked to."""

    def __init__(
        self,
        grid: Grid,
        *,
        stop: threading.Event | None = None,
        poll_s: float = 0.1,
        client_of: Mapping[int, int] | None = None,
        exclude: Collection[int] = (),
        nodes: Sequence[int] | None = None,
        traffic: Traffic | None = None,
    ) -> None:
        self._grid = grid
        self.stop = stop
        self.poll_s = poll_s
        self.client_of = client_of or {}  # node id -> client id
        self.exclude = exclude  # client ids left out
        self.nodes = nodes  # the sample: these nodes only
        self.traffic = traffic or Traffic()

    @classmethod
    def of(cls, grid: Grid | GridView) -> GridView:
        """``grid`` itself if it is a view already (its counter and stop event kept), else a view of it."""
        return grid if isinstance(grid, GridView) else cls(grid)

    def _derive(self, **options: Any) -> GridView:
        kept = {"stop": self.stop, "poll_s": self.poll_s, "client_of": self.client_of, "exclude": self.exclude}
        return GridView(self._grid, **{**kept, "nodes": self.nodes, **options}, traffic=self.traffic)

    def available(self, client_of: Mapping[int, int], exclude: Collection[int] = ()) -> GridView:
        """Nodes in client-id order, without those of the clients in ``exclude``."""
        return self._derive(client_of=client_of, exclude=exclude, nodes=None)

    def only(self, node_ids: Sequence[int]) -> GridView:
        """Just ``node_ids`` (a strategy's sample)."""
        return self._derive(nodes=list(node_ids))

    # -- nodes -------------------------------------------------------------------------------------
    def all_node_ids(self) -> list[int]:
        """Every node (or the sample), in client-id order; nodes of unknown client id last."""
        if self.nodes is not None:
            return list(self.nodes)
        nodes, client_of = list(self._grid.get_node_ids()), self.client_of
        return sorted(nodes, key=lambda n: (n not in client_of, client_of.get(n, 0), n))

    def get_node_ids(self) -> list[int]:
        """:meth:`all_node_ids` without the excluded clients' nodes."""
        return [n for n in self.all_node_ids() if self.client_of.get(n, -1 - n) not in self.exclude]

    # -- messages ----------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted("the federation was stopped (Ctrl-C)")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's ``send_and_receive``, counted, and ended early by the stop event."""
        self._check()
        messages = list(messages)
        self.traffic.down += sum(payload_nbytes(m.content) for m in messages if m.has_content())
        if self.stop is None:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        else:
            replies = self._poll(messages, timeout, self.stop)
        self.traffic.up += sum(payload_nbytes(m.content) for m in replies if m.has_content())
        return replies

    def _poll(self, messages: list[Message], timeout: float | None, stop: threading.Event) -> list[Message]:
        """Flower's polling loop, waiting on the stop event between polls."""
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            got = list(self._grid.pull_messages(list(waiting)))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if waiting and stop.wait(self.poll_s):
                self._check()
        return replies

    def take(self) -> tuple[int, int]:
        """(bytes up, bytes down) since the last call, over this view and the views derived from it."""
        return self.traffic.take()

    def __getattr__(self, name: str) -> Any:  # run, push/pull, create_message ...: the grid's own
        return getattr(self._grid, name)


__all__ = ["GridView", "Traffic", "payload_nbytes"]
