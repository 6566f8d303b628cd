"""mvit2_jax: MobileViTv2 in JAX/Flax."""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Rebuild (model, variables) from a checkpoint directory; see mvit2_jax.checkpoint."""
    from mvit2_jax.checkpoint import load_model as _load_model

    return _load_model(path, **kwargs)
