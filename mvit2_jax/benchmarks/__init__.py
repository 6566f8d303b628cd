"""Benchmarks: `python -m mvit2_jax.benchmarks.NAME --help`. They measure; tests only smoke-run them."""
