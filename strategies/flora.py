"""FLoRA (Wang et al., 2024, "FLoRA: Federated fine-tuning large language models with
heterogeneous low-rank adaptations"): the clients' adapters are stacked, A's rows ``p_i A_i`` and
B's columns ``B_i``, so that ``B_stack A_stack = sum_i p_i B_i A_i`` exactly, for any mix of ranks
(``strategies.lora_maths.flora_stack``).

The paper sends the stack to the clients, which merge it into their base weights and restart from
a freshly initialised LoRA each round. Here the base is quantized and cannot absorb it, and a stack
grows by ``sum_i r_i`` every round, so the stacked product ``scaling * B_stack A_stack`` is added to
the **frozen dense residual** of each LoRA module (``<module>.frozen_residual``, the mechanism of
``fedex-lora``: a forward hook on every node, never trained or uploaded), and the global A and B
go back to the start: A at the shared seeded initialisation (``lora.init_seed``), B = 0. So every
round, every client restarts from the same fresh LoRA on top of all previous rounds, as in the
paper; a client of rank ``r_i < lora.r`` takes the first ``r_i`` rows of that A. Central
evaluation sees exactly the merged model (the fresh adapter contributes B A = 0).
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAvg

from .aggregation import Tensors
from .base import LoRAStrategyMixin
from .lora_maths import A_SUFFIX, B_SUFFIX, accumulate, flora_aggregate, modules
from .replies import OwnAggregation
from .spec import register


@register(
    "flora",
    description="stacking: exact sum p_i B_i A_i for mixed ranks, merged into a frozen residual (Wang et al. 2024)",
    heterogeneous_ranks=True,
    needs_individual_updates=True,
    central_dp=False,
)
class FLoRA(OwnAggregation, LoRAStrategyMixin, FedAvg):
    def combine(self, updates: list[Tensors], weights: list[float]) -> Tensors:
        lora = self.run_cfg.lora
        others, deltas = flora_aggregate(updates, weights, lora.alpha / lora.r)
        restart = {}
        for m in modules(updates[0]):  # the next round starts from the same fresh LoRA
            restart[m + A_SUFFIX] = self._global[m + A_SUFFIX]
            restart[m + B_SUFFIX] = np.zeros_like(self._global[m + B_SUFFIX])
        return {**others, **restart, **accumulate(self._global, deltas)}
