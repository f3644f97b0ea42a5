"""Imports every strategy module so that each registers itself."""

from . import fedavg, fedavgm, fedopt, fedprox, fedsa_lora, ffa_lora, norm_bound, robust  # noqa: F401
