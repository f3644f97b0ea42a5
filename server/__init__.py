"""Flower ServerApp: rounds, aggregation through the configured strategy, central evaluation."""
