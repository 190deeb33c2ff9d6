"""Benchmarks of ctp: compression speed, run-time gains of compressed formats, prompt-training throughput.

Run from the repository root as modules, e.g. ``python -m bench.compress_speed``; see bench/README.md.
"""
