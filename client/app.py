"""The fedslm ClientApp: train the global LoRA adapter on this node's private data and reply.

The server sends the global adapter (``arrays``) and a ``config`` holding the resolved run config
(YAML) and strategy keys. The node's own data is either a partition of the bundled/simulated data
(``partition-id``/``num-partitions`` in the node config) or a file on the node (``data-path``).
Only adapter tensors and metrics leave the node. The base model stays resident in the process.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from slm.logs import get_logger
from slm.records import arrays_of, make_metrics

from .runner import ClientRunner, DeclinedRound, node_client_id

log = get_logger(__name__)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    runner = ClientRunner.from_message(msg, context)
    try:
        arrays, metrics = runner.train(arrays_of(msg.content))
    except DeclinedRound as declined:
        log.warning("client %s declines round %s: %s", runner.client_id, runner.server_round, declined)
        metrics = {**declined.metrics, "declined": 1, "num-examples": 0}
        content = RecordDict({"metrics": make_metrics(metrics), "decline": ConfigRecord({"reason": str(declined)})})
        return Message(content=content, reply_to=msg)
    metrics["client-seconds"] = time.perf_counter() - t0
    content = RecordDict({"arrays": arrays, "metrics": make_metrics(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? Its client id (the server orders and samples clients by it)."""
    metrics = MetricRecord({"client-id": node_client_id(context.node_config)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    runner = ClientRunner.from_message(msg, context)
    metrics = runner.evaluate(arrays_of(msg.content))
    return Message(content=RecordDict({"metrics": make_metrics(metrics)}), reply_to=msg)


__all__ = ["app", "ArrayRecord"]
