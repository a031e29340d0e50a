"""Synthetic checkpoints in the exact release layout (random weights), for tests, the demo and benchmarks."""
