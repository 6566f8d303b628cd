"""Attention units for the MobileViTv2 block, interchangeable by name.

Each unit maps patch tokens [B, P, N, d] to [B, P, N, d], attending over the N patches
separately for each of the P pixel positions inside a patch:

- "separable": the paper's separable self-attention, O(N) (section 1 of the reference).
- "mha": standard multi-head scaled dot-product self-attention, O(N^2).
- "linformer": keys and values projected along the token axis from N to a fixed length,
  O(N) with batched matrix products.

`ATTENTION` is the one registry of these units: the model, the configs' checks and the
benchmarks take their names and options from it. `attention_factory` turns a name and the
model's options into a module factory `make(dim, name=...)` that the blocks call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvit2_jax.errors import ConfigError
from mvit2_jax.models.layers import dense, torch_default_kernel_init

Dtype = Any
AttentionFactory = Callable[..., nn.Module]  # make(dim, name=...) -> a unit mapping [B, P, N, d] to itself


class SeparableSelfAttention(nn.Module):
    """y = W_O(ReLU(x_V) * sum_i softmax(x W_I)_i x_K[i]), one fused input projection."""

    dim: int
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = self.dim
        qkv = self._dense(1 + 2 * d, x.shape[-1], "qkv_proj")(x)
        query, key, value = jnp.split(qkv, [1, d + 1], axis=-1)  # one Split node in exported graphs
        query = query[..., 0]
        # Context scores over the N tokens, laid out [..., N] (N the minor axis): XLA:CPU
        # reduces a [..., N, 1] layout far slower, and fused it into the output projection
        # so that the forward pass grew faster than O(N).
        scores = jax.nn.softmax(query.astype(jnp.float32), axis=-1)
        scores = nn.Dropout(self.attn_dropout)(scores, deterministic=not train)
        context = jnp.einsum("...n,...nd->...d", scores, key.astype(jnp.float32))[..., None, :]
        out = nn.relu(value) * context.astype(self.dtype)
        return self._dense(d, d, "out_proj")(out)

    def _dense(self, features: int, in_features: int, name: str) -> nn.Dense:
        return dense(features, in_features=in_features, dtype=self.dtype, kernels=self.kernels, name=name)


class MultiHeadSelfAttention(nn.Module):
    """Standard multi-head self-attention over the N tokens (MobileViTv1's unit)."""

    dim: int
    num_heads: int = 4
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    kernels: str = "auto"  # the library unit: the same on every path

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.dim % self.num_heads:
            raise ConfigError(f"attention dim {self.dim} is not divisible by num_heads={self.num_heads}")
        # [B, P, N, d] as [B*P, N, d]: the heads' tensors stay at rank 4.
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.dim,
            out_features=self.dim,
            dropout_rate=self.attn_dropout,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_default_kernel_init,
            force_fp32_for_softmax=True,
            name="mha",
        )(x, deterministic=not train)
        return y.reshape(*lead, *y.shape[-2:])


class LinformerSelfAttention(nn.Module):
    """Linformer: keys and values projected along the token axis from N to `proj_len`.

    The projections E, F have shape [N, proj_len], so they depend on the token count (the
    input resolution); they are shared across heads ("headwise sharing").
    """

    dim: int
    num_heads: int = 4
    proj_len: int = 64
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d, h = self.dim, self.num_heads
        if d % h:
            raise ConfigError(f"attention dim {d} is not divisible by num_heads={h}")
        lead, n = x.shape[:-2], x.shape[-2]
        x = x.reshape(-1, n, x.shape[-1])  # [B*P, N, d]: the heads' tensors stay at rank 4
        proj_init = nn.initializers.normal(stddev=self.proj_len**-0.5)
        e = self.param("proj_k", proj_init, (n, self.proj_len), jnp.float32).astype(self.dtype)
        f = self.param("proj_v", proj_init, (n, self.proj_len), jnp.float32).astype(self.dtype)
        q = self._dense(d, "query")(x)
        k = jnp.einsum("...nd,nk->...kd", self._dense(d, "key")(x), e)
        v = jnp.einsum("...nd,nk->...kd", self._dense(d, "value")(x), f)

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(*t.shape[:-1], h, d // h)

        dropout_rng = None
        if train and self.attn_dropout > 0:
            dropout_rng = self.make_rng("dropout")
        out = nn.dot_product_attention(
            heads(q),
            heads(k),
            heads(v),
            dropout_rng=dropout_rng,
            dropout_rate=self.attn_dropout,
            deterministic=not train,
            dtype=self.dtype,
            force_fp32_for_softmax=True,
        )
        out = out.reshape(*lead, n, d)
        return self._dense(d, "out_proj")(out)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return dense(features, in_features=self.dim, dtype=self.dtype, kernels=self.kernels, name=name)


@dataclasses.dataclass(frozen=True)
class AttentionType:
    """One entry of the registry: the unit and which of the model's options it takes."""

    unit: type
    options: Tuple[str, ...]  # model options passed on, besides attn_dropout, dtype and kernels
    description: str


ATTENTION: Dict[str, AttentionType] = {
    "separable": AttentionType(SeparableSelfAttention, (), "the paper's separable self-attention, O(k)"),
    "mha": AttentionType(MultiHeadSelfAttention, ("num_heads",), "multi-head scaled dot-product attention, O(k^2)"),
    "linformer": AttentionType(
        LinformerSelfAttention, ("num_heads", "proj_len"), "Linformer: keys and values projected to proj_len tokens"
    ),
}
ATTENTION_TYPES = tuple(ATTENTION)


def check_attention(kind: str) -> AttentionType:
    """The registry entry of `kind`; a ConfigError naming the choices otherwise."""
    if kind not in ATTENTION:
        raise ConfigError(f"attention must be one of {ATTENTION_TYPES}, got {kind!r}")
    return ATTENTION[kind]


def attention_factory(
    kind: str,
    *,
    num_heads: int = 4,
    proj_len: int = 64,
    attn_dropout: float = 0.0,
    dtype: Dtype = jnp.float32,
    kernels: str = "auto",
) -> AttentionFactory:
    """`make(dim, name=...)` building the `kind` unit with the options that apply to it."""
    entry = check_attention(kind)
    given = {"num_heads": num_heads, "proj_len": proj_len}
    options = {name: given[name] for name in entry.options}
    return functools.partial(entry.unit, attn_dropout=attn_dropout, dtype=dtype, kernels=kernels, **options)
