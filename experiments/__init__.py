"""ml_collections experiment configs: python -m mvit2_jax.main --config=experiments/NAME.py."""
