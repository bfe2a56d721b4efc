"""Stable Diffusion's cross-attention blocks, as diffusers builds them.

``Transformer2DModel`` (group norm, proj_in, ``BasicTransformerBlock`` x N, proj_out, residual)
and the UNet blocks that interleave it with resnets: ``CrossAttnDownBlock2D``,
``CrossAttnUpBlock2D`` and ``UNetMidBlock2DCrossAttn``. Feature maps are NHWC; text embeddings
(``encoder_hidden_states``) are (B, L, cross_attention_dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdiff.models.attention import Attention
from flaxdiff.models.layers import (
    Conv2d,
    GroupNorm,
    LayerNorm,
    Linear,
    ModelOptions,
    activation,
    call_block,
)
from flaxdiff.models.unet_blocks import (
    BlockArgs,
    DownBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
    downsampler,
    resnet_chain,
    skip_resnets,
    upsampler,
)

_GELU = activation("gelu")  # GEGLU's gate uses the exact (erf) gelu, as torch's F.gelu


class GEGLU(nnx.Module):
    """A gated GELU: ``proj`` makes (value, gate); the output is value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int, *, options: ModelOptions, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, dim_out * 2, options=options, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * _GELU(gate)


class FeedForward(nnx.Module):
    """diffusers' ``FeedForward`` with GEGLU: keys ``net.0.proj`` and ``net.2`` (1 is dropout)."""

    def __init__(self, dim: int, *, mult: int = 4, options: ModelOptions, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List(
            [
                GEGLU(dim, inner, options=options, rngs=rngs),
                None,  # diffusers' Dropout (no parameters); keeps the index of the output layer
                Linear(inner, dim, options=options, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm and residual."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int,
                 only_cross_attention: bool = False, options: ModelOptions,
                 rngs: nnx.Rngs):  # fmt: skip
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim, options=options)
        self.attn1 = Attention(
            dim,
            cross_attention_dim=cross_attention_dim if only_cross_attention else None,
            heads=heads,
            dim_head=dim_head,
            options=options,
            rngs=rngs,
        )
        self.norm2 = LayerNorm(dim, options=options)
        self.attn2 = Attention(
            dim,
            cross_attention_dim=cross_attention_dim,
            heads=heads,
            dim_head=dim_head,
            options=options,
            rngs=rngs,
        )
        self.norm3 = LayerNorm(dim, options=options)
        self.ff = FeedForward(dim, options=options, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # (B, L, C), (B, S, D)
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """diffusers' ``Transformer2DModel`` on a continuous feature map (SD's spatial transformer).

    ``use_linear_projection`` (SD 2.x) makes proj_in/proj_out dense layers applied to tokens;
    otherwise (SD 1.x) they are 1x1 convs applied to the map. Same function, different weights.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, *, in_channels: int,
                 num_layers: int = 1, cross_attention_dim: int, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.use_linear_projection = use_linear_projection
        inner = num_attention_heads * attention_head_dim
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, options=options)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner, options=options, rngs=rngs)
            self.proj_out = Linear(inner, in_channels, options=options, rngs=rngs)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1, options=options, rngs=rngs)
            self.proj_out = Conv2d(inner, in_channels, 1, options=options, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    heads=num_attention_heads,
                    dim_head=attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    only_cross_attention=only_cross_attention,
                    options=options,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        residual = x  # (B, H, W, C)
        h = self.norm(x)
        # A 1x1 conv on the map and a dense layer on its tokens are the same map; diffusers uses
        # one or the other (SD 1.x / 2.x), which changes only the weights' shape.
        if self.use_linear_projection:
            h = self.proj_in(h.reshape(batch, height * width, -1))
        else:
            h = self.proj_in(h).reshape(batch, height * width, -1)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = call_block(block, h, context, remat=self.options.remat)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(batch, height, width, -1)
        else:
            h = self.proj_out(h.reshape(batch, height, width, -1))
        return h + residual


def _transformers(count: int, channels: int, heads: int, *, layers: int,
                  cross_attention_dim: int, args: BlockArgs, use_linear_projection: bool,
                  only_cross_attention: bool, options: ModelOptions,
                  rngs: nnx.Rngs) -> nnx.List:  # fmt: skip
    return nnx.List(
        [
            Transformer2DModel(
                heads,
                channels // heads,
                in_channels=channels,
                num_layers=layers,
                cross_attention_dim=cross_attention_dim,
                norm_num_groups=args.groups,
                use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross_attention,
                options=options,
                rngs=rngs,
            )
            for _ in range(count)
        ]
    )


def _cross_attention(block, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
    if context is None:
        raise ValueError(f"{type(block).__name__} needs encoder_hidden_states")
    return block.attentions[i](x, context)


class CrossAttnDownBlock2D(DownBlock2D):
    """Resnet then transformer, per layer; then an optional stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, args: BlockArgs,
                 transformer_layers: int, num_attention_heads: int, cross_attention_dim: int,
                 add_downsample: bool, downsample_padding: int = 1,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = resnet_chain(args, in_channels, out_channels, num_layers,
                                    options=options, rngs=rngs)  # fmt: skip
        self.attentions = _transformers(
            num_layers, out_channels, num_attention_heads, layers=transformer_layers,
            cross_attention_dim=cross_attention_dim, args=args,
            use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention, options=options, rngs=rngs,
        )  # fmt: skip
        self.downsamplers = downsampler(add_downsample, out_channels, downsample_padding,
                                        options=options, rngs=rngs)  # fmt: skip

    _attention = _cross_attention


class CrossAttnUpBlock2D(UpBlock2D):
    """Per layer: concatenate a skip, resnet, transformer; then an optional upsample."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, *,
                 num_layers: int, args: BlockArgs, transformer_layers: int,
                 num_attention_heads: int, cross_attention_dim: int, add_upsample: bool,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = skip_resnets(args, in_channels, prev_output_channel, out_channels,
                                    num_layers, options=options, rngs=rngs)  # fmt: skip
        self.attentions = _transformers(
            num_layers, out_channels, num_attention_heads, layers=transformer_layers,
            cross_attention_dim=cross_attention_dim, args=args,
            use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention, options=options, rngs=rngs,
        )  # fmt: skip
        self.upsamplers = upsampler(add_upsample, out_channels, options=options, rngs=rngs)

    _attention = _cross_attention


class UNetMidBlock2DCrossAttn(UNetMidBlock2D):
    """Resnet, then (transformer, resnet) per layer."""

    def __init__(self, in_channels: int, *, args: BlockArgs, num_layers: int = 1,
                 transformer_layers: int = 1, num_attention_heads: int, cross_attention_dim: int,
                 use_linear_projection: bool = False, options: ModelOptions,
                 rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = resnet_chain(args, in_channels, in_channels, num_layers + 1,
                                    options=options, rngs=rngs)  # fmt: skip
        self.attentions = _transformers(
            num_layers, in_channels, num_attention_heads, layers=transformer_layers,
            cross_attention_dim=cross_attention_dim, args=args,
            use_linear_projection=use_linear_projection, only_cross_attention=False,
            options=options, rngs=rngs,
        )  # fmt: skip

    _attention = _cross_attention
