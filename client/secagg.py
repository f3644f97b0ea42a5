"""The SecAgg+ ClientApp (``security.secure_aggregation: secagg+``): Flower's legacy API.

Flower's ``secaggplus_mod`` runs the protocol's four stages around this client: it calls
:meth:`SecAggClient.fit` in the third one, then quantizes ``num_examples / max_weight`` times the
returned arrays, masks them, and sends only the masked integers. The training itself is the normal
:class:`client.runner.ClientRunner` (local DP included); only the packing differs: the global adapter
arrives as numpy arrays in the key order the server sends (``adapter-keys``), and the trained
adapter leaves in float32 in that order (what the strategy uploads, see :func:`fedslm.secagg.upload_keys`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedslm import secagg, wire
from fedslm.errors import FedslmError
from fedslm.logs import get_logger
from fedslm.protocol import CLIENT_SECONDS, NUM_EXAMPLES, TrainInstructions

from .runner import ClientRunner

log = get_logger(__name__)


class SecAggWeightError(FedslmError, ValueError):
    """A client's num-examples exceeds ``security.secagg_max_weight`` (its scaled values could clip)."""


class SecAggClient(NumPyClient):
    """One node's training, with arrays in the SecAgg+ key order."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        t0 = time.perf_counter()
        runner = ClientRunner.from_config(config, self.context.node_config)
        # SecAgg+ quantizes float values itself: the adapter goes up in full float32
        runner.cfg = dataclasses.replace(
            runner.cfg, communication=dataclasses.replace(runner.cfg.communication, dtype="float32")
        )
        keys = list(json.loads(str(TrainInstructions.from_record(config).adapter_keys)))
        arrays = ArrayRecord({k: Array(t.numpy()) for k, t in secagg.unpack(parameters, keys).items()})
        trained, metrics = runner.train(arrays)  # raises DeclinedRound: SecAgg+ then sees a dropout
        state = wire.decode(trained)
        n = int(metrics[NUM_EXAMPLES])
        sec = runner.cfg.security
        if n > sec.secagg_max_weight:
            raise SecAggWeightError(
                f"client {runner.client_id} has {n} training examples > security.secagg_max_weight="
                f"{sec.secagg_max_weight:g}: its weighted values could be clipped; raise secagg_max_weight"
            )
        metrics[CLIENT_SECONDS] = time.perf_counter() - t0
        return secagg.pack(state, runner.plan.uploads(keys)), n, metrics


def client_fn(context: Context) -> Client:
    return SecAggClient(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])

__all__ = ["SecAggClient", "SecAggWeightError", "app", "client_fn"]
