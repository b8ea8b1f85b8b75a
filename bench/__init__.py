"""The benchmark workloads of BENCHMARKS.md, run with `citadel bench NAME`."""
