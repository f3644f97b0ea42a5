"""Reply messages as a SuperNode would send them, for unit tests of server-side code."""

from __future__ import annotations

import time
import uuid

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
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
