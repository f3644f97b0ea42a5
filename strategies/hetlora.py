"""HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for federated fine-tuning of on-device foundation
models"): clients train LoRA of different ranks (``clients.profiles``). The server zero-pads each
client's A (rows) and B (columns) to the global rank ``lora.r`` and sums them with the paper's
sparsity weights ``p_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F``, per LoRA module
(``strategies.lora_maths.hetlora_aggregate``); a classification head, if any, is example-weighted.
On receipt each client truncates the global adapter back to its own rank (``fedslm.adapters.fit_rank``:
the first ``r_i`` rows of A and columns of B), keeping the global scale ``alpha / lora.r``.

Not implemented: the paper's local rank self-pruning (optional there); ranks stay as configured.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from .aggregation import Tensors
from .base import LoRAStrategyMixin
from .lora_maths import hetlora_aggregate
from .replies import OwnAggregation
from .spec import register


@register(
    "hetlora",
    description="mixed ranks zero-padded, weighted by ||B_i A_i||_F, truncated per client (Cho et al. 2024)",
    heterogeneous_ranks=True,
    needs_individual_updates=True,
    central_dp=False,
)
class HetLoRA(OwnAggregation, LoRAStrategyMixin, FedAvg):
    def combine(self, updates: list[Tensors], weights: list[float]) -> Tensors:
        ranks = {v.shape[0] for k, v in self._global.items() if k.endswith(".lora_A.weight")}
        rank = max(ranks, default=self.run_cfg.lora.r)  # the global adapter's rank
        return hetlora_aggregate(updates, weights, rank)
