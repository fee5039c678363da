"""``sparseadapter-bench``: dense vs sparse adapter throughput, side by side (see docs/benchmarking.md)."""
