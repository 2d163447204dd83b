"""Benchmark scripts; each publishes ``benchmarks/results/NAME.json`` and its block of docs/benchmarks.md."""
