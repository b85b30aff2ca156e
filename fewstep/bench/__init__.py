"""Benchmarks behind ``fewstep bench``: GPU timings reported as ratios against a baseline measured in
the same process (one module per benchmark)."""
