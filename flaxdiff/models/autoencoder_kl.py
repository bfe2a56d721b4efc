"""The KL autoencoder of Stable Diffusion 1.x/2.x (diffusers' ``AutoencoderKL``) in Flax NNX.

Images and latents are NHWC: an image batch (B, H, W, in_channels) encodes to a diagonal
Gaussian over latents (B, H / 2**(L-1), W / 2**(L-1), latent_channels), L = number of levels.
Modules carry diffusers' attribute names (``encoder.down_blocks.0.resnets.1.conv1``), so
`flaxdiff.models.state_dict` maps a diffusers ``diffusion_pytorch_model`` state dict onto this
model one to one; the config is diffusers' ``config.json`` (`AutoencoderKLConfig`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from flaxdiff.models.layers import Conv2d, GroupNorm, ModelOptions, activation, call_block
from flaxdiff.models.model_config import DiffusersConfig
from flaxdiff.models.unet_blocks import BlockArgs, UNetMidBlock2D, UpDecoderBlock2D, down_block
from shared import model_folders

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)

# diffusers builds every VAE resnet, attention and output norm with this eps, whatever the config.
_VAE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(DiffusersConfig):
    """The arguments of diffusers' ``AutoencoderKL.__init__`` (same names and defaults).

    ``sample_size``, ``scaling_factor``, ``shift_factor``, ``latents_mean``/``latents_std`` and
    ``force_upcast`` shape no parameter: they are kept so a config survives a round trip and so
    trainers can read the latent scaling from one place.
    """

    class_name = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def validate(self) -> None:
        self.check_levels(SUPPORTED_DOWN_BLOCKS, SUPPORTED_UP_BLOCKS)
        activation(self.act_fn)  # fail at config time on an unknown activation name


@struct.dataclass
class DiagonalGaussian:
    """The posterior q(z | x): a Gaussian with diagonal covariance over latents (B, h, w, C).

    Attributes:
      mean: (B, h, w, C).
      logvar: (B, h, w, C), clamped to [-30, 20] as diffusers does (keeps exp() finite).
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits encoder moments (B, h, w, 2C) into mean (first C channels) and log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterized draw: mean + std * N(0, 1) noise from `key` (gradients flow)."""
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over (h, w, C): shape (B,)."""
        terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * terms.sum(axis=(1, 2, 3))


def _vae_block_args(config: AutoencoderKLConfig) -> BlockArgs:
    # No time embedding in a VAE; diffusers hard-codes eps 1e-6 and the config's group count.
    return BlockArgs(
        temb_channels=None, eps=_VAE_EPS, act_fn=config.act_fn, groups=config.norm_num_groups
    )


class Encoder(nnx.Module):
    """diffusers' VAE ``Encoder`` with ``double_z``: image (B, H, W, in) -> moments (B, h, w, 2C)."""

    def __init__(self, config: AutoencoderKLConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        self.options = options
        self.act = activation(config.act_fn)
        channels = config.block_out_channels
        args = _vae_block_args(config)
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, options=options,
                              rngs=rngs)  # fmt: skip
        blocks = []
        for i, block_type in enumerate(config.down_block_types):
            blocks.append(
                down_block(
                    block_type,
                    in_channels=channels[max(i - 1, 0)],
                    out_channels=channels[i],
                    num_layers=config.layers_per_block,
                    args=args,
                    add_downsample=i < len(channels) - 1,
                    # diffusers' asymmetric (0, 1, 0, 1) pad before the stride-2 conv.
                    downsample_padding=0,
                    attention_head_dim=channels[i],
                    options=options,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(
            channels[-1],
            args=args,
            add_attention=config.mid_block_add_attention,
            attention_head_dim=channels[-1],  # one head over all channels
            options=options,
            rngs=rngs,
        )
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[-1], eps=_VAE_EPS,
                                       options=options)  # fmt: skip
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1,
                               options=options, rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, in) -> (B, h, w, 2 * latent)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)  # the skips feed a UNet's up path; a VAE has none
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


def _resnet_then_upsample(resnet: nnx.Module, upsampler: nnx.Module, x: jax.Array) -> jax.Array:
    return upsampler(resnet(x, None))


def _up_decoder_block(block: UpDecoderBlock2D, x: jax.Array, *, remat: bool) -> jax.Array:
    """Runs `block`; under remat its last resnet and the upsampler are one remat region.

    Why one region: jax.checkpoint puts an optimization barrier on the cotangents entering a
    region. Were the upsampler outside, XLA could no longer merge the transpose of the nearest
    upsample (a 2x2 sum) into the resnet's bias-gradient sum, and that float32 sum would be
    reordered: gradients 1 ulp off the remat-free ones. Together, remat changes no bit, and the
    upsampled map (4x the resnet output) is recomputed rather than stored.
    """
    if not remat or block.upsamplers is None:
        return block(x)
    *head, last = block.resnets
    for resnet in head:
        x = call_block(resnet, x, None, remat=True)
    return nnx.remat(_resnet_then_upsample)(last, block.upsamplers[0], x)


