"""Client-level (central) DP around any strategy: clip each client's update, noise the aggregate,
and account for it over rounds with the client sampling rate.

This is DP-FedAvg (McMahan et al., 2018): every sampled client's update ``w_i - w`` is clipped to
L2 norm ``C`` over all its adapter tensors, the inner strategy aggregates the clipped updates with
*equal* weights (so one client moves the mean by at most ``C/m``), and Gaussian noise of standard
deviation ``sigma * C / m`` is added to the aggregate, ``m`` being the number of sampled clients.
Each round composes one sampled Gaussian mechanism with rate ``q = m / N``; the accountant is
Opacus' RDP over that history (Poisson sampling is the analysed model; fixed-size sampling of
``m`` of ``N`` clients is the usual approximation).

Flower's own ``DifferentialPrivacyServerSideFixedClipping`` zips arrays by position, weights by
``num-examples`` and keeps no accountant over sampled rounds; this wrapper matches arrays by key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedslm.audit import insert_client_canaries
from fedslm.logs import get_logger
from fedslm.privacy import CentralAccountant
from fedslm.protocol import EPSILON_CENTRAL, NUM_EXAMPLES

from .aggregation import add_noise
from .wrapper import WrapperStrategy

log = get_logger(__name__)


class CentralDP(WrapperStrategy):
    """Wraps a fedslm strategy; not registered by name: ``privacy.mode: central|both`` applies it."""

    def __init__(
        self,
        inner: Any,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        clients_per_round: int,
        num_clients: int,
        delta: float,
        seed: int = 0,
        client_canaries: int = 0,
    ) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"central noise multiplier must be >= 0, got {noise_multiplier}")
        if clipping_norm <= 0:
            raise ValueError(f"central clipping norm must be > 0, got {clipping_norm}")
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients per round {clients_per_round} not in [1, {num_clients}]")
        super().__init__(inner)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.clients_per_round = clients_per_round
        self.num_clients = num_clients
        self.delta = delta
        self.seed = seed
        self.client_canaries = client_canaries  # audit.client_canaries: see fedslm.audit.insert_client_canaries
        self.accountant = CentralAccountant("rdp")
        self._rng = np.random.default_rng(seed)

    def summary(self) -> None:
        log.info(
            "Central DP: clip %.3g, noise multiplier %.3g, %d of %d clients per round",
            self.clipping_norm,
            self.noise_multiplier,
            self.clients_per_round,
            self.num_clients,
        )
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # equal weights: one client moves the mean by at most C/m
        clipped_replies, norms = self.clip_replies(replies, self.clipping_norm, {NUM_EXAMPLES: 1})
        arrays, metrics = self.inner.aggregate_train(server_round, clipped_replies)
        if arrays is None:
            return None, metrics
        std = self.noise_multiplier * self.clipping_norm / self.clients_per_round
        mean = {k: v.numpy() for k, v in arrays.items()}
        # canary clients: their clipped updates join the mean (weight 1/m each) before the noise
        mean = insert_client_canaries(
            mean, self.seed, self.client_canaries, self.clipping_norm / self.clients_per_round
        )
        noisy = add_noise(mean, std, self._rng)
        self.accountant.record_round(self.noise_multiplier, self.clients_per_round, self.num_clients)
        eps = self.accountant.epsilon(self.delta)
        log.info(
            "round %d central DP: update norms %s clipped to %.3g, noise std %.4g, epsilon %.4f (delta %g)",
            server_round,
            [round(n, 3) for n in norms],
            self.clipping_norm,
            std,
            eps,
            self.delta,
        )
        out = MetricRecord({**(dict(metrics) if metrics else {}), EPSILON_CENTRAL: eps})
        return ArrayRecord({k: Array(v) for k, v in noisy.items()}), out

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "central_accountant": self.accountant.to_json(),
            "central_rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.accountant = CentralAccountant.from_json(state["central_accountant"])
        self._rng.bit_generator.state = state["central_rng"]
