"""FedSA-LoRA (Guo et al., 2025, "Selective aggregation for LoRA in federated learning"): A learns
general knowledge and is aggregated; B stays on each client across rounds (persisted with the
client's state, never uploaded) and personalises the model. The global adapter the server
evaluates therefore carries A only (B at its zero init)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg

from fedslm.protocol import LoRAPlan

from .base import LoRAStrategyMixin
from .spec import register


@register(
    "fedsa-lora",
    description="only A aggregated; each client keeps its own B across rounds (Guo et al. 2025)",
    secure_aggregation=True,  # the weighted mean of the A uploads
)
class FedSALoRA(LoRAStrategyMixin, FedAvg):
    def __init__(self, **common: Any) -> None:
        super().__init__(**common)

    def client_config(self, server_round: int) -> dict[str, Any]:
        return LoRAPlan(upload_lora_b=False).to_record()
