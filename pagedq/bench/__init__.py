"""Benchmarks: `pagedq bench ...` workloads from WORKLOAD.md, each beside its baseline."""
