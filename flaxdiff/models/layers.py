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
_COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16}  # --mixed_precision -> compute dtype


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

    @classmethod
    def from_config(cls, config: Any) -> ModelOptions:
        """The options a training config asks for: ``--mixed_precision`` (compute dtype),
        ``--attention`` and ``--gradient_checkpointing`` (remat). Parameters stay fp32.

        The config refuses fp16 for flax already (no loss scaling here)."""
        return cls(
            dtype=_COMPUTE_DTYPES[config.training.mixed_precision or "no"],
            attention=config.flax.attention,
            remat=config.training.gradient_checkpointing,
        )

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


def _invoke(module, *args):
    return module(*args)


def call_block(module: nnx.Module, *args: Any, remat: bool) -> Any:
    """Calls `module(*args)`, rematerialized in the backward pass when `remat` is set.

    Array arguments only (None allowed): everything else must live on the module.
    """
    if remat:
        return nnx.remat(_invoke)(module, *args)
    return module(*args)
