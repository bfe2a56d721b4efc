"""Timestep embeddings: diffusers' sinusoidal ``Timesteps``, ``GaussianFourierProjection`` and
the ``TimestepEmbedding`` MLP."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdiff.models.layers import (
    Buffer,
    Init,
    Linear,
    ModelOptions,
    activation,
    new_param,
)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: (B,) timesteps -> (B, dim) sinusoids.

    diffusers computes it in float32 whatever the model dtype; so does this for fp32/bf16 models.
    A float64 model computes it in float64 (`dtype`), which the float64 parity tests rely on.
    """
    compute = jnp.promote_types(dtype, jnp.float32)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=compute)
    exponent = exponent / (half - downscale_freq_shift)
    args = timesteps.astype(compute)[:, None] * jnp.exp(exponent)[None, :]
    args = scale * args
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """diffusers' ``Timesteps`` (no parameters)."""

    def __init__(self, num_channels: int, *, flip_sin_to_cos: bool, downscale_freq_shift: float,
                 scale: float = 1.0, options: ModelOptions):  # fmt: skip
        self.options = options
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
            dtype=self.options.dtype,
        )


class GaussianFourierProjection(nnx.Module):
    """diffusers' ``GaussianFourierProjection`` (UNet2DModel ``time_embedding_type="fourier"``).

    Its ``weight`` is a frozen random projection (a `Buffer`, saved but never trained).
    """

    def __init__(self, embedding_size: int = 256, *, scale: float = 1.0, log: bool = True,
                 flip_sin_to_cos: bool = False, options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos
        self.weight = new_param(
            rngs, (embedding_size,), Init("normal", scale), dtype=options.param_dtype, kind=Buffer
        )

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        compute = self.options.norm_dtype
        x = timesteps.astype(compute)
        if self.log:
            x = jnp.log(x)
        proj = x[:, None] * self.weight[...].astype(compute)[None, :] * 2 * np.pi
        parts = (
            [jnp.cos(proj), jnp.sin(proj)]
            if self.flip_sin_to_cos
            else [jnp.sin(proj), jnp.cos(proj)]
        )
        return jnp.concatenate(parts, axis=-1)


class TimestepEmbedding(nnx.Module):
    """diffusers' ``TimestepEmbedding``: linear_1, activation, linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, act_fn: str = "silu",
                 out_dim: int | None = None, post_act_fn: str | None = None,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.act = activation(act_fn)
        self.post_act = activation(post_act_fn) if post_act_fn else None
        self.linear_1 = Linear(in_channels, time_embed_dim, options=options, rngs=rngs)
        self.linear_2 = Linear(
            time_embed_dim, out_dim or time_embed_dim, options=options, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.linear_2(self.act(self.linear_1(x)))
        return x if self.post_act is None else self.post_act(x)
