"""mvit2_jax: MobileViTv2 in JAX/Flax."""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Rebuild (model, variables) from a checkpoint directory, or from official weights by hub
    name ("hf-hub:timm/mobilevitv2_100.cvnets_in1k", fetched and converted once; see
    mvit2_jax.hub); see mvit2_jax.checkpoint.load_model for the options."""
    from mvit2_jax.checkpoint import load_model as _load_model
    from mvit2_jax.hub import local_path

    return _load_model(local_path(path), **kwargs)
