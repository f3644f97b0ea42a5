"""`fedslm` command line and the simulated federation (Flower simulation engine)."""