class Decoder(nnx.Module):
    """diffusers' VAE ``Decoder`` (group norms): latents (B, h, w, C) -> image (B, H, W, out)."""

    def __init__(self, config: AutoencoderKLConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        self.options = options
        self.act = activation(config.act_fn)
        reversed_channels = tuple(reversed(config.block_out_channels))
        args = _vae_block_args(config)
        self.conv_in = Conv2d(config.latent_channels, reversed_channels[0], 3, padding=1,
                              options=options, rngs=rngs)  # fmt: skip
        self.mid_block = UNetMidBlock2D(
            reversed_channels[0],
            args=args,
            add_attention=config.mid_block_add_attention,
            attention_head_dim=reversed_channels[0],
            options=options,
            rngs=rngs,
        )
        # Every up block has one resnet more than a down block (diffusers' layers_per_block + 1).
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    reversed_channels[max(i - 1, 0)],
                    reversed_channels[i],
                    num_layers=config.layers_per_block + 1,
                    args=args,
                    add_upsample=i < len(reversed_channels) - 1,
                    options=options,
                    rngs=rngs,
                )
                for i in range(len(config.up_block_types))
            ]
        )
        self.conv_norm_out = GroupNorm(config.norm_num_groups, reversed_channels[-1],
                                       eps=_VAE_EPS, options=options)  # fmt: skip
        self.conv_out = Conv2d(reversed_channels[-1], config.out_channels, 3, padding=1,
                               options=options, rngs=rngs)  # fmt: skip

    def __call__(self, z: jax.Array) -> jax.Array:  # (B, h, w, latent) -> (B, H, W, out)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = _up_decoder_block(block, x, remat=self.options.remat)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers' ``AutoencoderKL``: encoder, 1x1 quant convs, decoder; NHWC throughout.

    Example:
      >>> vae = AutoencoderKL(AutoencoderKLConfig.from_dict(config_json))
      >>> latents = vae.latents_from_images(images, key)   # (B, H/8, W/8, 4), scaled
      >>> images = vae.images_from_latents(latents)        # (B, H, W, 3)
    """

    # Weights saved before diffusers' attention refactor name the VAE attention projections
    # query/key/value/proj_attn (diffusers' ``_convert_deprecated_attention_blocks``); they are
    # the same (C, C) matrices as to_q/to_k/to_v/to_out.0 (a (C, C, 1, 1) conv weight also loads).
    torch_key_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"(\.attentions\.\d+)\.query\.(weight|bias)$", r"\1.to_q.\2"),
        (r"(\.attentions\.\d+)\.key\.(weight|bias)$", r"\1.to_k.\2"),
        (r"(\.attentions\.\d+)\.value\.(weight|bias)$", r"\1.to_v.\2"),
        (r"(\.attentions\.\d+)\.proj_attn\.(weight|bias)$", r"\1.to_out.0.\2"),
    )

    def __init__(self, config: AutoencoderKLConfig, *, options: ModelOptions | None = None,
                 rngs: nnx.Rngs | None = None):  # fmt: skip
        """Builds the model (random PyTorch-style init; load weights with `state_dict`).

        Args:
          config: the diffusers config.
          options: compute dtype, parameter dtype, attention implementation, remat.
          rngs: initializer keys; a fresh ``nnx.Rngs(0)`` when None (deterministic init).
        """
        options = ModelOptions() if options is None else options
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.options = options
        self.encoder = Encoder(config, options=options, rngs=rngs)
        self.decoder = Decoder(config, options=options, rngs=rngs)
        moments = 2 * config.latent_channels
        self.quant_conv = (
            Conv2d(moments, moments, 1, options=options, rngs=rngs)
            if config.use_quant_conv
            else None
        )
        latent = config.latent_channels
        self.post_quant_conv = (
            Conv2d(latent, latent, 1, options=options, rngs=rngs)
            if config.use_post_quant_conv
            else None
        )

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        """The config's shift_factor, 0.0 where it is None (SD 1.x/2.x)."""
        return self.config.shift_factor or 0.0

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B, H, W, in_channels), about [-1, 1] -> the posterior over latents."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, H, W, out_channels)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, *, sample_posterior: bool = False,
                 key: jax.Array | None = None) -> jax.Array:  # fmt: skip
        """Reconstructs `x`: decodes the posterior mode, or a draw from it with `key`."""
        if sample_posterior and key is None:
            raise ValueError("sample_posterior=True needs a PRNG key")
        posterior = self.encode(x)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z)

    def latents_from_images(self, images: jax.Array, key: jax.Array | None) -> jax.Array:
        """The diffusion model's latents: (z - shift_factor) * scaling_factor, z ~ q(z | images).

        Args:
          images: (B, H, W, in_channels) in [-1, 1].
          key: draws z from the posterior, as diffusers' training scripts do; None takes the
            posterior mean (deterministic).
        """
        posterior = self.encode(images)
        z = posterior.mode() if key is None else posterior.sample(key)
        return model_folders.to_latents(
            z, scaling_factor=self.scaling_factor, shift_factor=self.config.shift_factor
        )

    def images_from_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `latents_from_images`: decode(latents / scaling_factor + shift_factor)."""
        z = model_folders.from_latents(
            latents, scaling_factor=self.scaling_factor, shift_factor=self.config.shift_factor
        )
        return self.decode(z)
