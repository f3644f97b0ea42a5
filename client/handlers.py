"""What a node does with one message, whichever process runs it (the ClientApp, or the node's
resident worker in ``client/resident.py``): the config and adapter in, the reply's parts out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from fedslm.logs import get_logger
from fedslm.protocol import PROCESS_MESSAGES

log = get_logger(__name__)

_SERVED = [0]  # messages handled by this process (1 per message when every message gets a fresh process)


@dataclass(frozen=True)
class Outcome:
    arrays: ArrayRecord | None  # the update (train), None for evaluate or a declined round
    metrics: dict[str, Any]
    declined: str | None = None  # why the client declined to train this round


def handle(kind: str, config: Mapping[str, Any], arrays: ArrayRecord, node_config: Mapping[str, Any]) -> Outcome:
    """Train or evaluate on this node's data, with this process's resident base model."""
    from .privacy import DeclinedRound  # torch: only in the process that trains
    from .runner import ClientRunner

    if kind not in ("train", "evaluate"):
        raise ValueError(f"message kind {kind!r}: expected 'train' or 'evaluate'")
    _SERVED[0] += 1
    runner = ClientRunner.from_config(config, node_config)
    if kind == "evaluate":
        return Outcome(None, {**runner.evaluate(arrays), PROCESS_MESSAGES: _SERVED[0]})
    try:
        update, metrics = runner.train(arrays)
    except DeclinedRound as declined:
        log.warning("client %s declines round %s: %s", runner.client_id, runner.server_round, declined)
        return Outcome(None, declined.report.to_record(), str(declined))
    return Outcome(update, {**metrics, PROCESS_MESSAGES: _SERVED[0]})
