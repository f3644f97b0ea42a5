"""FFA-LoRA (Sun et al., 2024, "Improving LoRA in privacy-preserving federated learning"): every
client keeps A frozen at the shared seeded initialisation (``lora.init_seed``) and trains and
uploads only B, so the global product is exactly mean(B_i) A: FedAvg becomes exact, the upload
halves, and DP noise is added to half as many parameters. The recommended choice under DP."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg

from fedslm.protocol import LoRAPlan

from .base import LoRAStrategyMixin
from .spec import register


@register(
    "ffa-lora",
    description="A frozen at the shared init, only B trained and sent (Sun et al. 2024); best under DP",
    secure_aggregation=True,  # the weighted mean of the B uploads
)
class FFALoRA(LoRAStrategyMixin, FedAvg):
    def __init__(self, **common: Any) -> None:
        super().__init__(**common)

    def client_config(self, server_round: int) -> dict[str, Any]:
        return LoRAPlan(train_lora_a=False).to_record()
