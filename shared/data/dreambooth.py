"""DreamBooth data: a few instance images of one subject, optionally paired with class images.

Same semantics as diffusers' ``DreamBoothDataset``: with prior preservation an epoch has
max(#instance, #class) examples and both lists cycle; record ``i`` pairs instance ``i % n_inst``
with class ``i % n_class``. The prompts are the captions; the folders need no metadata.
"""

from __future__ import annotations

import os
import warnings

from shared.data.folder import check_index, count_images, list_images
from shared.data.records import ImageRef, Record


class DreamBoothSource:
    """Instance images captioned with the instance prompt; class images as ``extras["class"]``."""

    def __init__(
        self,
        instance_images: list[str],
        *,
        instance_prompt: str,
        class_images: list[str] | None,
        class_prompt: str | None,
        summary: str,
    ):
        self._instance_images = instance_images
        self._instance_prompt = instance_prompt
        self._class_images = class_images or []
        self._class_prompt = class_prompt
        self._summary = summary

    def __len__(self) -> int:
        return max(len(self._instance_images), len(self._class_images))

    def __getitem__(self, index: int) -> Record:
        index = check_index(index, len(self))
        path = self._instance_images[index % len(self._instance_images)]
        extras, meta = {}, {}
        if self._class_images:
            class_path = self._class_images[index % len(self._class_images)]
            extras["class"] = ImageRef(name=class_path, path=class_path)
            meta["class_prompt"] = self._class_prompt
        return Record(
            image=ImageRef(name=path, path=path),
            captions=(self._instance_prompt,),
            extras=extras,
            meta=meta,
        )

    def describe(self) -> str:
        return self._summary


def dreambooth_source(
    instance_data_dir: str | os.PathLike,
    *,
    instance_prompt: str,
    class_data_dir: str | os.PathLike | None = None,
    class_prompt: str | None = None,
    with_prior_preservation: bool = False,
    num_class_images: int | None = None,
) -> DreamBoothSource:
    """The DreamBooth examples of one subject.

    A trainer that generates missing class images does so before calling this (see
    `count_images`); this function only reads what is on disk.

    Args:
      instance_data_dir: folder of subject images (subfolders included, sorted).
      instance_prompt: caption of every instance image, e.g. "a photo of sks dog".
      class_data_dir: folder of class images; read only with prior preservation.
      class_prompt: caption of the class images, e.g. "a photo of dog".
      with_prior_preservation: pair each example with a class image.
      num_class_images: use at most this many class images (the first in sorted order), as
        diffusers' ``class_num``; None uses all.

    Returns:
      The source; with prior preservation each record carries ``extras["class"]`` and
      ``meta["class_prompt"]``.

    Raises:
      ValueError: a missing prompt or flag, or a folder without images.
      FileNotFoundError: a folder does not exist.
    """
    if not instance_prompt:
        raise ValueError("dreambooth needs --instance_prompt, e.g. 'a photo of sks dog'")
    instance_images = list_images(instance_data_dir, allow_empty=False, flag="--instance_data_dir")
    summary = (
        f"dreambooth {os.path.abspath(instance_data_dir)}: {len(instance_images):,} instance "
        f"images, prompt {instance_prompt!r}"
    )
    if not with_prior_preservation:
        if class_data_dir is not None or class_prompt is not None:
            warnings.warn(
                "--class_data_dir/--class_prompt are ignored without --with_prior_preservation",
                stacklevel=2,
            )
        return DreamBoothSource(
            instance_images,
            instance_prompt=instance_prompt,
            class_images=None,
            class_prompt=None,
            summary=summary,
        )
    if class_data_dir is None:
        raise ValueError(
            "--with_prior_preservation needs --class_data_dir (folder of class images)"
        )
    if not class_prompt:
        raise ValueError("--with_prior_preservation needs --class_prompt, e.g. 'a photo of dog'")
    if count_images(class_data_dir) == 0:
        raise ValueError(
            f"--class_data_dir {class_data_dir} has no class images (or does not exist); generate "
            f"them first (the trainer does so up to --num_class_images with --class_prompt "
            f"{class_prompt!r}) or point --class_data_dir at a folder of class images"
        )
    if num_class_images is not None and num_class_images < 1:
        raise ValueError(f"--num_class_images must be at least 1, got {num_class_images}")
    class_images = list_images(class_data_dir, flag="--class_data_dir")[:num_class_images]
    summary += (
        f"; prior preservation with {len(class_images):,} class images from "
        f"{os.path.abspath(class_data_dir)}, prompt {class_prompt!r}; "
        f"{max(len(instance_images), len(class_images)):,} examples per epoch"
    )
    return DreamBoothSource(
        instance_images,
        instance_prompt=instance_prompt,
        class_images=class_images,
        class_prompt=class_prompt,
        summary=summary,
    )
