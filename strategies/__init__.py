"""Aggregation strategies for LoRA adapters, one per file, selected by name from YAML."""
