"""Samplers as free functions with one signature: `sample(denoise_fn, noise, *, scheduler, ...)`.

A sampler is a diffusers scheduler read from its `scheduler_config.json` (`sampler_from_config`)
plus a number of steps. Everything that depends only on those two, the timesteps and each step's
coefficients, is computed once on the host in float64 (`flaxdiff.schedulers`); the loop itself is
one `jax.lax.scan` over those tables, so `sample` traces the model once and jits as a whole:

    x0 = jax.jit(functools.partial(sample, denoise_fn, scheduler=cfg, num_inference_steps=25))(
        noise, key=key)

Arrays are NHWC: noise and samples (B, H, W, C). `denoise_fn(x_t, t) -> model_output` receives t
as a (B,) array (int32, float32 for Euler), as diffusers' pipelines feed their UNets, and returns
the epsilon / v / sample prediction of the scheduler's `prediction_type`.

Randomness (DDPM only): step i adds `noise_std[i] * normal(keys[i], x.shape)` with
`keys = jax.random.split(key, S)`, drawn inside the loop so memory does not grow with S; a step
without noise (t = 0) still consumes its key. `step_noise` replaces those draws, e.g. to replay
the noise of another implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flaxdiff.schedulers import (
    SCHEDULERS,
    DDIMConfig,
    DDPMConfig,
    DPMSolverMultistepConfig,
    EulerDiscreteConfig,
    SamplerConfig,
    SamplingPlan,
)

__all__ = [
    "SCHEDULERS",
    "DDIMConfig",
    "DDPMConfig",
    "DPMSolverMultistepConfig",
    "EulerDiscreteConfig",
    "SamplerConfig",
    "SamplingPlan",
    "guided",
    "sample",
    "sample_trajectory",
    "sampler_from_config",
]

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t (B,H,W,C), t (B,)) -> output


def sampler_from_config(
    scheduler_config: Mapping[str, Any], name: str | None = None
) -> SamplerConfig:
    """The sampler of a diffusers scheduler config, as `getattr(diffusers, name).from_config`.

    Args:
        scheduler_config: A `scheduler_config.json` dict (any DDPM-family scheduler's).
        name: A diffusers scheduler class name (`--validation_scheduler`, e.g.
            "DPMSolverMultistepScheduler"); None takes the config's own `_class_name`.

    Raises:
        ValueError: The class is not one flaxdiff samples with (the message lists those), or the
            config asks for an option it does not implement.
    """
    class_name = name or scheduler_config.get("_class_name")
    if class_name not in SCHEDULERS:
        raise ValueError(
            f"No flaxdiff sampler for scheduler {class_name!r}; supported: "
            f"{', '.join(sorted(SCHEDULERS))} (pass one as the name to read this config with it)"
        )
    return SCHEDULERS[class_name].from_scheduler_config(scheduler_config)


def guided(
    denoise_fn_with_context: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    cond: jax.Array,
    uncond: jax.Array,
    guidance_scale: float,
) -> DenoiseFn:
    """Classifier-free guidance, as diffusers' `StableDiffusionPipeline` applies it.

    The unconditional and conditional halves run as one batch of 2B (uncond first), and the
    output is `out_uncond + guidance_scale * (out_cond - out_uncond)`. With guidance_scale <= 1
    the pipeline skips guidance and runs the conditional batch alone; so does this.

    Args:
        denoise_fn_with_context: (x_t (B, H, W, C), t (B,), context (B, L, D)) -> output, e.g. a
            UNet2DConditionModel with its encoder_hidden_states.
        cond: Prompt embeddings, (B, L, D).
        uncond: Negative / empty-prompt embeddings, (B, L, D).
        guidance_scale: Python float, so the branch is decided at trace time.

    Returns:
        A `denoise_fn(x_t, t)` for `sample`.
    """
    if guidance_scale <= 1.0:
        return lambda x, t: denoise_fn_with_context(x, t, cond)
    context = jnp.concatenate([uncond, cond], axis=0)  # (2B, L, D)

    def denoise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(t, x.shape[:1])  # (B,), also from a scalar
        both = denoise_fn_with_context(
            jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), context
        )  # (2B, H, W, C)
        out_uncond, out_cond = jnp.split(both, 2, axis=0)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return denoise_fn


def sample(
    denoise_fn: DenoiseFn,
    noise: jax.Array,
    *,
    scheduler: SamplerConfig,
    num_inference_steps: int,
    key: jax.Array | None = None,
    step_noise: jax.Array | None = None,
) -> jax.Array:
    """Denoises N(0, 1) `noise` into a sample with `scheduler`'s algorithm.

    Args:
        denoise_fn: (x_t (B, H, W, C), t (B,)) -> model output, (B, H, W, C) or, for a
            learned-variance config, (B, H, W, 2C) whose variance half is dropped.
        noise: (B, H, W, C) standard normal; scaled by the scheduler's `init_noise_sigma` here,
            as diffusers' pipelines scale their initial latents.
        scheduler: From `sampler_from_config`; static under jit (hashable).
        num_inference_steps: Steps requested, as diffusers' `set_timesteps(num_inference_steps)`.
        key: PRNG key of a stochastic scheduler's step noise (see the module docstring); ignored
            by deterministic ones, so callers may always pass one.
        step_noise: (S, B, H, W, C) the stochastic scheduler's per-step N(0, 1) draws, instead
            of `key`.

    Returns:
        x0, (B, H, W, C), in noise's dtype promoted to at least float32 (the loop runs there, as
        diffusers' solvers upcast half-precision samples).
    """
    return _run(denoise_fn, noise, scheduler, num_inference_steps, key, step_noise, False)


def sample_trajectory(
    denoise_fn: DenoiseFn,
    noise: jax.Array,
    *,
    scheduler: SamplerConfig,
    num_inference_steps: int,
    key: jax.Array | None = None,
    step_noise: jax.Array | None = None,
) -> jax.Array:
    """`sample`, keeping x after every step: (S, B, H, W, C), the last entry being x0."""
    return _run(denoise_fn, noise, scheduler, num_inference_steps, key, step_noise, True)


def _step_noise_source(
    scheduler: SamplerConfig, plan: SamplingPlan, key, step_noise, shape, dtype
) -> jax.Array | None:
    """The scan's per-step noise input: given draws (S, B, H, W, C), keys (S,), or None."""
    if not scheduler.stochastic:
        if step_noise is not None:
            raise ValueError(f"{scheduler.class_name} is deterministic; it takes no step_noise")
        return None
    if (key is None) == (step_noise is None):
        raise ValueError(f"{scheduler.class_name} needs exactly one of key and step_noise")
    if step_noise is None:
        return jax.random.split(key, plan.num_steps)
    expected = (plan.num_steps, *shape)
    if tuple(step_noise.shape) != expected:
        raise ValueError(f"step_noise has shape {tuple(step_noise.shape)}, expected {expected}")
    return jnp.asarray(step_noise, dtype)


def _run(
    denoise_fn: DenoiseFn,
    noise: jax.Array,
    scheduler: SamplerConfig,
    num_inference_steps: int,
    key: jax.Array | None,
    step_noise: jax.Array | None,
    keep_trajectory: bool,
) -> jax.Array:
    plan = scheduler.plan(num_inference_steps)
    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    x = jnp.asarray(noise, dtype) * jnp.asarray(plan.init_noise_sigma, dtype)  # (B, H, W, C)
    batch, channels = x.shape[0], x.shape[-1]
    # The float64 tables enter the scan as arrays in the loop's dtype: row i is step i.
    rows = {name: jnp.asarray(table, dtype) for name, table in plan.coefficients.items()}
    input_scale = None if plan.input_scale is None else jnp.asarray(plan.input_scale, dtype)
    noise_source = _step_noise_source(scheduler, plan, key, step_noise, x.shape, dtype)
    draws_given = step_noise is not None
    xs = (jnp.asarray(plan.timesteps), rows, input_scale, noise_source)

    def body(state, xs):
        t, row, scale, source = xs
        x_t = state["x"]
        model_input = x_t if scale is None else x_t * scale
        model_output = denoise_fn(model_input, jnp.full((batch,), t))
        if scheduler.learned_variance and model_output.shape[-1] == 2 * channels:
            model_output = model_output[..., :channels]  # drop the predicted variance
        model_output = model_output.astype(dtype)
        if source is None or draws_given:
            step_draw = source  # None, or the given (B, H, W, C) draw
        else:
            step_draw = jax.random.normal(source, x_t.shape, dtype)
        state = scheduler.step(state, row, model_output, step_draw)
        return state, (state["x"] if keep_trajectory else None)

    state, trajectory = jax.lax.scan(body, scheduler.init_state(x), xs)
    return trajectory if keep_trajectory else state["x"]
