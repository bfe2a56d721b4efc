"""Sampling from a trained pipeline folder with diffusers (what `twindiff.sample` runs for torch).

images = sample_unconditional("twindiff-digits", num_images=64, num_inference_steps=1000)
"""

from __future__ import annotations

import os

import numpy as np
import torch


def sample_unconditional(
    folder: str | os.PathLike,
    *,
    num_images: int,
    num_inference_steps: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    scheduler: str | None = None,
) -> np.ndarray:
    """Samples an unconditional pipeline folder with diffusers' `DDPMPipeline`.

    Args:
      folder: the pipeline folder (``unet/``, ``scheduler/``).
      num_images: how many images.
      num_inference_steps: sampler steps (1000: DDPM's full chain).
      seed: a ``torch.Generator`` seeded with it draws the initial and step noise.
      batch_size: images denoised at once.
      scheduler: a diffusers scheduler class to sample with (e.g. "DDIMScheduler"); None keeps
        the folder's.

    Returns:
      float32 (N, H, W, C) images in [0, 1].
    """
    import diffusers

    pipeline = diffusers.DDPMPipeline.from_pretrained(str(folder))
    if scheduler is not None:
        pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for start in range(0, num_images, batch_size):
            rows = min(batch_size, num_images - start)
            images = pipeline(
                batch_size=rows,
                generator=generator,
                num_inference_steps=num_inference_steps,
                output_type="np",
            ).images
            out.append(np.asarray(images, dtype=np.float32).reshape(rows, *images.shape[1:]))
    return np.concatenate(out)
