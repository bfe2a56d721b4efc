"""Optimizer, learning-rate schedule, gradient accumulation and EMA of the flax backend.

Each piece computes what the torch backend computes (`torchdiff.optim`, torch AdamW, diffusers'
`EMAModel`), and is tested against the numpy references in `shared.run.lr` and `shared.run.ema`.

How the trainer uses them, once per optimizer update inside the jitted step:

    loss, grads = accumulate_gradients(loss_and_grads, params, batch,
                                       accumulation_steps=cfg.training.gradient_accumulation_steps)
    result = apply_gradients(optimizer, grads, opt_state, params, step=state.step, loss=loss)
    ema_step = state.ema_step + result.finite
    ema = select_tree(result.finite,
                      ema_update(state.ema, result.params, step=ema_step, cfg_ema=cfg.ema),
                      state.ema)

Two counters, as in torch: `step` counts every update including skipped ones and drives the LR
(torch calls `lr_scheduler.step()` after a skipped update too); Adam's bias correction and the EMA
count only the updates that were applied (torch's `optimizer.step()` and `ema.step()` are not
called for a skipped one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shared.config import TrainConfig
from shared.run import lr
from shared.schema import EMAConfig

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6), not by the norm as optax's
# clip_by_global_norm does: a 1e-6 relative difference on every clipped step, far above rounding.
_TORCH_CLIP_EPS = 1e-6


def _default_float() -> jnp.dtype:
    """float64 when jax_enable_x64 is on, else float32: the precision the run computes in."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def learning_rate_schedule(cfg: TrainConfig, *, base_lr: float, total_steps: int) -> optax.Schedule:
    """The `--lr_scheduler` LR as a jnp function of the count of completed updates.

    The values are the numpy reference `shared.run.lr.learning_rate` evaluated on the host for
    steps 0..total_steps and rounded once to the run's float dtype, so every update uses exactly
    the float32 (or, with x64, float64) value of the reference; an analytic jnp formula would
    round cos/pow in float32 on the device and drift from torch by an ulp or more. Steps past
    `total_steps` hold the value at `total_steps` (a run never updates there; diffusers' plain
    cosine alone would rise again).

    Args:
      cfg: the run config; reads `cfg.optim` (schedule, warmup, cycles, power).
      base_lr: the peak LR, after `--scale_lr` (`shared.plan.RunPlan.learning_rate`).
      total_steps: the run's total optimizer updates (`RunPlan.max_train_steps`).

    Returns:
      `schedule(step) -> lr`, `step` an int (array) of completed updates, jit-friendly.

    Raises:
      ConfigError: a schedule that would fail mid-run (see `shared.run.lr.check_schedule`).
    """
    lr.check_schedule(cfg.optim, base_lr=base_lr, total_steps=total_steps)
    values = np.array(
        [
            lr.learning_rate(cfg.optim, base_lr=base_lr, total_steps=total_steps, step=step)
            for step in range(total_steps + 1)
        ],
        dtype=np.float64,
    )  # (total_steps + 1,)
    table = jnp.asarray(values, dtype=_default_float())

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        return table[jnp.clip(step, 0, total_steps)]

    return schedule


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Scales the gradients by `min(1, max_norm / (norm + 1e-6))`, as `clip_grad_norm_` does.

    The norm is the global L2 norm over all leaves, before clipping.
    """

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(max_norm / (norm + _TORCH_CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_learning_rate_at_step(
    schedule: optax.Schedule,
) -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by `-schedule(step)`, `step` given to `update` by the caller.

    The LR is read from the global step rather than from a count kept in the optimizer state:
    a skipped (non-finite) update leaves the state unchanged, yet the next update must use the
    next LR, as torch's scheduler steps past a skipped update.
    """

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        if step is None:
            raise TypeError(
                "the flaxdiff optimizer needs the global step: call "
                "optimizer.update(grads, opt_state, params, step=completed_updates)"
            )
        rate = schedule(step)
        return jax.tree.map(lambda u: -rate.astype(u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


# A fixed key: the stochastic rounding's bits are a function of Adam's count and the leaf's
# position alone, the same on every replica and on a resumed run.
_ROUNDING_SEED = 0


def stochastic_round_to_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """`x` rounded to bfloat16 up or down, up with probability its distance to the lower value.

    Adding 16 uniform random bits below bfloat16's last mantissa bit and truncating makes the
    rounding unbiased, `E[round(x)] = x`. Non-finite values are rounded to nearest (the carry
    could turn a NaN into a zero).

    Args:
      x: float32 (or float64, first rounded to float32) array.
      bits: uint32 array shaped like `x`, values below 2**16, uniformly random.

    Returns:
      bfloat16 array shaped like `x`.
    """
    x = x.astype(jnp.float32)
    raised = jax.lax.bitcast_convert_type(x, jnp.uint32) + bits
    truncated = jax.lax.bitcast_convert_type(raised & jnp.uint32(0xFFFF0000), jnp.float32)
    # The truncation left bfloat16's bits only: the cast is exact.
    return jnp.where(jnp.isfinite(x), truncated, x).astype(jnp.bfloat16)


def scale_by_adam_bfloat16_moments(
    *, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with both moments stored in bfloat16 (half the float32 bytes).

    Each update casts the stored moments up to the gradients' dtype, runs `optax.scale_by_adam`
    on them (so the moment updates, the bias correction and the eps placement are optax's, in
    float32), takes the step from the float32 moments, and only then rounds them to bfloat16 for
    storage. The state is optax's `ScaleByAdamState`, so checkpoints and sharding rules see the
    same tree as the float32 path, with bfloat16 leaves.

    The rounding is stochastic, not to nearest. With round-to-nearest the second moment would
    be biased: an update moves `nu` by `(1 - b2) * (g**2 - nu)`, at most 0.1% of `nu` downwards
    with b2 = 0.999, and bfloat16's half-ulp is 0.2-0.4%, so `nu` could only ratchet up
    (measured: 2x the float32 value after 10k steps at a constant gradient scale, and stuck at
    the old value when the gradients shrink). Stochastic rounding keeps each stored moment equal
    to the float32 one in expectation; it adds noise instead, about 2% (one standard deviation)
    on each element's `sqrt(nu_hat)`, as much as float32 `nu`'s own sampling noise over its
    1/(1 - b2) window. Its bits come from Adam's count and the leaf's position; one uint32 per
    element serves both moments (high half for `mu`, low half for `nu`).

    Args:
      b1: AdamW beta1.
      b2: AdamW beta2.
      eps: AdamW epsilon, added to `sqrt(nu_hat)` as optax and torch do.

    Returns:
      An optax transformation with `ScaleByAdamState(count, mu, nu)`, `mu` and `nu` bfloat16.
    """
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init_fn(params):
        state = adam.init(params)
        return state._replace(
            mu=optax.tree.cast(state.mu, jnp.bfloat16), nu=optax.tree.cast(state.nu, jnp.bfloat16)
        )

    def update_fn(updates, state, params=None):
        wide = state._replace(
            mu=optax.tree.cast_like(state.mu, updates), nu=optax.tree.cast_like(state.nu, updates)
        )
        updates, new = adam.update(updates, wide, params)
        key = jax.random.fold_in(jax.random.key(_ROUNDING_SEED), new.count)
        mu_leaves, treedef = jax.tree.flatten(new.mu)
        mu, nu = [], []
        for index, (m, v) in enumerate(zip(mu_leaves, jax.tree.leaves(new.nu), strict=True)):
            bits = jax.random.bits(jax.random.fold_in(key, index), m.shape, jnp.uint32)
            mu.append(stochastic_round_to_bfloat16(m, bits >> 16))
            nu.append(stochastic_round_to_bfloat16(v, bits & jnp.uint32(0xFFFF)))
        return updates, new._replace(
            mu=jax.tree.unflatten(treedef, mu), nu=jax.tree.unflatten(treedef, nu)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def build_optimizer(
    cfg: TrainConfig,
    *,
    learning_rate: float,
    total_steps: int,
    moments_dtype: str | jnp.dtype | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Gradient clipping then AdamW with the `--lr_scheduler` schedule, as torch's AdamW steps.

    torch's AdamW first decays the weights, `p *= 1 - lr * wd`, then takes the Adam step
    `p -= lr * m_hat / (sqrt(v_hat) + eps)`. The chain here adds `wd * p` to the Adam direction
    and scales the sum by `-lr`: the same update exactly (the Adam direction does not depend on
    `p`), different only in rounding. optax's bias correction and eps placement,
    `m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)`, equal torch's
    `lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

    `update` takes the keyword `step`, the completed updates of the run, skipped ones included;
    it picks the LR. The bias correction counts the updates applied (Adam's own count).

    Args:
      cfg: the run config; reads `cfg.optim` (`max_grad_norm`, `adam_beta1/2`, `adam_epsilon`,
        `adam_weight_decay`, the schedule flags) and `cfg.flax.adam_moments_dtype`.
        `--use_8bit_adam` is a bitsandbytes option and is not read here;
        `--adam_moments_dtype=bfloat16` is the JAX way to save optimizer memory.
      learning_rate: the peak LR, after `--scale_lr`.
      total_steps: the run's total optimizer updates.
      moments_dtype: storage dtype of both Adam moments, "float32" or "bfloat16" (or the jnp
        dtype); None reads `--adam_moments_dtype`. float32 is `optax.scale_by_adam` (moments in
        the params' dtype), bfloat16 is `scale_by_adam_bfloat16_moments`.

    Returns:
      An optax transformation; `update(grads, opt_state, params, step=...)` needs `params`
      (weight decay) and `step`.

    Raises:
      ConfigError: a schedule that would fail mid-run.
      ValueError: a `moments_dtype` other than float32 or bfloat16.
    """
    o = cfg.optim
    dtype = jnp.dtype(cfg.flax.adam_moments_dtype if moments_dtype is None else moments_dtype)
    if dtype == jnp.float32:
        adam = optax.scale_by_adam(b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_epsilon)
    elif dtype == jnp.bfloat16:
        adam = scale_by_adam_bfloat16_moments(b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_epsilon)
    else:
        raise ValueError(f"Adam moments are stored in float32 or bfloat16, not {dtype}")
    schedule = learning_rate_schedule(cfg, base_lr=learning_rate, total_steps=total_steps)
    return optax.chain(
        clip_by_global_norm_torch(o.max_grad_norm),
        adam,
        optax.add_decayed_weights(o.adam_weight_decay),
        scale_by_learning_rate_at_step(schedule),
    )


def select_tree(pred: jax.typing.ArrayLike, on_true: Any, on_false: Any) -> Any:
    """`on_true` where the scalar `pred` holds, else `on_false`, leaf by leaf (jit-friendly)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class GradientUpdate(NamedTuple):
    """What `apply_gradients` returns (a pytree, so a jitted step can return it).

    Attributes:
      params: the updated parameters, or the old ones when the update was skipped.
      opt_state: the updated optimizer state, or the old one when skipped.
      grad_norm: the global gradient norm before clipping (`train/grad_norm`).
      finite: whether the update was applied (loss and gradient norm finite), a bool scalar.
    """

    params: Any
    opt_state: Any
    grad_norm: jax.Array
    finite: jax.Array


def apply_gradients(
    optimizer: optax.GradientTransformationExtraArgs,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    step: jax.typing.ArrayLike,
    loss: jax.typing.ArrayLike,
) -> GradientUpdate:
    """One optimizer update under the non-finite policy of `shared.run.nonfinite`.

    A non-finite loss or gradient norm leaves the params AND the optimizer state (moments, Adam's
    count) as they were; the caller still advances `step`, so the next update uses the next LR.
    The update is computed either way and discarded by a select: no host sync, no branch.

    Args:
      optimizer: from `build_optimizer`.
      grads: gradients of the mean loss, same tree as `params` (after any accumulation and any
        cross-device mean: every replica must decide the same way).
      opt_state: the optimizer state.
      params: the trained parameters.
      step: completed updates of the run, skipped ones included (the LR's step).
      loss: the update's loss (scalar), already averaged over devices.

    Returns:
      The new params and state, the gradient norm and whether the update was applied.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_state = optimizer.update(grads, opt_state, params, step=step)
    new_params = optax.apply_updates(params, updates)
    return GradientUpdate(
        params=select_tree(finite, new_params, params),
        opt_state=select_tree(finite, new_state, opt_state),
        grad_norm=grad_norm,
        finite=finite,
    )


def accumulate_gradients(
    value_and_grad_fn: Callable[[Any, Any, jax.Array], tuple[Any, Any]],
    params: Any,
    batch: Any,
    *,
    accumulation_steps: int,
) -> tuple[Any, Any]:
    """The mean value and gradients over `accumulation_steps` consecutive micro-batches.

    Gradients are summed in a `lax.scan`, so activations exist for one micro-batch at a time, and
    divided by the count at the end: for a mean-reduced loss this is the gradient of the whole
    batch's mean loss, as accelerate's loss / k then sum gives. Micro-batch i is rows
    `i, i + k, i + 2k, ...` (strided, not contiguous): which rows go together does not change the
    mean, and a batch sharded along its leading axis (strategy "mesh") then splits into
    micro-batches that each stay spread over all devices, with no data moved between them.

    Args:
      value_and_grad_fn: `(params, micro_batch, micro_step) -> (value, grads)`; `value` is any
        pytree (the loss, or `(loss, aux)`), averaged like the gradients; `micro_step` (int32
        scalar) lets the caller fold distinct noise into each micro-batch.
      params: the parameters to differentiate at.
      batch: pytree of arrays with a common leading batch axis B, a multiple of the count.
      accumulation_steps: `--gradient_accumulation_steps`.

    Returns:
      `(value, grads)` averaged over the micro-batches.

    Raises:
      ValueError: B is not a multiple of `accumulation_steps`.
    """
    k = int(accumulation_steps)
    if k == 1:
        return value_and_grad_fn(params, batch, jnp.zeros((), jnp.int32))
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % k:
        raise ValueError(
            f"the batch's leading sizes {sorted(sizes)} must be one multiple of "
            f"--gradient_accumulation_steps={k}"
        )
    # (B, ...) -> (B/k, k, ...) -> (k, B/k, ...): row j*k + i goes to micro-batch i.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch
    )

    def body(carry, inputs):
        micro_batch, micro_step = inputs
        value, grads = value_and_grad_fn(params, micro_batch, micro_step)
        return jax.tree.map(jnp.add, carry, (value, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(value_and_grad_fn, params, first, jnp.zeros((), jnp.int32))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k, dtype=jnp.int32)))
    return jax.tree.map(lambda x: x / k, total)


def ema_decay(step: jax.typing.ArrayLike, cfg_ema: EMAConfig) -> jax.Array:
    """diffusers' `EMAModel` decay of the `step`-th EMA update, in jnp (elementwise, jittable).

    0 for the first update (the shadow becomes a copy of the weights), then
    `1 - (1 + s / inv_gamma) ** -power` with `--ema_use_warmup`, else `(1 + s) / (10 + s)`, with
    `s = step - 1`, capped at `--ema_max_decay`; `shared.run.ema.decay_from_config` in numpy.

    Args:
      step: 1-based count of EMA updates (int, or int array of any shape).
      cfg_ema: the run's `cfg.ema`.

    Returns:
      The decay, in the run's float dtype, shaped like `step`.
    """
    s = jnp.maximum(jnp.asarray(step) - 1, 0).astype(_default_float())
    if cfg_ema.ema_use_warmup:
        decay = 1 - (1 + s / cfg_ema.ema_inv_gamma) ** -cfg_ema.ema_power
    else:
        decay = (1 + s) / (10 + s)
    # diffusers' min_decay is 0, so only the cap applies.
    return jnp.where(s > 0, jnp.minimum(decay, cfg_ema.ema_max_decay), 0.0)


def ema_update(
    ema_params: Any, params: Any, *, step: jax.typing.ArrayLike, cfg_ema: EMAConfig
) -> Any:
    """One EMA update of every shadow parameter, `shadow - (1 - decay) * (shadow - param)`.

    That form is diffusers' (`EMAModel.step`) and rounds like it.

    Args:
      ema_params: the shadow parameters.
      params: the trained parameters just updated, same tree.
      step: 1-based count of EMA updates including this one (applied updates only).
      cfg_ema: the run's `cfg.ema`.

    Returns:
      The new shadow parameters, each in its own dtype.
    """
    one_minus_decay = 1 - ema_decay(step, cfg_ema)
    return jax.tree.map(
        lambda s, p: s - one_minus_decay.astype(s.dtype) * (s - p.astype(s.dtype)),
        ema_params,
        params,
    )
