"""The pixel-space DDPM UNet: diffusers' ``UNet2DModel`` in Flax NNX.

This is the model of diffusers' unconditional training tutorial (``configs/models/ddpm-128.yaml``).
Module names follow diffusers one to one (``down_blocks.1.attentions.0.to_q``,
``mid_block.resnets.1.conv2``), so `state_dict.torch_state_dict` yields exactly the keys of
diffusers' ``state_dict()``. Images are NHWC here, NCHW in diffusers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdiff.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from flaxdiff.models.layers import Conv2d, Embedding, GroupNorm, ModelOptions, activation
from flaxdiff.models.model_config import DiffusersConfig
from flaxdiff.models.unet_blocks import BlockArgs, UNetMidBlock2D, down_block, up_block

_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
_MID_TYPES = ("UNetMidBlock2D", None)
_TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
_CLASS_EMBED_TYPES = (None, "timestep", "identity")
_TIME_SCALE_SHIFTS = ("default", "scale_shift")


def _block_type(name: str) -> str:
    # diffusers' get_down_block/get_up_block read "UNetResDownBlock2D" as "DownBlock2D".
    return name[len("UNetRes") :] if name.startswith("UNetRes") else name


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(DiffusersConfig):
    """The arguments of diffusers' ``UNet2DModel`` (same names and defaults; lists as tuples).

    ``attention_head_dim`` is the width of one attention head (None: one head over all channels).
    ``time_embedding_dim`` defaults to 4 x ``block_out_channels[0]``.
    """

    class_name = "UNet2DModel"

    sample_size: int | tuple | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    def validate(self) -> None:
        self.check_levels(_DOWN_TYPES, _UP_TYPES, normalize=_block_type)
        self.check_supported(
            {
                "mid_block_type": (self.mid_block_type in _MID_TYPES, "UNetMidBlock2D, None"),
                "dropout": (self.dropout == 0.0, "0.0"),
                "downsample_type": (self.downsample_type == "conv", "conv"),
                "upsample_type": (self.upsample_type == "conv", "conv"),
                "resnet_time_scale_shift": (
                    self.resnet_time_scale_shift in _TIME_SCALE_SHIFTS,
                    ", ".join(_TIME_SCALE_SHIFTS),
                ),
                "time_embedding_type": (
                    self.time_embedding_type in _TIME_EMBEDDING_TYPES,
                    ", ".join(_TIME_EMBEDDING_TYPES),
                ),
                "class_embed_type": (
                    self.class_embed_type in _CLASS_EMBED_TYPES,
                    "None (with num_class_embeds for class ids), timestep, identity",
                ),
                # diffusers itself cannot build resnets without a group count.
                "norm_num_groups": (self.norm_num_groups is not None, "an int"),
            }
        )
        if self.time_embedding_type == "learned" and self.num_train_timesteps is None:
            raise ValueError(
                "UNet2DConfig: time_embedding_type='learned' needs num_train_timesteps "
                "(the number of rows of its embedding table)"
            )
        try:
            activation(self.act_fn)
        except ValueError as error:
            raise ValueError(f"UNet2DConfig: act_fn: {error}") from None

    @property
    def time_embed_dim(self) -> int:
        """Width of the time (and class) embedding the resnets receive."""
        return self.time_embedding_dim or self.block_out_channels[0] * 4


class UNet2DModel(nnx.Module):
    """diffusers' ``UNet2DModel``: (noisy image, timesteps[, class labels]) -> prediction."""

    config_class = UNet2DConfig

    def __init__(self, config: UNet2DConfig, *, options: ModelOptions | None = None,
                 rngs: nnx.Rngs | None = None):  # fmt: skip
        """Builds the model with PyTorch's default (random) init.

        Args:
          config: the architecture.
          options: compute dtype, parameter dtype, attention implementation, remat.
          rngs: random keys for the init; ``nnx.Rngs(0)`` when omitted.
        """
        options = options or ModelOptions()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.options = options
        c = config
        channels = c.block_out_channels
        levels = len(channels)
        time_embed_dim = c.time_embed_dim

        self.conv_in = Conv2d(c.in_channels, channels[0], 3, padding=1, options=options,
                              rngs=rngs)  # fmt: skip
        if c.time_embedding_type == "fourier":
            # diffusers fixes scale 16 and the log of the timesteps (sigmas); it ignores
            # flip_sin_to_cos here. sin and cos halves make the width 2 x channels[0].
            self.time_proj = GaussianFourierProjection(channels[0], scale=16.0, options=options,
                                                       rngs=rngs)  # fmt: skip
            timestep_input_dim = 2 * channels[0]
        elif c.time_embedding_type == "positional":
            self.time_proj = Timesteps(channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                       downscale_freq_shift=c.freq_shift, options=options)  # fmt: skip
            timestep_input_dim = channels[0]
        else:  # learned: one trained row per training timestep
            self.time_proj = Embedding(c.num_train_timesteps, channels[0], options=options,
                                       rngs=rngs)  # fmt: skip
            timestep_input_dim = channels[0]
        # diffusers' TimestepEmbedding here always uses silu, whatever act_fn says.
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim,
                                                options=options, rngs=rngs)  # fmt: skip

        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = Embedding(c.num_class_embeds, time_embed_dim, options=options,
                                             rngs=rngs)  # fmt: skip
        elif c.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim,
                                                     options=options, rngs=rngs)  # fmt: skip
        else:  # none, or "identity" (diffusers' parameterless nn.Identity)
            self.class_embedding = None
        # "identity" has no module but still adds the labels: track that apart from the module.
        self.uses_class_labels = c.class_embed_type is not None or c.num_class_embeds is not None

        args = BlockArgs(temb_channels=time_embed_dim, eps=c.norm_eps, act_fn=c.act_fn,
                         groups=c.norm_num_groups, time_scale_shift=c.resnet_time_scale_shift)  # fmt: skip

        def head_dim(width: int) -> int:
            return c.attention_head_dim if c.attention_head_dim is not None else width

        down = []
        for i, block_type in enumerate(c.down_block_types):
            in_ch = channels[i - 1] if i else channels[0]
            down.append(
                down_block(
                    _block_type(block_type),
                    in_channels=in_ch,
                    out_channels=channels[i],
                    num_layers=c.layers_per_block,
                    args=args,
                    add_downsample=i < levels - 1,
                    downsample_padding=c.downsample_padding,
                    attention_head_dim=head_dim(channels[i]),
                    options=options,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(down)

        if c.mid_block_type is None:
            self.mid_block = None
        else:
            self.mid_block = UNetMidBlock2D(
                channels[-1],
                args=dataclasses.replace(args, output_scale_factor=c.mid_block_scale_factor),
                add_attention=c.add_attention,
                attention_head_dim=head_dim(channels[-1]),
                attn_groups=c.attn_norm_num_groups,
                options=options,
                rngs=rngs,
            )

        reversed_channels = channels[::-1]
        up = []
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, levels - 1)]
            up.append(
                up_block(
                    _block_type(block_type),
                    in_channels=in_ch,
                    prev_output_channel=prev_ch,
                    out_channels=out_ch,
                    # One resnet more than a down block: it also takes the down block's input.
                    num_layers=c.layers_per_block + 1,
                    args=args,
                    add_upsample=i < levels - 1,
                    attention_head_dim=head_dim(out_ch),
                    options=options,
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps,
                                       options=options)  # fmt: skip
        # conv_act: diffusers' nn.SiLU (fixed, not act_fn), no parameters; applied in __call__.
        self.conv_out = Conv2d(channels[0], c.out_channels, 3, padding=1, options=options,
                               rngs=rngs)  # fmt: skip

    def _embed(self, timesteps: jax.Array, class_labels: jax.Array | None) -> jax.Array:
        """Time (+ class) embedding (B, time_embed_dim) in the compute dtype."""
        c = self.config
        dtype = self.options.dtype
        if c.time_embedding_type == "learned":
            timesteps = timesteps.astype(jnp.int32)  # rows of the embedding table
        emb = self.time_embedding(self.time_proj(timesteps).astype(dtype))
        if self.uses_class_labels:
            if class_labels is None:
                raise ValueError(
                    "this UNet2DModel has a class embedding "
                    f"(class_embed_type={c.class_embed_type!r}, num_class_embeds="
                    f"{c.num_class_embeds!r}): pass class_labels"
                )
            class_labels = jnp.asarray(class_labels)
            if c.class_embed_type == "timestep":
                # Class labels are embedded as timesteps would be, then get their own MLP.
                class_labels = self.time_proj(class_labels)
            if self.class_embedding is not None:
                class_labels = self.class_embedding(class_labels)
            emb = emb + class_labels.astype(dtype)
        elif class_labels is not None:
            raise ValueError(
                "class_labels given, but this UNet2DModel has no class embedding "
                "(set class_embed_type or num_class_embeds in its config)"
            )
        return emb

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        class_labels: jax.Array | None = None,
    ) -> jax.Array:
        """The model output (noise, v or sample prediction, per the scheduler's prediction_type).

        Args:
          sample: noisy images (B, H, W, C_in); H and W divisible by 2 ** (levels - 1).
          timesteps: (B,), (1,) or a scalar, broadcast over the batch. A Python number is
            truncated to an integer first, as diffusers does (``torch.tensor([t], long)``).
            Fourier embeddings take positive noise levels (sigmas): they use log(t).
          class_labels: (B,) class ids (``num_class_embeds``), (B,) timesteps
            (``class_embed_type="timestep"``) or (B, time_embed_dim) vectors ("identity");
            required exactly when the config has a class embedding.

        Returns:
          (B, H, W, C_out) in the compute dtype.
        """
        c = self.config
        dtype = self.options.dtype
        batch = sample.shape[0]
        sample = sample.astype(dtype)
        if c.center_input_sample:
            sample = 2 * sample - 1.0  # [0, 1] images -> [-1, 1]

        if isinstance(timesteps, int | float):
            timesteps = jnp.asarray([int(timesteps)])
        timesteps = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timesteps)), (batch,))
        emb = self._embed(timesteps, class_labels)  # (B, T)

        h = self.conv_in(sample)  # (B, H, W, C0)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        for block in self.up_blocks:
            # Each up block eats as many skips (from the end) as it has resnets.
            count = len(block.resnets)
            block_skips, skips = tuple(skips[-count:]), skips[:-count]
            h = block(h, block_skips, emb)

        h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))  # (B, H, W, C_out)
        if c.time_embedding_type == "fourier":
            # diffusers divides the output by the noise level (score-SDE parameterization).
            h = h / timesteps.astype(h.dtype)[:, None, None, None]
        return h
