"""Benchmarks of areal-a3po: run from the repository root as ``python -m benchmarks.<name>``."""
