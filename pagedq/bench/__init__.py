"""Benchmarks: `pagedq bench ...` workloads from docs/benchmarks.md, each beside its baseline."""
