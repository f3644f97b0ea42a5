"""Flower ClientApp: local (optionally DP-SGD) LoRA training on a node's private data."""
