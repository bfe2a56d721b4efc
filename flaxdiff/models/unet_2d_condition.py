"""Stable Diffusion's UNet (1.x and 2.x): diffusers' ``UNet2DConditionModel`` in Flax NNX.

Module names follow diffusers one to one (``down_blocks.1.attentions.0.transformer_blocks.0
.attn2.to_k``), so weights convert by name (`state_dict.py`). Inputs are NHWC latents.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdiff.models.cross_attention_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn,
)
from flaxdiff.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from flaxdiff.models.layers import Conv2d, Embedding, GroupNorm, Linear, ModelOptions, activation
from flaxdiff.models.model_config import DiffusersConfig
from flaxdiff.models.unet_blocks import BlockArgs, DownBlock2D, UNetMidBlock2D, UpBlock2D

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(DiffusersConfig):
    """The arguments of diffusers' ``UNet2DConditionModel`` (same names and defaults).

    Note diffusers' naming: ``attention_head_dim`` is the number of heads per block when
    ``num_attention_heads`` is unset (SD 1.x: 8 heads; SD 2.x: [5, 10, 20, 20] heads).
    """

    class_name = "UNet2DConditionModel"

    sample_size: int | tuple | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def validate(self) -> None:
        self.check_levels(_DOWN_TYPES, _UP_TYPES)
        blocks = len(self.down_block_types)
        self.check_supported(
            {
                "mid_block_type": (self.mid_block_type in _MID_TYPES, _MID_TYPES),
                "dual_cross_attention": (not self.dual_cross_attention, "False"),
                "dropout": (self.dropout == 0.0, "0.0"),
                "encoder_hid_dim_type": (self.encoder_hid_dim_type is None, "None"),
                "addition_embed_type": (self.addition_embed_type is None, "None"),
                "class_embed_type": (
                    self.class_embed_type in _CLASS_EMBED_TYPES,
                    _CLASS_EMBED_TYPES,
                ),
                "time_embedding_type": (
                    self.time_embedding_type in ("positional", "fourier"),
                    "positional, fourier",
                ),
                "resnet_time_scale_shift": (
                    self.resnet_time_scale_shift in ("default", "scale_shift"),
                    "default, scale_shift",
                ),
                "time_cond_proj_dim": (self.time_cond_proj_dim is None, "None"),
                "attention_type": (self.attention_type == "default", "default"),
                "cross_attention_norm": (self.cross_attention_norm is None, "None"),
                "num_attention_heads": (
                    self.num_attention_heads is None,
                    "None (diffusers reads the head count from attention_head_dim)",
                ),
            }
        )
        if self.class_embed_type in ("projection", "simple_projection") and (
            self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                f"UNet2DConditionConfig: class_embed_type={self.class_embed_type!r} needs "
                "projection_class_embeddings_input_dim"
            )
        for name in ("only_cross_attention", "attention_head_dim", "cross_attention_dim",
                     "layers_per_block", "transformer_layers_per_block"):  # fmt: skip
            self.per_block(name, blocks)
        if any(
            isinstance(v, tuple) for v in self.per_block("transformer_layers_per_block", blocks)
        ):
            self.refuse("transformer_layers_per_block", "an int or one int per block")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers' ``attention_head_dim`` misnomer)."""
        return self.per_block("attention_head_dim", len(self.down_block_types))


