"""diffusers' ``ResnetBlock2D`` and the 2x down/up-sampling layers, on NHWC maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdiff.models.layers import Conv2d, GroupNorm, Linear, ModelOptions, activation


class ResnetBlock2D(nnx.Module):
    """diffusers' ``ResnetBlock2D`` (time_embedding_norm ``default`` or ``scale_shift``)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *,
                 temb_channels: int | None = 512, groups: int = 32, groups_out: int | None = None,
                 eps: float = 1e-6, non_linearity: str = "swish",
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 use_in_shortcut: bool | None = None, conv_shortcut_bias: bool = True,
                 skip_time_act: bool = False, options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"resnet_time_scale_shift={time_embedding_norm!r} is not supported "
                "(use 'default' or 'scale_shift')"
            )
        out_channels = out_channels or in_channels
        self.options = options
        self.act = activation(non_linearity)
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, options=options)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, options=options, rngs=rngs)
        if temb_channels is not None:
            proj_out = out_channels * 2 if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = Linear(temb_channels, proj_out, options=options, rngs=rngs)
        else:
            self.time_emb_proj = None
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, options=options)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, options=options, rngs=rngs)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = (
            Conv2d(
                in_channels, out_channels, 1, bias=conv_shortcut_bias, options=options, rngs=rngs
            )
            if use_in_shortcut
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))  # (B, H, W, C_out)
        if self.time_emb_proj is not None and temb is not None:
            t = temb if self.skip_time_act else self.act(temb)
            t = self.time_emb_proj(t)[:, None, None, :]
            if self.time_embedding_norm == "default":
                h = self.norm2(h + t)
            else:
                scale, shift = jnp.split(t, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h)
        h = self.conv2(self.act(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """diffusers' ``Downsample2D``: a stride-2 conv (padding 0 pads right/bottom) or 2x2 avg pool."""

    def __init__(self, channels: int, *, use_conv: bool = True, out_channels: int | None = None,
                 padding: int = 1, options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        out_channels = out_channels or channels
        self.options = options
        if use_conv:
            # padding=0 is diffusers' asymmetric pad (0, 1, 0, 1) before an unpadded conv.
            pad = ((0, 1), (0, 1)) if padding == 0 else padding
            self.conv = Conv2d(channels, out_channels, 3, stride=2, padding=pad,
                               options=options, rngs=rngs)  # fmt: skip
        else:
            if out_channels != channels:
                raise ValueError("Downsample2D without a conv cannot change the channel count")
            self.conv = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv is not None:
            return self.conv(x)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """torch ``F.interpolate(mode="nearest")`` on NHWC: 2x, or to `size` (source index floor(i*in/out))."""
    if size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.floor(np.arange(size[0]) * (x.shape[1] / size[0])).astype(np.int32)
    cols = np.floor(np.arange(size[1]) * (x.shape[2] / size[1])).astype(np.int32)
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """diffusers' ``Upsample2D``: nearest 2x (or to an explicit size), then an optional 3x3 conv."""

    def __init__(self, channels: int, *, use_conv: bool = True, out_channels: int | None = None,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        out_channels = out_channels or channels
        self.options = options
        self.conv = (
            Conv2d(channels, out_channels, 3, padding=1, options=options, rngs=rngs)
            if use_conv
            else None
        )

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return x if self.conv is None else self.conv(x)
