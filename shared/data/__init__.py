"""Training data from a config: the source, the image transform and the loader.

    source = build_source(cfg)                      # what the examples are
    loader = build_loader(cfg, source, batch_size=plan.per_process_batch_size,
                          process_index=..., process_count=..., collate_text=tokenize)

Both backends call these; what they do with the numpy batches is their own business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shared.config import TrainConfig
from shared.data import verify as _verify
from shared.data.loader import Loader, SampleError
from shared.data.records import (
    BadImageError,
    ImageRef,
    LocalImages,
    LocalImageSource,
    Record,
)
from shared.data.sources import (
    Source,
    SubsetSource,
    count_images,
    dreambooth_source,
    hf_dataset_source,
    image_folder_source,
    list_images,
    tfds_source,
)
from shared.data.transforms import ImageTransform, normalize
from shared.errors import DataError

TFDS_PREFIX = "tfds:"


def build_source(cfg: TrainConfig, *, verify: bool = True) -> Source:
    """The training examples of `cfg`: DreamBooth folders, a TFDS/HF dataset or an image folder.

    Local image folders (image folder, DreamBooth instance and class folders) are checked here,
    before step 1: every image is decoded once (remembered in
    ``<output_dir>/.twindiff/image-check.json``), unreadable ones are left out, and more than
    ``--max_bad_image_fraction`` of a folder unreadable raises `DataError` (see
    `shared.data.verify`). HF and TFDS datasets are not checked ahead.

    Args:
      cfg: the run's config.
      verify: check local images; False for callers that only look at the source (a report, a
        dry run) and will not train on it.

    Raises:
      DataError: the data cannot be read as configured (the message names the folder or file,
        and the flag to change).
      ConfigError: a flag value that cannot work, e.g. ``--max_train_samples 0``.
    """
    source = _unchecked_source(cfg)
    if verify and isinstance(source, LocalImageSource):  # folders; not HF or TFDS datasets
        source = _verify.verify_source(
            source,
            max_bad_fraction=cfg.data.max_bad_image_fraction,
            cache_file=_verify.cache_path(cfg.checkpoint.output_dir),
        )
    return source


def _unchecked_source(cfg: TrainConfig) -> Source:
    data = cfg.data
    if cfg.task == "dreambooth":
        prior = cfg.diffusion.with_prior_preservation
        return dreambooth_source(
            data.instance_data_dir,
            instance_prompt=cfg.prompts.instance_prompt,
            class_data_dir=data.class_data_dir if prior else None,
            class_prompt=cfg.prompts.class_prompt if prior else None,
            with_prior_preservation=prior,
            num_class_images=cfg.prompts.num_class_images if prior else None,
        )
    caption_column = data.caption_column if cfg.task == "text2image" else None
    if data.dataset_name and data.dataset_name.startswith(TFDS_PREFIX):
        source = tfds_source(
            data.dataset_name.removeprefix(TFDS_PREFIX),
            data_dir=data.tfds_data_dir,
            split=data.dataset_split,
            image_key=data.image_column,
            caption_key=caption_column,
        )
    elif data.dataset_name:
        # max_train_samples is applied inside, exactly as diffusers does on the HF dataset.
        return hf_dataset_source(
            data.dataset_name,
            dataset_config_name=data.dataset_config_name,
            train_data_dir=data.train_data_dir,
            cache_dir=data.cache_dir,
            split=data.dataset_split,
            image_column=data.image_column,
            caption_column=caption_column,
            max_train_samples=data.max_train_samples,
            seed=cfg.seed,
        )
    else:
        source = image_folder_source(data.train_data_dir, caption_column=caption_column)
    if data.max_train_samples is not None and data.max_train_samples < len(source):
        source = SubsetSource(source, data.max_train_samples, seed=cfg.seed)
    return source


def build_transform(cfg: TrainConfig, *, channels: int = 3) -> ImageTransform:
    """`cfg`'s image pipeline; `channels` 1 gives grey images for a one-channel pixel UNet."""
    data = cfg.data
    return ImageTransform(
        data.resolution,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        interpolation=data.image_interpolation_mode,
        preserve_input_precision=data.preserve_input_precision,
        channels=channels,
    )


def build_loader(
    cfg: TrainConfig,
    source: Source,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    collate_text: Callable[[list[str]], Mapping[str, np.ndarray]] | None = None,
    state: Mapping[str, int] | None = None,
    train: bool = True,
    channels: int = 3,
    **loader_kwargs: Any,
) -> Loader:
    """The loader of `source` with `cfg`'s transform, seed, workers and bad-image limit.

    Args:
      batch_size: examples per batch on this process (`RunPlan.per_process_batch_size`).
      process_index, process_count: this process among those that share the data.
      collate_text: e.g. a tokenizer turning the batch's captions into ``input_ids``.
      state: a loader position saved in a checkpoint, to resume from.
      train: shuffle and random captions; False gives dataset order and first captions.
      channels: image channels, 3 (RGB) or 1 (grey; see `pixel_channels`).
    """
    return Loader(
        source,
        batch_size=batch_size,
        transform=build_transform(cfg, channels=channels),
        seed=cfg.seed,
        process_index=process_index,
        process_count=process_count,
        num_workers=cfg.data.dataloader_num_workers,
        train=train,
        max_bad_fraction=cfg.data.max_bad_image_fraction,
        collate_text=collate_text,
        state=state,
        **loader_kwargs,
    )


__all__ = [
    "BadImageError",
    "DataError",
    "ImageRef",
    "ImageTransform",
    "Loader",
    "LocalImages",
    "Record",
    "SampleError",
    "Source",
    "build_loader",
    "build_source",
    "build_transform",
    "count_images",
    "list_images",
    "normalize",
]
