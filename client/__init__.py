"""Flower ClientApp: local (optionally DP-SGD) LoRA training on a node's private data."""

from fedslm.logs import setup_worker

# First, before torch, PEFT or bitsandbytes are imported: in a Ray worker of `fedslm simulate` its
# lines go to the run's run.log and its console is quiet (a no-op in any other process).
setup_worker()
