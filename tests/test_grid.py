"""The one grid view: nodes in client-id order without spent clients, a sample, the bytes of both
directions counted once over derived views, and a stop event that ends a wait for replies."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flower_fakes import FakeGrid, train_reply
from flwr.app import Message, RecordDict

from fedslm.errors import Interrupted
from fedslm.grid import GridView, payload_nbytes


def test_available_nodes_are_in_client_order_without_excluded_clients_and_a_sample_is_kept() -> None:
    view = GridView(FakeGrid([30, 10, 20, 40]))
    assert view.get_node_ids() == view.all_node_ids() == [10, 20, 30, 40]  # no client ids: node order
    available = view.available({30: 0, 10: 2, 20: 1}, exclude={1})
    assert available.all_node_ids() == [30, 20, 10, 40]  # node 40's client id is unknown: last
    assert available.get_node_ids() == [30, 10, 40]
    assert available.only([10, 40]).get_node_ids() == [10, 40]
    assert GridView.of(available) is available and isinstance(GridView.of(FakeGrid(2)), GridView)


def _echo(msg: Message, rnd: int) -> Message:
    return train_reply(msg.metadata.dst_node_id, {"k": np.zeros(4, np.float32)}, 7)


def test_bytes_are_counted_both_ways_once_over_derived_views() -> None:
    view = GridView(FakeGrid([1, 2], _echo))
    sample = view.available({1: 0, 2: 1}).only([1, 2])
    sent = [Message(content=RecordDict(), message_type="train", dst_node_id=n) for n in (1, 2)]
    replies = sample.send_and_receive(sent, timeout=1.0)
    assert len(replies) == 2
    each = payload_nbytes(replies[0].content)
    assert each == len(replies[0].content["arrays"]["k"].data) + 1 + len("num-examples") + 8 + len("train-loss") + 8
    assert view.take() == (2 * each, 0)  # the empty requests carry nothing
    assert view.take() == (0, 0)


class _SilentGrid:
    """Takes messages and never answers (a node that will not reply after Ctrl-C)."""

    def get_node_ids(self) -> list[int]:
        return [1]

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return []


def test_the_stop_event_ends_a_wait_for_replies() -> None:
    stop = threading.Event()
    view = GridView(_SilentGrid(), stop=stop, poll_s=0.01)  # type: ignore[arg-type]
    msg = Message(content=RecordDict(), message_type="train", dst_node_id=1)
    assert view.send_and_receive([msg], timeout=0.05) == []  # the timeout ends an unstopped wait
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted, match="stopped"):
        view.available({}).send_and_receive([msg], timeout=60.0)  # a derived view shares the event
    assert time.monotonic() - t0 < 5.0
