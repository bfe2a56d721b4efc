"""Data sources: where training examples come from, as `Record`s with undecoded images.

A source is any object with ``__len__``, ``__getitem__(i) -> Record`` and ``describe() -> str``.
Sources are deterministic (same data, same order), cheap to index, and picklable, because the
loader sends them to its worker processes. One constructor per kind of data:

- `image_folder_source`: a local folder, captions from metadata.jsonl/.csv or sidecar .txt files;
- `hf_dataset_source`: HF `datasets` (hub name, local dataset folder, ``save_to_disk`` folder);
- `tfds_source`: a prepared TensorFlow Datasets dataset (array_record, no TensorFlow);
- `dreambooth_source`: instance images with a prompt, optionally paired with class images.

`datasets` and `tensorflow_datasets` are imported only inside the constructors that use them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection
from typing import Protocol, runtime_checkable

import numpy as np

from shared.data.dreambooth import DreamBoothSource, dreambooth_source
from shared.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    check_index,
    count_images,
    excluded_note,
    image_folder_source,
    list_images,
)
from shared.data.hf import HFDatasetSource, hf_dataset_source
from shared.data.records import LocalImages, Record
from shared.data.tfds import TfdsSource, tfds_source
from shared.errors import ConfigError, DataError


@runtime_checkable
class Source(Protocol):
    """What the loader reads: a fixed-length, indexable, describable list of records."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...

    def describe(self) -> str:
        """One line for logs, e.g. "imagefolder /data/dogs: 1,204 images, ..."."""
        ...


class SubsetSource:
    """The first `n` records of a seeded shuffle of `source` (``--max_train_samples``).

    The same selection as diffusers' ``dataset.shuffle(seed).select(range(n))``: HF datasets
    shuffle with ``np.random.default_rng(seed).permutation``.
    """

    def __init__(self, source: Source, n: int, *, seed: int):
        if n < 1:
            raise ConfigError(f"--max_train_samples must be at least 1, got {n}")
        self._source = source
        self._indices = np.random.default_rng(seed).permutation(len(source))[:n]
        self.excluded = 0

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Record:
        return self._source[int(self._indices[check_index(index, len(self))])]

    def describe(self) -> str:
        n = len(self._indices) + self.excluded
        note = excluded_note(self.excluded, used=len(self))
        return f"{self._source.describe()} (first {n:,} after a seeded shuffle{note})"

    def local_images(self) -> list[LocalImages]:
        """The local images of the selected records only: the others are never read."""
        inner = getattr(self._source, "local_images", None)
        if inner is None:  # e.g. TFDS: nothing on a local path to check
            return []
        used = {path for i in range(len(self)) for path in _paths(self[i])}
        return [
            LocalImages(group.folder, group.flag, tuple(p for p in group.paths if p in used))
            for group in inner()
        ]

    def without(self, paths: Collection[str]) -> SubsetSource:
        """This subset minus the records reading any of `paths`; the others keep their order.

        The survivors are the same records as before: the seeded selection is not redrawn, so
        dropping a file never changes which other images a run trains on.

        Raises:
          DataError: no record would be left.
        """
        drop = {os.path.abspath(p) for p in paths}
        keep = [i for i in self._indices if not _paths(self._source[int(i)]) & drop]
        if not keep:
            raise DataError(
                f"none of the {len(self):,} images chosen by --max_train_samples can be read; "
                "replace the unreadable files or raise --max_train_samples"
            )
        subset = copy.copy(self)
        subset._indices = np.asarray(keep, dtype=self._indices.dtype)
        subset.excluded = self.excluded + len(self._indices) - len(keep)
        return subset


def _paths(record: Record) -> set[str]:
    """The local files one record reads: its image and its extra images."""
    refs = (record.image, *record.extras.values())
    return {ref.path for ref in refs if ref.path is not None}


__all__ = [
    "IMAGE_EXTENSIONS",
    "DreamBoothSource",
    "HFDatasetSource",
    "ImageFolderSource",
    "Source",
    "SubsetSource",
    "TfdsSource",
    "count_images",
    "dreambooth_source",
    "hf_dataset_source",
    "image_folder_source",
    "list_images",
    "tfds_source",
]
