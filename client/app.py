"""The fedslm ClientApp: train the global LoRA adapter on this node's private data and reply.

The server sends the global adapter (``arrays``) and a ``config`` holding the resolved run config
(YAML) and strategy keys. The node's own data is either a partition of the bundled/simulated data
(``partition-id``/``num-partitions`` in the node config) or a file on the node (``data-path``).
Only adapter tensors and metrics leave the node.

Where the base model lives: in a simulation, in the Ray worker running this app (it persists across
rounds and clients). On a deployed node (``fedslm node``), Flower starts a fresh process per message,
so the node config names a ``resident-socket``: the message is handed to the node's resident worker
(``client/resident.py``), which keeps the model loaded; this process then never imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedslm.logs import get_logger
from fedslm.protocol import ARRAYS, CLIENT_ID, CLIENT_SECONDS, CONFIG, DECLINE, METRICS, REASON, NodeConfig
from fedslm.records import arrays_of, make_metrics

from .handlers import Outcome, handle

log = get_logger(__name__)

app = ClientApp()


def _run(kind: str, msg: Message, context: Context) -> Outcome:
    config, arrays, node = msg.content[CONFIG], arrays_of(msg.content, ARRAYS), context.node_config
    path = NodeConfig.from_record(node).resident_socket
    if path:
        from .resident import forward

        try:
            return forward(Path(str(path)), kind, config, arrays, node)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            log.warning("no resident worker at %s (%s): loading the base model in this process instead", path, err)
    return handle(kind, config, arrays, node)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    outcome = _run("train", msg, context)
    if outcome.declined is not None:
        content = RecordDict(
            {METRICS: make_metrics(outcome.metrics), DECLINE: ConfigRecord({REASON: outcome.declined})}
        )
        return Message(content=content, reply_to=msg)
    assert outcome.arrays is not None  # train replies carry the update unless declined
    metrics = {**outcome.metrics, CLIENT_SECONDS: time.perf_counter() - t0}
    return Message(content=RecordDict({ARRAYS: outcome.arrays, METRICS: make_metrics(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? Its client id (the server orders and samples clients by it)."""
    metrics = MetricRecord({CLIENT_ID: NodeConfig.from_record(context.node_config).client})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    metrics = _run("evaluate", msg, context).metrics
    return Message(content=RecordDict({METRICS: make_metrics(metrics)}), reply_to=msg)


__all__ = ["app"]
