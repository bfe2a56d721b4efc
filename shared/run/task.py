"""What each task is, in one place: what it conditions on, which data it reads, which loss terms
and events it has. Trainers and validation read a `TaskSpec` instead of branching on `cfg.task`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from shared import model_folders, schedules
from shared.config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task as a trainer needs it, resolved against one config.

    Attributes:
      name: "unconditional", "text2image" or "dreambooth".
      latent: the UNet denoises VAE latents (Stable Diffusion); else pixels (DDPM).
      text_conditioned: captions or prompts go through the text encoder into cross-attention.
      data: "dataset" (an image folder or dataset, captions from it) or "dreambooth" (instance
        and class folders with fixed prompts).
      prior_preservation: batches hold instance then class examples; the loss adds the class MSE.
      makes_class_images: missing class images are sampled before training.
      train_text_encoder: the text encoder is trained with the UNet.
      dream: DREAM training (text2image's --dream_training) adjusts input and target.
      class_labels: "timesteps" when the UNet takes the timesteps as class labels, else None.
      validation: "ddpm" (unconditional samples) or "text" (prompts through the pipeline).
      epoch_images_flag: the flag whose epoch interval validates when no step interval is set.
      export_epochs: export the pipeline every N epochs during training (unconditional), or None.
      save_text_encoder: the exported pipeline includes the text encoder.
    """

    name: str
    latent: bool
    text_conditioned: bool
    data: str
    prior_preservation: bool
    makes_class_images: bool
    train_text_encoder: bool
    dream: bool
    class_labels: str | None
    validation: str
    epoch_images_flag: str
    export_epochs: int | None
    save_text_encoder: bool


def image_channels(spec: TaskSpec, unet_in_channels: int) -> int:
    """The channels the data pipeline gives a task: RGB for the VAE; a pixel UNet's own
    ``in_channels`` (1 for grey images, 3 for RGB).

    Raises:
      ConfigError: a pixel-space UNet with another channel count (no image has it).
    """
    if spec.latent:
        return 3
    if unet_in_channels not in (1, 3):
        raise ConfigError(
            f"the UNet takes {unet_in_channels} input channels; a pixel-space model needs 1 "
            "(grey images) or 3 (RGB): set in_channels/out_channels in --unet_config"
        )
    return unet_in_channels


def task_spec(cfg: TrainConfig) -> TaskSpec:
    """The `TaskSpec` of `cfg`'s task with `cfg`'s options."""
    dreambooth = cfg.task == "dreambooth"
    unconditional = cfg.task == "unconditional"
    prior = dreambooth and cfg.diffusion.with_prior_preservation
    return TaskSpec(
        name=cfg.task,
        latent=not unconditional,
        text_conditioned=not unconditional,
        data="dreambooth" if dreambooth else "dataset",
        prior_preservation=prior,
        makes_class_images=prior,
        train_text_encoder=dreambooth and cfg.model.train_text_encoder,
        dream=cfg.task == "text2image" and cfg.diffusion.dream_training,
        class_labels=cfg.model.class_labels_conditioning if dreambooth else None,
        validation="ddpm" if unconditional else "text",
        epoch_images_flag="save_images_epochs" if unconditional else "validation_epochs",
        export_epochs=cfg.checkpoint.save_model_epochs if unconditional else None,
        save_text_encoder=not (dreambooth and cfg.checkpoint.skip_save_text_encoder),
    )


def objective_options(cfg: TrainConfig, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The loss terms of a run, as both backends' `Objective(**options)` take them.

    Raises:
      ConfigError: `--dream_training` with a prediction type other than epsilon.

    Returns:
      ``alphas_cumprod`` (float64 (T,), from the scheduler config), ``prediction_type``
      (`--prediction_type`, else the scheduler's, else "epsilon"), ``snr_gamma``, ``noise_offset``
      (`--noise_offset`, or 0.1 for `--offset_noise`), ``input_perturbation`` and
      ``prior_loss_weight`` (None without prior preservation).
    """
    d = cfg.diffusion
    prediction_type = model_folders.prediction_type(cfg, scheduler_config)
    if task_spec(cfg).dream and prediction_type != "epsilon":
        raise ConfigError(
            f"--dream_training works with epsilon prediction only (as in diffusers); this model "
            f"predicts {prediction_type}: pass --prediction_type epsilon or drop --dream_training"
        )
    return {
        "alphas_cumprod": schedules.NoiseSchedule.from_scheduler_config(
            scheduler_config
        ).alphas_cumprod,
        "prediction_type": prediction_type,
        "snr_gamma": d.snr_gamma,
        "noise_offset": cfg.noise_offset_scale,
        "input_perturbation": d.input_perturbation,
        "prior_loss_weight": d.prior_loss_weight if task_spec(cfg).prior_preservation else None,
    }
