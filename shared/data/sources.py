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

from typing import Protocol, runtime_checkable

import numpy as np

from shared.data.dreambooth import DreamBoothSource, dreambooth_source
from shared.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    check_index,
    count_images,
    image_folder_source,
    list_images,
)
from shared.data.hf import HFDatasetSource, hf_dataset_source
from shared.data.records import Record
from shared.data.tfds import TfdsSource, tfds_source


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
            raise ValueError(f"--max_train_samples must be at least 1, got {n}")
        self._source = source
        self._indices = np.random.default_rng(seed).permutation(len(source))[:n]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Record:
        return self._source[int(self._indices[check_index(index, len(self))])]

    def describe(self) -> str:
        return f"{self._source.describe()} (first {len(self):,} after a seeded shuffle)"


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
