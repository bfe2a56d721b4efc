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
from flaxdiff.models.resnet import Downsample2D, Upsample2D
from flaxdiff.models.unet_blocks import BlockArgs

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


def _transformer(channels: int, heads: int, *, layers: int, cross_attention_dim: int,
                 args: BlockArgs, use_linear_projection: bool, only_cross_attention: bool,
                 options: ModelOptions, rngs: nnx.Rngs) -> Transformer2DModel:  # fmt: skip
    return Transformer2DModel(
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


class CrossAttnDownBlock2D(nnx.Module):
    """Resnet then transformer, per layer; then an optional stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, args: BlockArgs,
                 transformer_layers: int, num_attention_heads: int, cross_attention_dim: int,
                 add_downsample: bool, downsample_padding: int = 1,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = nnx.List(
            [
                args.resnet(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    options=options,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = nnx.List(
            [
                _transformer(
                    out_channels,
                    num_attention_heads,
                    layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    args=args,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention,
                    options=options,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List(
                [Downsample2D(out_channels, padding=downsample_padding, options=options, rngs=rngs)]
            )
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            x = call_block(resnet, x, temb, remat=self.options.remat)
            x = attn(x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnUpBlock2D(nnx.Module):
    """Per layer: concatenate a skip, resnet, transformer; then an optional upsample."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, *,
                 num_layers: int, args: BlockArgs, transformer_layers: int,
                 num_attention_heads: int, cross_attention_dim: int, add_upsample: bool,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(
                args.resnet(resnet_in + skip_channels, out_channels, options=options, rngs=rngs)
            )
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(
            [
                _transformer(
                    out_channels,
                    num_attention_heads,
                    layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    args=args,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention,
                    options=options,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, options=options, rngs=rngs)])
            if add_upsample
            else None
        )

    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
                 context: jax.Array, upsample_size: tuple[int, int] | None = None):  # fmt: skip
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions, strict=True)):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = call_block(resnet, x, temb, remat=self.options.remat)
            x = attn(x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    """Resnet, then (transformer, resnet) per layer."""

    def __init__(self, in_channels: int, *, args: BlockArgs, num_layers: int = 1,
                 transformer_layers: int = 1, num_attention_heads: int, cross_attention_dim: int,
                 use_linear_projection: bool = False, options: ModelOptions,
                 rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = nnx.List(
            [args.resnet(in_channels, in_channels, options=options, rngs=rngs)
             for _ in range(num_layers + 1)]
        )  # fmt: skip
        self.attentions = nnx.List(
            [
                _transformer(
                    in_channels,
                    num_attention_heads,
                    layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    args=args,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=False,
                    options=options,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        remat = self.options.remat
        x = call_block(self.resnets[0], x, temb, remat=remat)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = attn(x, context)
            x = call_block(resnet, x, temb, remat=remat)
        return x
