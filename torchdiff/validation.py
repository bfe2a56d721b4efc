"""Validation images during training: the torch sampler of the shared validation plan.

`shared.run.validation` decides what a round samples (prompts, images per prompt, steps, seed)
and where the grid goes; this module samples it with diffusers pipelines: `DDPMPipeline` for
unconditional runs, `StableDiffusionPipeline` with `--validation_scheduler` for latent ones.
EMA weights, when kept, are swapped in for the sampling and swapped back after. Images go to the
grid PNG and to the trackers.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import TrainConfig
from shared.grids import save_grid
from shared.run.validation import ValidationPlan, grid_path, plan_validation, wants_validation

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def ema_weights(ema, model: torch.nn.Module | None):
    """Swaps the EMA weights into `model` for the duration (nothing without EMA)."""
    if ema is None or model is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def _validation_scheduler(cfg: TrainConfig, noise_scheduler):
    import diffusers

    cls = getattr(diffusers, cfg.validation.validation_scheduler)
    config = dict(noise_scheduler.config)
    # Learned-variance models sample with the fixed variance (as the reference scripts do).
    if config.get("variance_type") in ("learned", "learned_range"):
        config["variance_type"] = "fixed_small"
    return cls.from_config(config)


def sample_images(
    cfg: TrainConfig,
    components,
    *,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    conditioner=None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, int]:
    """Samples the validation images; returns (images (N, H, W, 3) float in [0, 1], rows)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    plan = plan_validation(cfg)
    if not plan.prompts:
        pipeline = DDPMPipeline(
            unet=unet, scheduler=DDPMScheduler.from_config(components.noise_scheduler.config)
        )
        pipeline.set_progress_bar_config(disable=True)
        out = pipeline(
            generator=torch.Generator(device=device).manual_seed(plan.seed),
            batch_size=plan.images_per_prompt,
            num_inference_steps=plan.num_inference_steps,
            output_type="np",
        )
        return np.asarray(out.images), plan.rows
    images = _sample_text_to_image(
        cfg, plan, components, unet, text_encoder, conditioner, device=device, dtype=dtype
    )
    return images, plan.rows


def _sample_text_to_image(
    cfg, plan: ValidationPlan, components, unet, text_encoder, conditioner, *, device, dtype
):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pre_computed = conditioner is not None and conditioner.pre_computed
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=None if pre_computed else text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(components.tokenizer_dir),
        unet=unet,
        scheduler=_validation_scheduler(cfg, components.noise_scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(plan.seed)
    # Mixed precision: the trained models are fp32, the frozen ones in the half dtype.
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    images = []
    size = cfg.data.resolution
    for prompt in plan.prompts:
        kwargs: dict[str, Any] = {"prompt": prompt}
        if pre_computed:
            kwargs = {
                "prompt_embeds": conditioner.encode([prompt]).to(device, dtype),
                "negative_prompt_embeds": conditioner.encode([""]).to(device, dtype),
            }
        for _ in range(plan.images_per_prompt):
            with autocast, torch.no_grad():
                out = pipeline(
                    **kwargs,
                    num_inference_steps=plan.num_inference_steps,
                    generator=generator,
                    height=size,
                    width=size,
                    output_type="np",
                )
            images.append(np.asarray(out.images[0]))
    return np.stack(images)


def log_images(
    accelerator, cfg: TrainConfig, images: np.ndarray, *, rows: int, step: int, tag: str
) -> Path:
    """Saves the grid PNG and sends the images to TensorBoard / wandb."""
    path = save_grid(images, grid_path(cfg, tag=tag, step=step), rows=rows)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=step)
    logger.info("validation images of step %d: %s", step, path)
    return path


def run(
    accelerator,
    cfg: TrainConfig,
    components,
    *,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    conditioner=None,
    ema=None,
    step: int,
    tag: str = "validation",
    dtype: torch.dtype = torch.float32,
) -> Path | None:
    """Samples and logs one round of validation images on the main process."""
    if not accelerator.is_main_process or not wants_validation(cfg):
        return None
    unet = accelerator.unwrap_model(unet)
    if text_encoder is not None:
        text_encoder = accelerator.unwrap_model(text_encoder)
    was_training = unet.training
    unet.eval()
    try:
        with ema_weights(ema, unet):
            images, rows = sample_images(
                cfg,
                components,
                unet=unet,
                text_encoder=text_encoder,
                conditioner=conditioner,
                device=accelerator.device,
                dtype=dtype,
            )
    finally:
        unet.train(was_training)
    return log_images(accelerator, cfg, images, rows=rows, step=step, tag=tag)
