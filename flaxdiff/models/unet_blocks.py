"""The UNet/VAE blocks without cross-attention, as diffusers' ``unet_2d_blocks`` builds them.

Feature maps are NHWC. A down block returns ``(hidden, skips)``: every resnet output and the
downsampled map, which the matching up block consumes from the end (concatenated on channels).
Blocks are built from their diffusers constructor arguments (`BlockArgs`), so a diffusers config
maps onto them one to one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdiff.models.attention import Attention, spatial_attention
from flaxdiff.models.layers import ModelOptions, call_block
from flaxdiff.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """What every resnet of a block shares (diffusers' ``resnet_*`` arguments)."""

    temb_channels: int | None
    eps: float = 1e-5
    act_fn: str = "silu"
    groups: int = 32
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0

    def resnet(self, in_channels: int, out_channels: int, *, options: ModelOptions,
               rngs: nnx.Rngs) -> ResnetBlock2D:  # fmt: skip
        return ResnetBlock2D(
            in_channels,
            out_channels,
            temb_channels=self.temb_channels,
            groups=self.groups,
            eps=self.eps,
            non_linearity=self.act_fn,
            time_embedding_norm=self.time_scale_shift,
            output_scale_factor=self.output_scale_factor,
            options=options,
            rngs=rngs,
        )

    def spatial_attention(self, channels: int, head_dim: int | None, *,
                          groups: int | None = None, group_norm: bool = True,
                          options: ModelOptions, rngs: nnx.Rngs) -> Attention:  # fmt: skip
        """diffusers' "deprecated attention block": [group norm], 1 or more heads, residual."""
        head_dim = head_dim or channels
        return Attention(
            channels,
            heads=channels // head_dim,
            dim_head=head_dim,
            bias=True,
            norm_num_groups=(self.groups if groups is None else groups) if group_norm else None,
            eps=self.eps,
            residual_connection=True,
            rescale_output_factor=self.output_scale_factor,
            options=options,
            rngs=rngs,
        )


def _attend(attn: Attention, x: jax.Array, options: ModelOptions) -> jax.Array:
    if options.remat:
        return nnx.remat(lambda a, h: spatial_attention(a, h))(attn, x)
    return spatial_attention(attn, x)


def resnet_chain(args: BlockArgs, in_channels: int, out_channels: int, count: int, *,
                 options: ModelOptions, rngs: nnx.Rngs) -> nnx.List:  # fmt: skip
    """`count` resnets, the first taking `in_channels` (down and decoder blocks)."""
    return nnx.List(
        [
            args.resnet(
                in_channels if i == 0 else out_channels, out_channels, options=options, rngs=rngs
            )
            for i in range(count)
        ]
    )


def skip_resnets(args: BlockArgs, in_channels: int, prev_output_channel: int,
                 out_channels: int, count: int, *, options: ModelOptions,
                 rngs: nnx.Rngs) -> nnx.List:  # fmt: skip
    """An up block's resnets: each also takes a skip of the down path concatenated on channels
    (the last one from the level below, `in_channels`; the first sees the block below's output)."""
    resnets = []
    for i in range(count):
        skip_channels = in_channels if i == count - 1 else out_channels
        resnet_in = prev_output_channel if i == 0 else out_channels
        resnets.append(
            args.resnet(resnet_in + skip_channels, out_channels, options=options, rngs=rngs)
        )
    return nnx.List(resnets)


def spatial_attentions(args: BlockArgs, channels: int, head_dim: int | None, count: int, *,
                       options: ModelOptions, rngs: nnx.Rngs) -> nnx.List:  # fmt: skip
    return nnx.List(
        [args.spatial_attention(channels, head_dim, options=options, rngs=rngs)
         for _ in range(count)]
    )  # fmt: skip


def downsampler(add: bool, channels: int, padding: int, *, options: ModelOptions,
                rngs: nnx.Rngs) -> nnx.List | None:  # fmt: skip
    if not add:
        return None
    return nnx.List([Downsample2D(channels, padding=padding, options=options, rngs=rngs)])


def upsampler(add: bool, channels: int, *, options: ModelOptions,
              rngs: nnx.Rngs) -> nnx.List | None:  # fmt: skip
    return nnx.List([Upsample2D(channels, options=options, rngs=rngs)]) if add else None


class DownBlock2D(nnx.Module):
    """Resnets (each followed by an attention in the attention variants), then an optional
    stride-2 conv: ``DownBlock2D``/``AttnDownBlock2D``, and the base of the cross-attention one.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, args: BlockArgs,
                 add_downsample: bool, downsample_padding: int = 1,
                 attention_head_dim: int | None = None, with_attention: bool = False,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = resnet_chain(args, in_channels, out_channels, num_layers,
                                    options=options, rngs=rngs)  # fmt: skip
        self.attentions = (
            spatial_attentions(
                args, out_channels, attention_head_dim, num_layers, options=options, rngs=rngs
            )
            if with_attention
            else None
        )
        self.downsamplers = downsampler(add_downsample, out_channels, downsample_padding,
                                        options=options, rngs=rngs)  # fmt: skip

    def _attention(self, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return _attend(self.attentions[i], x, self.options)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None,
                 context: jax.Array | None = None):  # fmt: skip
        """(B, H, W, C_in) -> ((B, H', W', C_out), the skips for the up path)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = call_block(resnet, x, temb, remat=self.options.remat)
            if self.attentions is not None:
                x = self._attention(i, x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock2D(nnx.Module):
    """Resnets fed with the down path's skips (each followed by an attention in the attention
    variants), then an optional upsample: ``UpBlock2D``/``AttnUpBlock2D``, and the base of the
    cross-attention one."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, *,
                 num_layers: int, args: BlockArgs, add_upsample: bool,
                 attention_head_dim: int | None = None, with_attention: bool = False,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = skip_resnets(args, in_channels, prev_output_channel, out_channels,
                                    num_layers, options=options, rngs=rngs)  # fmt: skip
        self.attentions = (
            spatial_attentions(
                args, out_channels, attention_head_dim, num_layers, options=options, rngs=rngs
            )
            if with_attention
            else None
        )
        self.upsamplers = upsampler(add_upsample, out_channels, options=options, rngs=rngs)

    def _attention(self, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return _attend(self.attentions[i], x, self.options)

    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array | None = None,
                 context: jax.Array | None = None,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:  # fmt: skip
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = call_block(resnet, x, temb, remat=self.options.remat)
            if self.attentions is not None:
                x = self._attention(i, x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2D(nnx.Module):
    """diffusers' ``UNetMidBlock2D``: resnet, then (attention, resnet) per layer."""

    def __init__(self, in_channels: int, *, args: BlockArgs, num_layers: int = 1,
                 add_attention: bool = True, attention_head_dim: int | None = None,
                 attn_groups: int | None = None, options: ModelOptions,
                 rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = resnet_chain(args, in_channels, in_channels, num_layers + 1,
                                    options=options, rngs=rngs)  # fmt: skip
        # diffusers gives the attention no group norm when attn_groups is unset and the
        # resnets are not "default" (UNet2DModel with resnet_time_scale_shift="scale_shift").
        attn_group_norm = attn_groups is not None or args.time_scale_shift == "default"
        self.attentions = (
            nnx.List(
                [
                    args.spatial_attention(
                        in_channels,
                        attention_head_dim,
                        groups=attn_groups,
                        group_norm=attn_group_norm,
                        options=options,
                        rngs=rngs,
                    )
                    for _ in range(num_layers)
                ]
            )
            if add_attention
            else None
        )

    def _attention(self, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return _attend(self.attentions[i], x, self.options)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None,
                 context: jax.Array | None = None) -> jax.Array:  # fmt: skip
        remat = self.options.remat
        x = call_block(self.resnets[0], x, temb, remat=remat)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                x = self._attention(i, x, context)
            x = call_block(resnet, x, temb, remat=remat)
        return x


def down_block(block_type: str, **kwargs) -> DownBlock2D:
    """A down block by its diffusers type name (the non-cross-attention ones)."""
    if block_type in ("DownBlock2D", "DownEncoderBlock2D"):
        return DownBlock2D(**kwargs)
    if block_type in ("AttnDownBlock2D", "AttnDownEncoderBlock2D"):
        return DownBlock2D(**kwargs, with_attention=True)
    raise ValueError(f"unsupported down block type {block_type!r}")


def up_block(block_type: str, **kwargs) -> UpBlock2D:
    """An up block by its diffusers type name (the non-cross-attention ones)."""
    if block_type == "UpBlock2D":
        return UpBlock2D(**kwargs)
    if block_type == "AttnUpBlock2D":
        return UpBlock2D(**kwargs, with_attention=True)
    raise ValueError(f"unsupported up block type {block_type!r}")


class UpDecoderBlock2D(nnx.Module):
    """diffusers' ``UpDecoderBlock2D`` (VAE decoder): resnets without skips or time, then upsample."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, args: BlockArgs,
                 add_upsample: bool, options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.resnets = resnet_chain(args, in_channels, out_channels, num_layers,
                                    options=options, rngs=rngs)  # fmt: skip
        self.upsamplers = upsampler(add_upsample, out_channels, options=options, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = call_block(resnet, x, None, remat=self.options.remat)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x
