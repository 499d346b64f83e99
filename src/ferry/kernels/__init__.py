"""Native CPU kernels, compiled on first use (``python -m ferry.kernels.build`` compiles ahead)."""
