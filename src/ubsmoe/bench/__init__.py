"""Benchmarks behind ``ubsmoe bench``: timings measured as ratios within one process."""
