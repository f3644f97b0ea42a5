"""What server and clients share: model loading and quantization, LoRA adapters and their wire
format, data and partitioning, the run-config schema, training/evaluation loops and privacy."""
