"""Sampling from a trained pipeline folder on JAX (what `twindiff.sample` runs for flax).

    images = sample_unconditional("twindiff-digits", num_images=64, num_inference_steps=1000)

The folder is a diffusers pipeline folder (``unet/``, ``scheduler/``), written by either backend
or by diffusers itself; the weights are converted as `flaxdiff.models.convert.load_model` loads
them, so no torch is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from flaxdiff import sampling
from flaxdiff.models import convert


def sample_unconditional(
    folder: str | os.PathLike,
    *,
    num_images: int,
    num_inference_steps: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    scheduler: str | None = None,
) -> np.ndarray:
    """Samples an unconditional pipeline (UNet2DModel) folder.

    Args:
      folder: the pipeline folder (``unet/``, ``scheduler/scheduler_config.json``).
      num_images: how many images.
      num_inference_steps: sampler steps (1000: DDPM's full chain).
      seed: the initial noise and the step noise are drawn from ``jax.random.key(seed)``.
      batch_size: images denoised at once.
      scheduler: a diffusers scheduler class to sample with (e.g. "DDIMScheduler"); None keeps
        the folder's.

    Returns:
      float32 (N, H, W, C) images in [0, 1].
    """
    folder = Path(folder)
    model = convert.load_model(folder / "unet")
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sampler = sampling.sampler_from_config(scheduler_config, scheduler)
    size, channels = model.config.sample_size, model.config.in_channels
    size = size[0] if isinstance(size, list | tuple) else size
    key = jax.random.key(seed)
    out = []
    for start in range(0, num_images, batch_size):
        rows = min(batch_size, num_images - start)
        noise_key, step_key = jax.random.split(jax.random.fold_in(key, start))
        noise = jax.random.normal(noise_key, (rows, size, size, channels))
        out.append(denoise(model, noise, step_key, sampler, num_inference_steps))
    return np.concatenate(out)


def denoise(
    model: nnx.Module,
    noise: jax.Array,
    key: jax.Array,
    sampler: sampling.SamplerConfig,
    num_inference_steps: int,
    *,
    step_noise: jax.Array | None = None,
) -> np.ndarray:
    """An unconditional UNet's samples from `noise` (N, H, W, C): images in [0, 1], in the
    model's float dtype.

    `key` draws a stochastic sampler's step noise, unless `step_noise` (S, N, H, W, C) gives
    it; a learned-variance UNet's variance half is dropped.
    """
    graphdef, state = nnx.split(model)
    channels = noise.shape[-1]

    @jax.jit
    def draw(state, noise, key, step_noise):
        net = nnx.merge(graphdef, state)
        return sampling.sample(
            lambda x, t: net(x, t)[..., :channels],
            noise,
            scheduler=sampler,
            num_inference_steps=num_inference_steps,
            key=key if step_noise is None else None,
            step_noise=step_noise if sampler.stochastic else None,
        )

    images = np.asarray(draw(state, noise, key, step_noise))
    return np.clip(images / 2 + 0.5, 0.0, 1.0)
