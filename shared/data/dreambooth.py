"""DreamBooth data: a few instance images of one subject, optionally paired with class images.

Same semantics as diffusers' ``DreamBoothDataset``: with prior preservation an epoch has
max(#instance, #class) examples and both lists cycle; record ``i`` pairs instance ``i % n_inst``
with class ``i % n_class``. The prompts are the captions; the folders need no metadata.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection

from shared.data.folder import check_index, count_images, excluded_note, list_images
from shared.data.records import ImageRef, LocalImages, Record
from shared.errors import ConfigError, DataError


class DreamBoothSource:
    """Instance images captioned with the instance prompt; class images as ``extras["class"]``."""

    def __init__(
        self,
        instance_images: list[str],
        *,
        instance_prompt: str,
        class_images: list[str] | None,
        class_prompt: str | None,
        instance_dir: str,
        class_dir: str | None = None,
        excluded: int = 0,
    ):
        self.instance_dir = instance_dir
        self.class_dir = class_dir
        self.excluded = excluded
        self._instance_images = instance_images
        self._instance_prompt = instance_prompt
        self._class_images = class_images or []
        self._class_prompt = class_prompt

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
        text = (
            f"dreambooth {self.instance_dir}: {len(self._instance_images):,} instance images, "
            f"prompt {self._instance_prompt!r}"
        )
        if self._class_images:
            text += (
                f"; prior preservation with {len(self._class_images):,} class images from "
                f"{self.class_dir}, prompt {self._class_prompt!r}; {len(self):,} examples per epoch"
            )
        used = len(self._instance_images) + len(self._class_images)
        return text + excluded_note(self.excluded, used=used)

    def local_images(self) -> list[LocalImages]:
        """The instance images, then the class images in use (`shared.data.verify` checks them)."""
        groups = [
            LocalImages(self.instance_dir, "--instance_data_dir", tuple(self._instance_images))
        ]
        if self._class_images:
            groups.append(
                LocalImages(str(self.class_dir), "--class_data_dir", tuple(self._class_images))
            )
        return groups

    def without(self, paths: Collection[str]) -> DreamBoothSource:
        """This source minus the images at `paths` (absolute); both lists keep their order.

        The pairing rule is unchanged: record ``i`` pairs instance ``i % n_inst`` with class
        ``i % n_class`` of the shortened lists, as if the excluded files had never been there.

        Raises:
          DataError: no instance image, or (with prior preservation) no class image, is left.
        """
        drop = {os.path.abspath(p) for p in paths}
        instance = [p for p in self._instance_images if p not in drop]
        classes = [p for p in self._class_images if p not in drop]
        for before, after, folder, flag in (
            (self._instance_images, instance, self.instance_dir, "--instance_data_dir"),
            (self._class_images, classes, self.class_dir, "--class_data_dir"),
        ):
            if before and not after:
                raise DataError(
                    f"no readable image is left in {folder} (given by {flag}); replace the "
                    "unreadable files"
                )
        removed = (
            len(self._instance_images) + len(self._class_images) - len(instance) - len(classes)
        )
        return DreamBoothSource(
            instance,
            instance_prompt=self._instance_prompt,
            class_images=classes or None,
            class_prompt=self._class_prompt,
            instance_dir=self.instance_dir,
            class_dir=self.class_dir,
            excluded=self.excluded + removed,
        )


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
      ConfigError: a missing prompt or flag, or ``num_class_images < 1``.
      DataError: a folder is missing, a file, or holds no images.
    """
    if not instance_prompt:
        raise ConfigError("dreambooth needs --instance_prompt, e.g. 'a photo of sks dog'")
    instance_images = list_images(instance_data_dir, allow_empty=False, flag="--instance_data_dir")
    instance_dir = _absolute(instance_data_dir)
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
            instance_dir=instance_dir,
        )
    if class_data_dir is None:
        raise ConfigError(
            "--with_prior_preservation needs --class_data_dir (folder of class images)"
        )
    if not class_prompt:
        raise ConfigError("--with_prior_preservation needs --class_prompt, e.g. 'a photo of dog'")
    if count_images(class_data_dir) == 0:
        raise DataError(
            f"--class_data_dir {class_data_dir} has no class images (or does not exist); generate "
            f"them first (the trainer does so up to --num_class_images with --class_prompt "
            f"{class_prompt!r}) or point --class_data_dir at a folder of class images"
        )
    if num_class_images is not None and num_class_images < 1:
        raise ConfigError(f"--num_class_images must be at least 1, got {num_class_images}")
    class_images = list_images(class_data_dir, flag="--class_data_dir")[:num_class_images]
    return DreamBoothSource(
        instance_images,
        instance_prompt=instance_prompt,
        class_images=class_images,
        class_prompt=class_prompt,
        instance_dir=instance_dir,
        class_dir=_absolute(class_data_dir),
    )


def _absolute(folder: str | os.PathLike) -> str:
    # As `list_images` spells it, so that its paths start with this folder.
    return os.path.abspath(os.path.expanduser(os.fspath(folder)))
