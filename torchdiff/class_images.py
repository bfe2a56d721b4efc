"""DreamBooth class images: the torch sampler behind `shared.data.class_images`.

Which images `--class_data_dir` lacks, which process makes which, file names and the final check
are decided in `shared.data.class_images`; this module only samples. The base pipeline samples
`--class_prompt` with its own default scheduler and step count, as `train_dreambooth.py` does, in
the dtype `--prior_generation_precision` picks (default fp16 on GPU, fp32 elsewhere), and is built
only when images are missing.
"""

from __future__ import annotations

import logging

import torch

from shared.config import TrainConfig
from shared.data.class_images import generate_class_images
from torchdiff.checkpoint import process_group

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def generation_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype class images are sampled in: `--prior_generation_precision`, else fp16 on GPU."""
    wanted = cfg.prompts.prior_generation_precision
    if wanted in PRECISIONS:
        return PRECISIONS[wanted]
    return torch.float16 if device.type == "cuda" else torch.float32


def _pipeline(cfg: TrainConfig, components, dtype: torch.dtype):
    """The base pipeline from disk, or, for a randomly initialized model, from memory."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if components.base is not None:
        return DiffusionPipeline.from_pretrained(
            components.base,
            torch_dtype=dtype,
            safety_checker=None,
            revision=cfg.model.revision,
            variant=cfg.model.variant,
            cache_dir=cfg.data.cache_dir,
        )
    # No base folder (a model built from configs/models/*.yaml): the in-memory components, in
    # fp32 as they are (casting them would change the weights about to be trained).
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(components.tokenizer_dir),
        unet=components.unet,
        scheduler=components.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class _PipelineSampler:
    """`sample(prompts) -> PIL images`, building the pipeline on its first call."""

    def __init__(self, cfg: TrainConfig, components, accelerator):
        self._cfg = cfg
        self._components = components
        self._accelerator = accelerator
        self._pipeline = None
        self._generator: torch.Generator | None = None

    def __call__(self, prompts: list[str]) -> list:
        if self._pipeline is None:
            device = self._accelerator.device
            dtype = generation_dtype(self._cfg, device)
            logger.info("class-image pipeline in %s on %s", dtype, device)
            pipeline = _pipeline(self._cfg, self._components, dtype).to(device)
            pipeline.set_progress_bar_config(disable=True)
            self._pipeline = pipeline
            # Seeded per process, so a rerun makes the same images (the global RNG is left alone).
            seed = self._cfg.seed + self._accelerator.process_index
            self._generator = torch.Generator(device=device).manual_seed(seed)
        resolution = self._cfg.data.resolution
        with torch.no_grad():
            return self._pipeline(
                prompts, generator=self._generator, height=resolution, width=resolution
            ).images

    def close(self) -> None:
        """Drops the pipeline (its fp16 copy of the model is not needed for training)."""
        built = self._pipeline is not None
        self._pipeline = self._generator = None
        if built and self._accelerator.device.type == "cuda":
            torch.cuda.empty_cache()


def ensure_class_images(cfg: TrainConfig, components, accelerator) -> int:
    """Generates the class images `--class_data_dir` lacks; returns how many this process wrote.

    The trainer calls this as the dreambooth task's `prepare` hook on every process.
    """
    sampler = _PipelineSampler(cfg, components, accelerator)
    try:
        return generate_class_images(cfg, sampler, group=process_group(accelerator))
    finally:
        sampler.close()