class UNet2DConditionModel(nnx.Module):
    """diffusers' ``UNet2DConditionModel``: (noisy latents, timesteps, text embeddings) -> prediction."""

    config_class = UNet2DConditionConfig

    def __init__(self, config: UNet2DConditionConfig, *, options: ModelOptions | None = None,
                 rngs: nnx.Rngs | None = None):  # fmt: skip
        options = options or ModelOptions()
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.options = options
        c = config
        n = len(c.down_block_types)
        channels = c.block_out_channels
        self.act = activation(c.act_fn)
        self.conv_in = Conv2d(c.in_channels, channels[0], c.conv_in_kernel,
                              padding=(c.conv_in_kernel - 1) // 2, options=options, rngs=rngs)  # fmt: skip

        if c.time_embedding_type == "fourier":
            time_embed_dim = c.time_embedding_dim or channels[0] * 2
            if time_embed_dim % 2:
                raise ValueError(f"time_embedding_dim {time_embed_dim} must be even for fourier")
            self.time_proj = GaussianFourierProjection(
                time_embed_dim // 2, log=False, flip_sin_to_cos=c.flip_sin_to_cos,
                options=options, rngs=rngs,
            )  # fmt: skip
            timestep_input_dim = time_embed_dim
        else:
            time_embed_dim = c.time_embedding_dim or channels[0] * 4
            self.time_proj = Timesteps(channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                       downscale_freq_shift=c.freq_shift, options=options)  # fmt: skip
            timestep_input_dim = channels[0]
        self.time_embedding = TimestepEmbedding(
            timestep_input_dim, time_embed_dim, act_fn=c.act_fn, post_act_fn=c.timestep_post_act,
            options=options, rngs=rngs,
        )  # fmt: skip
        self.class_embedding = self._class_embedding(timestep_input_dim, time_embed_dim, rngs)
        self.time_embed_act = (
            activation(c.time_embedding_act_fn) if c.time_embedding_act_fn else None
        )
        temb_channels = time_embed_dim * 2 if c.class_embeddings_concat else time_embed_dim
        args = BlockArgs(temb_channels=temb_channels, eps=c.norm_eps, act_fn=c.act_fn,
                         groups=c.norm_num_groups, time_scale_shift=c.resnet_time_scale_shift)  # fmt: skip

        heads = c.heads
        cross_dims = c.per_block("cross_attention_dim", n)
        layers = c.per_block("layers_per_block", n)
        transformer_layers = c.per_block("transformer_layers_per_block", n)
        only_cross = c.per_block("only_cross_attention", n)
        down = []
        for i, block_type in enumerate(c.down_block_types):
            common = dict(num_layers=layers[i], args=args, add_downsample=i < n - 1,
                          downsample_padding=c.downsample_padding, options=options, rngs=rngs)  # fmt: skip
            in_ch = channels[i - 1] if i else channels[0]
            if block_type == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(
                    in_ch, channels[i], transformer_layers=transformer_layers[i],
                    num_attention_heads=heads[i], cross_attention_dim=cross_dims[i],
                    use_linear_projection=c.use_linear_projection,
                    only_cross_attention=only_cross[i], **common,
                ))  # fmt: skip
            else:
                down.append(DownBlock2D(in_ch, channels[i], **common))
        self.down_blocks = nnx.List(down)

        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], args=dataclasses.replace(args, output_scale_factor=c.mid_block_scale_factor),
                transformer_layers=transformer_layers[-1], num_attention_heads=heads[-1],
                cross_attention_dim=cross_dims[-1], use_linear_projection=c.use_linear_projection,
                options=options, rngs=rngs,
            )  # fmt: skip
        elif c.mid_block_type == "UNetMidBlock2D":
            # diffusers builds this one as a single resnet (no attention layers).
            self.mid_block = UNetMidBlock2D(
                channels[-1],
                args=dataclasses.replace(args, output_scale_factor=c.mid_block_scale_factor),
                num_layers=0,
                add_attention=False,
                options=options,
                rngs=rngs,
            )
        else:
            self.mid_block = None

        reversed_channels = channels[::-1]
        reversed_transformer_layers = (
            c.reverse_transformer_layers_per_block or transformer_layers[::-1]
        )
        up = []
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, n - 1)]
            common = dict(num_layers=layers[::-1][i] + 1, args=args, add_upsample=i < n - 1,
                          options=options, rngs=rngs)  # fmt: skip
            if block_type == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(
                    in_ch, prev_ch, out_ch, transformer_layers=reversed_transformer_layers[i],
                    num_attention_heads=heads[::-1][i], cross_attention_dim=cross_dims[::-1][i],
                    use_linear_projection=c.use_linear_projection,
                    only_cross_attention=only_cross[::-1][i], **common,
                ))  # fmt: skip
            else:
                up.append(UpBlock2D(in_ch, prev_ch, out_ch, **common))
        self.up_blocks = nnx.List(up)

        if c.norm_num_groups is not None:
            self.conv_norm_out = GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps,
                                           options=options)  # fmt: skip
        else:
            self.conv_norm_out = None
        self.conv_out = Conv2d(channels[0], c.out_channels, c.conv_out_kernel,
                               padding=(c.conv_out_kernel - 1) // 2, options=options, rngs=rngs)  # fmt: skip

    def _class_embedding(self, timestep_input_dim: int, time_embed_dim: int, rngs: nnx.Rngs):
        c, options = self.config, self.options
        if c.class_embed_type is None and c.num_class_embeds is not None:
            return Embedding(c.num_class_embeds, time_embed_dim, options=options, rngs=rngs)
        if c.class_embed_type == "timestep":
            return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=c.act_fn,
                                     options=options, rngs=rngs)  # fmt: skip
        if c.class_embed_type == "projection":
            return TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim,
                                     options=options, rngs=rngs)  # fmt: skip
        if c.class_embed_type == "simple_projection":
            return Linear(c.projection_class_embeddings_input_dim, time_embed_dim,
                          options=options, rngs=rngs)  # fmt: skip
        return None  # None, or "identity" (class labels are added as they are)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        *,
        class_labels: jax.Array | None = None,
    ) -> jax.Array:
        """The model output (noise, v or sample prediction, per the scheduler's prediction_type).

        Args:
          sample: noisy latents (B, H, W, C_in).
          timesteps: (B,) or a scalar (broadcast over the batch).
          encoder_hidden_states: text embeddings (B, L, cross_attention_dim).
          class_labels: (B,) class ids, (B,) timesteps or (B, D) vectors, as `class_embed_type`
            asks; required when the config has a class embedding.

        Returns:
          (B, H, W, C_out) in the compute dtype.
        """
        c = self.config
        dtype = self.options.dtype
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        emb = self.time_embedding(self.time_proj(timesteps).astype(dtype))  # (B, T)
        if c.class_embed_type is not None or c.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("this UNet has a class embedding: pass class_labels")
            if c.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).astype(dtype)
            class_emb = (
                class_labels if self.class_embedding is None else self.class_embedding(class_labels)
            ).astype(dtype)
            emb = (
                jnp.concatenate([emb, class_emb], -1)
                if c.class_embeddings_concat
                else emb + class_emb
            )
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        # Latents whose size is not a multiple of 2**(levels-1) upsample to the skip's size.
        factor = 2 ** (len(self.up_blocks) - 1)
        odd_size = sample.shape[1] % factor or sample.shape[2] % factor

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = tuple(skips[-count:]), skips[:-count]
            size = skips[-1].shape[1:3] if odd_size and i < len(self.up_blocks) - 1 else None
            h = block(h, block_skips, emb, encoder_hidden_states, size)
        if self.conv_norm_out is not None:
            h = self.act(self.conv_norm_out(h))
        return self.conv_out(h)
