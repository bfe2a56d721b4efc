"""DreamBooth class images: generate the ones `--class_data_dir` lacks before training starts.

As `train_dreambooth.py`: with `--with_prior_preservation` and fewer than `--num_class_images`
images in the folder, the base pipeline samples `--class_prompt` in batches of
`--sample_batch_size` (its own default scheduler and step count), each process a share of the
missing images, saved as `<index>-<sha1 of the image>.jpg`. `--prior_generation_precision`
picks the dtype (default fp16 on GPU, fp32 elsewhere). Files are written through a temporary
name, so an interrupted generation leaves only whole images and the next run makes the rest.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shared.config import TrainConfig
from shared.data import count_images
from shared.prompts import PromptDataset

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def generation_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
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


def _save(image, folder: Path, index: int) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    data = buffer.getvalue()
    name = f"{index}-{hashlib.sha1(data).hexdigest()}.jpg"
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


def ensure_class_images(cfg: TrainConfig, components, accelerator) -> int:
    """Generates the missing class images; returns how many this process wrote."""
    if not cfg.diffusion.with_prior_preservation:
        return 0
    folder = Path(cfg.data.class_data_dir)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    existing = count_images(folder)
    missing = cfg.prompts.num_class_images - existing
    if missing <= 0:
        return 0
    device = accelerator.device
    dtype = generation_dtype(cfg, device)
    logger.info("generating %d class images into %s (%s)", missing, folder, dtype)
    pipeline = _pipeline(cfg, components, dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    prompts = PromptDataset(cfg.prompts.class_prompt, missing)
    mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    batch_size = cfg.prompts.sample_batch_size
    # Seeded per process, so a rerun makes the same images (the global RNG is left alone).
    generator = torch.Generator(device=device).manual_seed(cfg.seed + accelerator.process_index)
    written = 0
    bar = tqdm(
        total=len(mine),
        desc="class images",
        disable=not accelerator.is_local_main_process,
    )
    for start in range(0, len(mine), batch_size):
        chunk = [prompts[i] for i in mine[start : start + batch_size]]
        with torch.no_grad():
            images = pipeline(
                [item["prompt"] for item in chunk],
                generator=generator,
                height=cfg.data.resolution,
                width=cfg.data.resolution,
            ).images
        for item, image in zip(chunk, images, strict=True):
            _save(image, folder, item["index"] + existing)
            written += 1
        bar.update(len(chunk))
    bar.close()
    del pipeline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    have = count_images(folder)
    if have < cfg.prompts.num_class_images:
        raise RuntimeError(
            f"--class_data_dir {folder} holds {have} images after generation, fewer than "
            f"--num_class_images {cfg.prompts.num_class_images}"
        )
    return written
