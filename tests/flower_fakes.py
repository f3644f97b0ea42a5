"""Reply messages as a SuperNode would send them, and the one fake Grid, for unit tests of server-side code."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message


def reply(node: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return make_message(meta, content=content, error=error)


def train_reply(node: int, tensors: dict[str, np.ndarray], num_examples: int) -> Message:
    arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()})
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": 1.0})
    return reply(node, RecordDict({"arrays": arrays, "metrics": metrics}))


# A node's answer to one train (or evaluate) message, given the round (1, 2, ...); None: it never replies
Answer = Callable[[Message, int], Message | None]


class FakeGrid:
    """A Flower Grid of ``nodes`` (a count: nodes 100, 101, ...) for server-side tests.

    The server's client-id query is answered by every node (client id = node - 1); each other batch
    of messages is a round, answered message by message by ``answer`` (None: every node stays silent).
    ``sent`` keeps each round's messages by destination node.
    """

    def __init__(self, nodes: int | Iterable[int], answer: Answer | None = None) -> None:
        self.nodes = list(range(100, 100 + nodes)) if isinstance(nodes, int) else list(nodes)
        self.answer = answer
        self.sent: list[dict[int, Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if all(m.metadata.message_type == MessageType.QUERY for m in messages):
            ids = {m.metadata.dst_node_id: m.metadata.dst_node_id - 1 for m in messages}
            return [reply(node, RecordDict({"metrics": MetricRecord({"client-id": cid})})) for node, cid in ids.items()]
        self.sent.append({m.metadata.dst_node_id: m for m in messages})
        answers = [self.answer(m, len(self.sent)) for m in messages] if self.answer is not None else []
        return [a for a in answers if a is not None]
