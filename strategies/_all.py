"""Imports every strategy module so that each registers itself."""

from . import fedavg  # noqa: F401
