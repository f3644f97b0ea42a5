"""FedEx-LoRA (Singhal et al., 2024, "Exact aggregation for federated and efficient fine-tuning of
foundation models"): A and B are averaged as in FedAvg, and the error of doing so,

    R = scaling * (sum_i p_i B_i A_i - mean(B) mean(A))        per LoRA module, scaling = alpha / r,

is added to the model too, so the global update equals the exact weighted mean of the clients'
updates ``scaling * B_i A_i`` (p_i: example weights).

The paper folds R into the frozen base weights. Here the base is quantized (NF4/int8) and R cannot
be folded into it without re-quantization error, so R is carried as a **frozen dense residual**:
the global adapter holds ``<module>.frozen_residual`` (out, in) per LoRA module, accumulated over
rounds, and every node (clients and the server's evaluator) applies it as a forward hook on the
LoRA layer (``fedslm.adapters.load_adapter_state``). It is never trained or uploaded; clients start
each round from (mean B, mean A) plus the residual, exactly the global model.

Cost: the residual is dense, out x in per module, downlink only (SmolLM2 q/v: 13.3 M values, 26.5
MB in bf16 each round, against 0.9 MB for the adapter). A truncated SVD would be smaller but not
exact. Exactness on clients also needs ``communication.dtype: float32`` (bf16 rounds R).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from .aggregation import Tensors
from .base import LoRAStrategyMixin
from .lora_maths import accumulate, fedex_aggregate
from .replies import OwnAggregation
from .spec import register


@register(
    "fedex-lora",
    description="exact aggregation: mean A, mean B + a frozen residual sum p_i B_i A_i - BA (Singhal et al. 2024)",
    needs_individual_updates=True,
    central_dp=False,
)
class FedExLoRA(OwnAggregation, LoRAStrategyMixin, FedAvg):
    def combine(self, updates: list[Tensors], weights: list[float]) -> Tensors:
        lora = self.run_cfg.lora
        mean, residuals = fedex_aggregate(updates, weights, lora.alpha / lora.r)
        return {**mean, **accumulate(self._global, residuals)}  # the residual so far is in the global adapter
