"""DreamBooth class images: how many `--class_data_dir` lacks, who makes which, and saving them.

With `--with_prior_preservation` and fewer than `--num_class_images` images in the folder, the
missing ones are sampled from `--class_prompt` before training reads the folder, as diffusers'
`train_dreambooth.py` does. Everything but the sampling is decided here, once for both backends:

    written = generate_class_images(cfg, sample, group=group)

where ``sample(prompts)`` returns one image per prompt (PIL or ``(H, W, 3)`` uint8) and owns its
device, dtype and seeding. Process ``r`` of ``n`` makes the missing images ``r, r + n, ...`` in
batches of `--sample_batch_size`; each is saved as ``<index>-<sha1 of its JPEG bytes>.jpg``, the
index continuing after the images already there. A file appears only once it is whole, so an
interrupted generation keeps what it finished and the next run makes only the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from shared.config import TrainConfig
from shared.data.folder import count_images
from shared.diffusers_format import atomic_write
from shared.errors import DataError
from shared.prompts import PromptDataset
from shared.run.process import ProcessGroup

logger = logging.getLogger(__name__)

ClassImage = Image.Image | np.ndarray
Sampler = Callable[[list[str]], Sequence[ClassImage]]

_GENERATED_NAME = re.compile(r"^(\d+)-[0-9a-f]{40}\.jpg$")


@dataclasses.dataclass(frozen=True)
class ClassImagePlan:
    """The class images one process makes.

    Attributes:
      folder: `--class_data_dir`.
      prompt: `--class_prompt`.
      num_class_images: how many images the folder must hold (`--num_class_images`).
      existing: images in the folder when the plan was made.
      missing: images all processes together make (``num_class_images - existing``).
      first_index: the file index of missing image 0 (see `first_free_index`).
      indices: the file indices this process writes, ``first_index + i`` for its share of
        ``i in range(missing)``.
      batches: `indices` in calls to the sampler, each at most `--sample_batch_size` pairs of
        ``(file_index, prompt)``.
    """

    folder: Path
    prompt: str
    num_class_images: int
    existing: int
    missing: int
    first_index: int
    indices: tuple[int, ...]
    batches: tuple[tuple[tuple[int, str], ...], ...]


def first_free_index(folder: str | os.PathLike, existing: int) -> int:
    """The file index new class images start at: `existing`, or past every generated name.

    An interrupted run over several processes leaves gaps (process 0 finished ``0, 2, 4``,
    process 1 only ``1``), so a rerun numbering from the count alone would reuse index 4, and a
    seeded sampler repeating an image would then overwrite it under the same name.

    Args:
      folder: `--class_data_dir` (may not exist yet).
      existing: the number of images in it.

    Returns:
      The larger of `existing` and one past the highest ``<index>-<sha1>.jpg`` in `folder`.
    """
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return existing
    used = [int(m.group(1)) for m in map(_GENERATED_NAME.match, names) if m]
    return max([existing, *(index + 1 for index in used)])


def plan_class_images(
    cfg: TrainConfig, *, process_index: int, process_count: int
) -> ClassImagePlan | None:
    """The share of the missing class images that process `process_index` makes.

    Args:
      cfg: the run's config (dreambooth task).
      process_index: this process's rank, in ``[0, process_count)``.
      process_count: number of processes sharing the work.

    Returns:
      None without `--with_prior_preservation` or when the folder already holds
      `--num_class_images` images; otherwise this process's plan (its `batches` may be empty when
      fewer images are missing than there are processes).
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, {process_count}) with process_count >= 1, "
            f"got {process_index} of {process_count}"
        )
    if not cfg.diffusion.with_prior_preservation:
        return None
    folder = Path(cfg.data.class_data_dir)
    existing = count_images(folder)
    missing = cfg.prompts.num_class_images - existing
    if missing <= 0:
        return None
    first = first_free_index(folder, existing)
    prompts = PromptDataset(cfg.prompts.class_prompt, missing)
    # Strided rather than contiguous shares: a short last round costs every process at most one
    # image, and the file names stay dense whichever process stops early.
    mine = [prompts[i] for i in range(process_index, missing, process_count)]
    pairs = [(first + item["index"], item["prompt"]) for item in mine]
    size = cfg.prompts.sample_batch_size
    batches = tuple(tuple(pairs[start : start + size]) for start in range(0, len(pairs), size))
    return ClassImagePlan(
        folder=folder,
        prompt=cfg.prompts.class_prompt,
        num_class_images=cfg.prompts.num_class_images,
        existing=existing,
        missing=missing,
        first_index=first,
        indices=tuple(index for index, _ in pairs),
        batches=batches,
    )


