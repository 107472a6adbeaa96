"""Performance measurement of caspec (benchmarks that run inside the package; see ``gpu_bench``)."""
