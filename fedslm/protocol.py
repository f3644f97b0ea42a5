"""What the server and a client tell each other, defined once for both sides.

A node's config is written by Flower (simulation: ``partition-id``) or by the operator (a deployed
node: ``client-id``); both sides read a client's id through :func:`node_client_id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LR_SCALE_KEY = "lr-scale"  # train config: the factor the clients apply to their learning rate (divergence guard)


def node_client_id(node_config: Mapping[str, Any]) -> int:
    """A node's client id: its simulation partition, or ``client-id`` in a deployed node's config."""
    return int(node_config.get("partition-id", node_config.get("client-id", 0)))
