"""Imports every strategy module so that each registers itself."""

from . import (  # noqa: F401
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedex_lora,
    fedprox,
    fedsa_lora,
    fedyogi,
    ffa_lora,
    flora,
    hetlora,
    krum,
    median,
    multikrum,
    norm_bound,
    trimmed_mean,
)
