"""Attention: one function with three implementations, and diffusers' ``Attention`` module.

``einsum`` is the plain reference; ``dot_product`` is ``jax.nn.dot_product_attention`` (XLA's
fused path, cuDNN's kernel on NVIDIA GPUs in half precision; on a CPU the same arithmetic laid
out heads first, which XLA's CPU backend runs faster); ``flash`` is the Pallas TPU
flash-attention kernel. The tests check all three against each other and the definition.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdiff.models.layers import ATTENTION_IMPLEMENTATIONS, GroupNorm, Linear, ModelOptions

# The platform the program being traced is compiled for. A step compiled ahead of time for TPU
# devices (`flaxdiff.plan`, on a CPU machine) must pick the TPU kernels although this process
# runs on a CPU; the strategies set it while tracing (`target_platform`).
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flaxdiff_target_platform", default=None
)
# A jit over a mesh: XLA cannot partition a Pallas (Mosaic) kernel, so the flash kernel runs
# under `shard_map`, each device on its rows of the batch (mesh, batch axes).
_BATCH_MESH: contextvars.ContextVar[tuple[Any, tuple[str, ...]] | None] = contextvars.ContextVar(
    "flaxdiff_batch_mesh", default=None
)


@contextlib.contextmanager
def target_platform(
    platform: str, *, mesh: Any = None, batch_axes: tuple[str, ...] = ()
) -> Iterator[None]:
    """Traces inside this block are for devices of `platform` ("tpu", "gpu", "cpu"); with
    `mesh`, for a jit over it whose batch dimension is split over `batch_axes`."""
    token = _TARGET_PLATFORM.set(platform)
    mesh_token = _BATCH_MESH.set((mesh, batch_axes) if mesh is not None else None)
    try:
        yield
    finally:
        _BATCH_MESH.reset(mesh_token)
        _TARGET_PLATFORM.reset(token)


def compile_platform() -> str:
    """The platform of the program being traced: `target_platform`'s, else this process's."""
    return _TARGET_PLATFORM.get() or jax.devices()[0].platform


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
        if _cudnn_applies(query, mask):
            try:  # cuDNN's fused flash attention; XLA's path below where it refuses the shapes
                return jax.nn.dot_product_attention(
                    query, key, value, scale=scale, implementation="cudnn"
                )
            except (ValueError, NotImplementedError, RuntimeError):
                pass
        if mask is None and query.dtype == jnp.float32 and compile_platform() == "cpu":
            return _heads_first_attention(query, key, value, scale=scale)
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)
    if implementation == "flash":
        if mask is not None:
            raise ValueError("attention=flash takes no mask; use dot_product for masked attention")
        batch_mesh = _BATCH_MESH.get()
        if batch_mesh is None:
            return _flash_attention(query, key, value, scale=scale)
        mesh, axes = batch_mesh
        rows = jax.sharding.PartitionSpec(axes)
        per_device = jax.shard_map(
            lambda q, k, v: _flash_attention(q, k, v, scale=scale),
            mesh=mesh,
            in_specs=(rows, rows, rows),
            out_specs=rows,
            check_vma=False,
        )
        return per_device(query, key, value)
    raise ValueError(
        f"attention={implementation!r}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
    )


def _heads_first_attention(query, key, value, *, scale):
    """`jax.nn.dot_product_attention`'s XLA arithmetic with the heads moved ahead of the tokens.

    XLA's CPU backend keeps the einsums' (B, Lq, H, D) operand order and transposes the
    (B, H, Lq, Lk) probabilities and their gradients around its matmul calls; transposing the
    (B, L, H, D) inputs and the output instead moves Lq/D times fewer bytes (32x for the tiny
    UNet's 256 tokens of 8 dims). Same products, same softmax: only the layout differs.
    float32 only: jax picks other dot precisions for half-precision inputs.
    """
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))  # (B, H, L, D)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * jnp.asarray(scale, jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    return out.transpose(0, 2, 1, 3)  # (B, Lq, H, D)


def _cudnn_applies(query: jax.Array, mask: jax.Array | None) -> bool:
    """cuDNN's kernel takes fp16/bf16 on an NVIDIA GPU, head dims a multiple of 8 up to 128."""
    head_dim = query.shape[-1]
    return (
        mask is None
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and compile_platform() == "gpu"
    )


_FLASH_BLOCK = 128


def _flash_attention(query, key, value, *, scale):
    """The Pallas TPU flash-attention kernel; sequences padded to its block size.

    Padded keys get their own segment id, so no real query attends to them; padded query rows
    are cut off. Runs on TPU (or in Pallas' TPU interpret mode, which the tests use on CPU).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    platform = compile_platform()
    if platform != "tpu" and not _tpu_interpret_mode_active():
        raise ValueError(
            f"attention=flash needs a TPU (this program is compiled for {platform}); "
            "use --attention dot_product (cuDNN flash attention on GPU) or einsum"
        )
    length_q, length_k = query.shape[1], key.shape[1]
    pad_q = -length_q % _FLASH_BLOCK
    pad_k = -length_k % _FLASH_BLOCK
    # The kernel takes head dims up to 128 or multiples of 128 (SD 1.5's deepest level has 160):
    # zero features change no dot product, and the output's zero columns are cut off below.
    head_dim = query.shape[-1]
    pad_d = -head_dim % _FLASH_BLOCK if head_dim > _FLASH_BLOCK else 0

    def heads_first(x, pad):  # (B, L, H, D) -> (B, H, L + pad, D + pad_d)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, pad_d))).transpose(0, 2, 1, 3)

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
    return out.transpose(0, 2, 1, 3)[:, :length_q, :, :head_dim]


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
