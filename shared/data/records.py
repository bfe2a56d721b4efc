"""What a data source hands to the loader: one record per example, images not yet decoded.

Sources only list and describe examples; decoding and transforms run later in the loader's
workers, so a source of a million images opens in seconds and a bad file fails in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, Protocol, runtime_checkable

import numpy as np


class BadImageError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, not an image). Counted and skipped."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name = name
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where one image comes from: a file path, encoded bytes, or an already decoded array.

    Exactly one of `path`, `data`, `array` is set. `name` is what messages call it
    (a file path, or e.g. ``"dataset 'pokemon'[12]"``).
    """

    name: str
    path: str | None = None
    data: bytes | None = None
    array: np.ndarray | None = None

    def __post_init__(self):
        given = sum(x is not None for x in (self.path, self.data, self.array))
        if given != 1:
            raise ValueError(
                f"ImageRef {self.name!r} needs exactly one of path/data/array, got {given}"
            )


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example before decoding.

    Attributes:
      image: the image.
      captions: candidate captions; training picks one at random, evaluation takes the first.
        Empty for unconditional data.
      extras: other named images of the same example (DreamBooth: ``{"class": ImageRef}``).
      meta: small plain values carried to the batch unchanged (e.g. a class prompt).
    """

    image: ImageRef
    captions: tuple[str, ...] = ()
    extras: dict[str, ImageRef] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LocalImages:
    """Local image files a source reads from one folder the user named.

    Attributes:
      folder: the folder, absolute.
      flag: the flag that named it (``--train_data_dir``, ``--instance_data_dir``, ...), quoted in
        messages about its images.
      paths: absolute paths of the images the source reads from it, in source order.
    """

    folder: str
    flag: str
    paths: tuple[str, ...]


@runtime_checkable
class LocalImageSource(Protocol):
    """A source of local image files that can be checked before training (`shared.data.verify`)."""

    def local_images(self) -> list[LocalImages]:
        """The image files this source reads, grouped by the folder they come from."""
        ...

    def without(self, paths: Collection[str]) -> LocalImageSource:
        """The same source minus the records reading any of `paths` (absolute), order kept."""
        ...
