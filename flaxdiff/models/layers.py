"""Building blocks shared by the Flax models, named as diffusers/transformers name theirs.

Every module keeps the attribute names of its PyTorch counterpart (``conv1``, ``time_emb_proj``,
``to_out.0``), so a parameter path ``down_blocks.0.resnets.1.conv1.kernel`` is the diffusers
weight ``down_blocks.0.resnets.1.conv1.weight`` after a transpose (see `convert.py`).

Layouts are the Flax ones: images NHWC, conv kernels HWIO, dense kernels (in, out). Parameters
are stored in ``options.param_dtype`` (fp32 master weights) and cast to ``options.dtype`` for
compute; group/layer norms and softmax run in at least fp32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ATTENTION_IMPLEMENTATIONS = ("dot_product", "einsum", "flash")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a model computes; not part of its diffusers config (a checkpoint does not store it).

    Attributes:
      dtype: compute dtype (``float32``, ``bfloat16``; ``float64`` for parity tests).
      param_dtype: dtype the parameters are created and kept in (fp32 master weights).
      attention: ``dot_product`` (``jax.nn.dot_product_attention``: cuDNN on GPU where it
        applies), ``einsum`` (the plain reference) or ``flash`` (Pallas kernel, TPU only).
      remat: recompute each resnet / attention block in the backward pass (gradient
        checkpointing): less activation memory for about one more forward pass of compute.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "dot_product"
    remat: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention={self.attention!r}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def norm_dtype(self) -> jnp.dtype:
        """The dtype of norms and softmax: the compute dtype, but never below fp32."""
        return jnp.promote_types(self.dtype, jnp.float32)


class Buffer(nnx.Variable):
    """A saved, never-trained array (diffusers' ``requires_grad=False`` parameters)."""


def set_options(model: nnx.Module, **changes: Any) -> nnx.Module:
    """Replaces fields of `ModelOptions` (e.g. ``remat=True``) in every module of `model`."""
    for _, module in nnx.iter_modules(model):
        if isinstance(getattr(module, "options", None), ModelOptions):
            module.options = dataclasses.replace(module.options, **changes)
    return model


# ---------------------------------------------------------------------------------------------
# Activations (the names diffusers' get_activation and transformers' ACT2FN accept)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": _mish,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` (ValueError naming the known ones otherwise)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Parameters and their init (PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)))


@dataclasses.dataclass(frozen=True)
class Init:
    """How a parameter is drawn: ``uniform`` U(-scale, scale), ``normal`` N(0, scale^2), or
    ``constant`` (every entry = scale).

    Each parameter carries its `Init` as metadata, so `fill_random` can draw a whole model
    on the host with numpy (seconds for SD 1.5) instead of compiling one XLA program per
    initializer (minutes on CPU).
    """

    kind: str
    scale: float

    @classmethod
    def fan_in(cls, fan_in: int) -> Init:
        return cls("uniform", 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)

    def jax(self, key: jax.Array | None, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -self.scale, self.scale)
        if self.kind == "normal":
            return self.scale * jax.random.normal(key, shape, dtype)
        return jnp.full(shape, self.scale, dtype)

    def numpy(self, rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if self.kind == "uniform":
            value = rng.uniform(-self.scale, self.scale, shape)
        elif self.kind == "normal":
            value = self.scale * rng.standard_normal(shape)
        else:
            value = np.full(shape, self.scale)
        return value.astype(dtype)


ONES = Init("constant", 1.0)
ZEROS = Init("constant", 0.0)


def new_param(rngs: nnx.Rngs, shape: tuple[int, ...], init: Init, *, dtype: Any,
              kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:  # fmt: skip
    """A parameter (or `Buffer`) drawn by `init`, which it keeps as metadata."""
    key = None if init.kind == "constant" else rngs.params()
    return kind(init.jax(key, shape, dtype), init=init)


def fill_random(model: nnx.Module, seed: int) -> nnx.Module:
    """Draws every variable that carries an `Init` with numpy, in place (e.g. of an abstract
    model from ``nnx.eval_shape``). Each variable gets its own stream, keyed by its path, so a
    value does not depend on which other layers exist."""
    for path, variable in nnx.iter_graph(model):
        init = getattr(variable, "init", None) if isinstance(variable, nnx.Variable) else None
        if isinstance(init, Init):
            key = zlib.crc32(".".join(map(str, path)).encode())
            rng = np.random.default_rng([seed, key])
            variable.set_value(jnp.asarray(init.numpy(rng, tuple(variable.shape), variable.dtype)))
    return model


class Linear(nnx.Module):
    """``torch.nn.Linear``: kernel (in, out), bias (out,)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 kernel_init: Init | None = None, bias_init: Init | None = None,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        dtype = options.param_dtype
        default = Init.fan_in(in_features)
        self.kernel = new_param(rngs, (in_features, out_features), kernel_init or default,
                                dtype=dtype)  # fmt: skip
        self.bias = (
            new_param(rngs, (out_features,), bias_init or default, dtype=dtype) if bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.options.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Conv2d(nnx.Module):
    """``torch.nn.Conv2d`` on NHWC inputs: kernel (kh, kw, in, out).

    `padding` is symmetric (an int, as torch) or explicit ``((top, bottom), (left, right))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 stride: int = 1, padding: int | tuple = 0, bias: bool = True,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.stride = stride
        self.padding = (
            ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
        )
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        dtype = options.param_dtype
        init = Init.fan_in(in_channels * kernel_size * kernel_size)
        self.kernel = new_param(rngs, shape, init, dtype=dtype)
        self.bias = new_param(rngs, (out_channels,), init, dtype=dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C_in) -> (B, H', W', C_out)
        dtype = self.options.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm`` over the last (channel) axis, computed in at least fp32."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 affine: bool = True, options: ModelOptions):  # fmt: skip
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: {num_channels} channels do not split into {num_groups} groups "
                "(check norm_num_groups against block_out_channels in the model config)"
            )
        self.options = options
        self.num_groups = num_groups
        self.eps = eps
        dtype = options.param_dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype), init=ONES) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype), init=ZEROS) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, ..., C)
        norm_dtype = self.options.norm_dtype
        shape = x.shape
        grouped = x.astype(norm_dtype).reshape(*shape[:-1], self.num_groups, -1)
        axes = (*range(1, grouped.ndim - 2), grouped.ndim - 1)  # all but batch and group
        mean = grouped.mean(axis=axes, keepdims=True)
        centered = grouped - mean
        var = jnp.square(centered).mean(axis=axes, keepdims=True)
        y = (centered * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        if self.scale is not None:
            y = y * self.scale[...].astype(norm_dtype) + self.bias[...].astype(norm_dtype)
        return y.astype(self.options.dtype)


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm`` over the last axis, computed in at least fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True, bias: bool = True,
                 options: ModelOptions):  # fmt: skip
        self.options = options
        self.eps = eps
        dtype = options.param_dtype
        self.scale = nnx.Param(jnp.ones((dim,), dtype), init=ONES) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), init=ZEROS) if affine and bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        norm_dtype = self.options.norm_dtype
        x = x.astype(norm_dtype)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        var = jnp.square(centered).mean(axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(norm_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(norm_dtype)
        return y.astype(self.options.dtype)


class Embedding(nnx.Module):
    """``torch.nn.Embedding``: embedding (num_embeddings, dim), init N(0, std)."""

    def __init__(self, num_embeddings: int, dim: int, *, std: float = 1.0,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.embedding = new_param(
            rngs, (num_embeddings, dim), Init("normal", std), dtype=options.param_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.options.dtype)


# ---------------------------------------------------------------------------------------------
# Attention


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    implementation: str,
    mask: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention.

    Args:
      query: (B, Lq, H, D); key, value: (B, Lk, H, D).
      implementation: one of `ATTENTION_IMPLEMENTATIONS`.
      mask: bool, broadcastable to (B, H, Lq, Lk); True where a query may attend.
      scale: multiplies the logits; default 1/sqrt(D).

    Returns:
      (B, Lq, H, D) in the dtype of `query`. Logits and softmax run in at least fp32.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "dot_product" and query.dtype == jnp.float64:
        # jax.nn.dot_product_attention always rounds the logits to float32 for its softmax
        # (jax._src.nn.functions._dot_product_attention_core): ~1e-8 off in a float64 model.
        # float64 runs only in parity tests, on CPU, where its XLA path is this einsum anyway.
        implementation = "einsum"
    if implementation == "einsum":
        logits_dtype = jnp.promote_types(query.dtype, jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=logits_dtype)
        logits = logits * jnp.asarray(scale, logits_dtype)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits_dtype).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    if implementation == "dot_product":
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)
    if implementation == "flash":
        if mask is not None:
            raise ValueError("attention=flash takes no mask; use dot_product for masked attention")
        return _flash_attention(query, key, value, scale=scale)
    raise ValueError(
        f"attention={implementation!r}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
    )


_FLASH_BLOCK = 128


def _flash_attention(query, key, value, *, scale):
    """The Pallas TPU flash-attention kernel; sequences padded to its block size.

    Padded keys get their own segment id, so no real query attends to them; padded query rows
    are cut off. Runs on TPU (or in Pallas' TPU interpret mode, which the tests use on CPU).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    platform = jax.devices()[0].platform
    if platform != "tpu" and not _tpu_interpret_mode_active():
        raise ValueError(
            f"attention=flash needs a TPU (this process runs on {platform}); "
            "use --attention dot_product (cuDNN flash attention on GPU) or einsum"
        )
    length_q, length_k = query.shape[1], key.shape[1]
    pad_q = -length_q % _FLASH_BLOCK
    pad_k = -length_k % _FLASH_BLOCK

    def heads_first(x, pad):  # (B, L, H, D) -> (B, H, L + pad, D)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    batch = query.shape[0]
    segment_ids = None
    if pad_q or pad_k:
        q_ids = jnp.concatenate([jnp.zeros(length_q, jnp.int32), jnp.ones(pad_q, jnp.int32)])
        kv_ids = jnp.concatenate([jnp.zeros(length_k, jnp.int32), jnp.full(pad_k, 2, jnp.int32)])
        segment_ids = pallas_flash.SegmentIds(
            q=jnp.broadcast_to(q_ids, (batch, length_q + pad_q)),
            kv=jnp.broadcast_to(kv_ids, (batch, length_k + pad_k)),
        )
    block = pallas_flash.BlockSizes(
        block_q=_FLASH_BLOCK, block_k_major=_FLASH_BLOCK, block_k=_FLASH_BLOCK, block_b=1,
        block_q_major_dkv=_FLASH_BLOCK, block_k_major_dkv=_FLASH_BLOCK, block_k_dkv=_FLASH_BLOCK,
        block_q_dkv=_FLASH_BLOCK, block_k_major_dq=_FLASH_BLOCK, block_k_dq=_FLASH_BLOCK,
        block_q_dq=_FLASH_BLOCK,
    )  # fmt: skip
    out = pallas_flash.flash_attention(
        heads_first(query, pad_q),
        heads_first(key, pad_k),
        heads_first(value, pad_k),
        segment_ids=segment_ids,
        sm_scale=float(scale),
        block_sizes=block,
    )
    # Padded query rows attend to nothing (segment 1 has no keys) and are dropped here.
    return out.transpose(0, 2, 1, 3)[:, :length_q]


def _tpu_interpret_mode_active() -> bool:
    # Set by `pltpu.force_tpu_interpret_mode()`, which runs TPU kernels on CPU (tests).
    from jax._src import config as jax_config  # the option has no public accessor

    return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None


class Attention(nnx.Module):
    """diffusers' ``Attention``: to_q/to_k/to_v/to_out.0, optional group norm and residual.

    Called on tokens (B, L, C); `SpatialAttention` wraps it for (B, H, W, C) feature maps.
    """

    def __init__(self, query_dim: int, *, cross_attention_dim: int | None = None,
                 heads: int = 8, dim_head: int = 64, bias: bool = False, out_bias: bool = True,
                 norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0,
                 options: ModelOptions, rngs: nnx.Rngs):  # fmt: skip
        self.options = options
        self.heads = heads
        self.dim_head = dim_head
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.group_norm = (
            GroupNorm(norm_num_groups, query_dim, eps=eps, options=options)
            if norm_num_groups is not None
            else None
        )
        self.to_q = Linear(query_dim, inner, bias=bias, options=options, rngs=rngs)
        self.to_k = Linear(context_dim, inner, bias=bias, options=options, rngs=rngs)
        self.to_v = Linear(context_dim, inner, bias=bias, options=options, rngs=rngs)
        self.to_out = nnx.List(
            [Linear(inner, query_dim, bias=out_bias, options=options, rngs=rngs)]
        )

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x  # (B, L, C)
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        batch = x.shape[0]

        def split_heads(t):  # (B, L, H*D) -> (B, L, H, D)
            return t.reshape(batch, -1, self.heads, self.dim_head)

        out = attention(
            split_heads(self.to_q(x)),
            split_heads(self.to_k(context)),
            split_heads(self.to_v(context)),
            implementation=self.options.attention,
        )
        out = self.to_out[0](out.reshape(batch, -1, self.heads * self.dim_head))
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


def spatial_attention(attn: Attention, x: jax.Array) -> jax.Array:
    """Applies a group-normed residual `Attention` to a (B, H, W, C) map as H*W tokens."""
    batch, height, width, channels = x.shape
    return attn(x.reshape(batch, height * width, channels)).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Resnet, down/up-sampling, time embeddings


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


def _invoke(module, *args):
    return module(*args)


def call_block(module: nnx.Module, *args: Any, remat: bool) -> Any:
    """Calls `module(*args)`, rematerialized in the backward pass when `remat` is set.

    Array arguments only (None allowed): everything else must live on the module.
    """
    if remat:
        return nnx.remat(_invoke)(module, *args)
    return module(*args)