def _as_pil(image: ClassImage) -> Image.Image:
    if isinstance(image, Image.Image):
        # JPEG holds neither alpha nor palettes.
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            "a class image must be a PIL image or an (H, W, 3) uint8 array, got an array of "
            f"shape {array.shape} and dtype {array.dtype}"
        )
    return Image.fromarray(array, mode="RGB")


def save_class_image(folder: str | os.PathLike, file_index: int, image: ClassImage) -> Path:
    """Saves one class image as ``<file_index>-<sha1 of its JPEG bytes>.jpg`` in `folder`.

    The bytes go through `atomic_write`: its temp file (``.NAME.XXXXXXXX.tmp``) is hidden and
    ends in ``.tmp``, so `count_images` never counts a half-written image.

    Args:
      folder: an existing folder (`--class_data_dir`).
      file_index: the number the file name starts with.
      image: a PIL image or an ``(H, W, 3)`` uint8 array.

    Returns:
      The path of the saved file.
    """
    buffer = io.BytesIO()
    _as_pil(image).save(buffer, format="JPEG")
    data = buffer.getvalue()
    name = f"{file_index}-{hashlib.sha1(data).hexdigest()}.jpg"
    return atomic_write(Path(folder) / name, lambda tmp: tmp.write_bytes(data))


def _make(plan: ClassImagePlan, sample: Sampler, *, show_progress: bool) -> int:
    written = 0
    with tqdm(total=len(plan.indices), desc="class images", disable=not show_progress) as bar:
        for batch in plan.batches:
            prompts = [prompt for _, prompt in batch]
            images = list(sample(prompts))
            if len(images) != len(prompts):
                raise ValueError(
                    f"the class-image sampler returned {len(images)} images for "
                    f"{len(prompts)} prompts"
                )
            for (file_index, _), image in zip(batch, images, strict=True):
                save_class_image(plan.folder, file_index, image)
                written += 1
            bar.update(len(batch))
    return written


def generate_class_images(
    cfg: TrainConfig,
    sample: Sampler,
    *,
    group: ProcessGroup,
    show_progress: bool = True,
) -> int:
    """Fills `--class_data_dir` up to `--num_class_images`; every process of `group` calls this.

    Args:
      cfg: the run's config.
      sample: returns one image per prompt; called only when images are missing, so a backend
        can build its pipeline on the first call.
      group: the run's processes; the main one creates the folder and shows the progress bar.
      show_progress: show a tqdm bar on the main process.

    Returns:
      How many images this process wrote (0 when nothing was missing).

    Raises:
      DataError: another process failed, or the folder is still short afterwards.
      Exception: whatever `sample` or saving raised on this process, re-raised once every
        process has finished its share (so none waits at a barrier for it).
    """
    if not cfg.diffusion.with_prior_preservation:
        return 0
    folder = Path(cfg.data.class_data_dir)
    if group.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    group.barrier()
    plan = plan_class_images(cfg, process_index=group.index, process_count=group.count)
    # Every process counted the same folder with nobody writing yet, so all agree on None.
    if plan is None:
        return 0
    # No process may write before all have counted, or the shares would overlap.
    group.barrier()
    if group.is_main:
        logger.info(
            "generating %d class images into %s (%d there, --num_class_images %d) from "
            "--class_prompt %r, over %d process(es)",
            plan.missing,
            folder,
            plan.existing,
            plan.num_class_images,
            plan.prompt,
            group.count,
        )
    error: Exception | None = None
    written = 0
    try:
        written = _make(plan, sample, show_progress=show_progress and group.is_main)
    except Exception as e:  # Ctrl-C and SystemExit pass: whole images are kept, a rerun resumes
        error = e
    # A collective: it also waits until every process has saved its share.
    everyone_ok = group.all_true(error is None)
    if error is not None:
        raise error
    if not everyone_ok:
        raise DataError(
            f"class-image generation into --class_data_dir {folder} failed on another process "
            "(its error is above); fix it and rerun: the images already made are kept"
        )
    have = count_images(folder)
    if have < plan.num_class_images:
        raise DataError(
            f"--class_data_dir {folder} holds {have} images after generation, fewer than "
            f"--num_class_images {plan.num_class_images}; check that nothing else removes files "
            "from it (or lower --num_class_images) and rerun"
        )
    return written
