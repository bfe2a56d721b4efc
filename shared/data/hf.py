"""Hugging Face `datasets` as a source, loaded as diffusers' ``train_text_to_image.py`` loads it.

The Arrow-backed dataset is kept as it is: memory-mapped, it pickles as a file reference, so
workers open it cheaply. Images are read undecoded (``datasets.Image(decode=False)``): records
carry the encoded bytes or the file path, and decoding happens in the loader's workers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from shared.data.folder import check_index, list_images
from shared.data.records import ImageRef, Record
from shared.errors import ConfigError, DataError
from shared.prompts import normalize_caption_field

_SAVED_DATASET_FILES = ("state.json", "dataset_info.json")  # written by Dataset.save_to_disk
_SAVED_DICT_FILE = "dataset_dict.json"  # written by DatasetDict.save_to_disk


def _import_datasets():
    try:
        import datasets  # slow (~1 s) and optional: imported only when a dataset is used
    except ImportError as e:
        raise ImportError(
            "reading HF datasets needs the `datasets` package: pip install 'twindiff[data]'"
        ) from e
    return datasets


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _SAVED_DICT_FILE)) or all(
        os.path.isfile(os.path.join(path, name)) for name in _SAVED_DATASET_FILES
    )


def _load_from_disk(datasets, path: str, split: str, flag: str):
    loaded = datasets.load_from_disk(path)
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded  # one saved Dataset is used whole: it has no splits to choose from
    if split not in loaded:
        raise DataError(
            f"{flag} {path} (saved with save_to_disk) has no split {split!r}; its splits are "
            f"{sorted(loaded)}. Choose one with --dataset_split"
        )
    return loaded[split]


def _load(
    datasets,
    dataset_name: str | None,
    *,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    cache_dir: str | None,
    split: str,
):
    if dataset_name is not None:
        local = os.path.expanduser(dataset_name)
        if os.path.isdir(local) and _is_saved_to_disk(local):
            return _load_from_disk(datasets, local, split, "--dataset_name")
        if dataset_name.startswith(("/", "./", "../", "~")) and not os.path.exists(local):
            raise DataError(
                f"--dataset_name {dataset_name} looks like a local path but does not exist; "
                "check the path, or give a hub name such as 'lambdalabs/naruto-blip-captions'"
            )
        return datasets.load_dataset(
            dataset_name,
            dataset_config_name,
            cache_dir=cache_dir,
            data_dir=train_data_dir,
            split=split,
        )
    if train_data_dir is None:
        raise ConfigError(
            "no training data: give --dataset_name (a hub name or a local dataset folder) or "
            "--train_data_dir (a local image folder)"
        )
    if os.path.isdir(train_data_dir) and _is_saved_to_disk(train_data_dir):
        return _load_from_disk(datasets, train_data_dir, split, "--train_data_dir")
    # Fail here with the folder's contents rather than inside datasets with a glob pattern.
    list_images(train_data_dir, allow_empty=False, flag="--train_data_dir")
    return datasets.load_dataset(
        "imagefolder",
        data_files={"train": os.path.join(train_data_dir, "**")},
        cache_dir=cache_dir,
        split=split,
    )


_TEXT = ("string", "large_string")
_BINARY = ("binary", "large_binary")


def _inner(feature):
    """The element feature of a List/LargeList/Sequence (or legacy ``[feature]``), else None."""
    if isinstance(feature, list) and len(feature) == 1:
        return feature[0]
    return getattr(feature, "feature", None)


def _leaf_dtype(datasets, feature) -> str | None:
    """The element dtype of an array-like feature (ArrayND, nested lists of numbers), or None."""
    array_types = (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)
    while not isinstance(feature, array_types):
        if isinstance(feature, datasets.Value):
            return None if feature.dtype in _TEXT + _BINARY else feature.dtype
        feature = _inner(feature)
        if feature is None:
            return None
    return feature.dtype


def _image_kind(datasets, feature, column: str) -> str:
    """How column values turn into an ImageRef: 'image', 'path', 'bytes' or 'array'."""
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in _TEXT:
        return "path"
    if isinstance(feature, datasets.Value) and feature.dtype in _BINARY:
        return "bytes"
    if not isinstance(feature, datasets.Value) and _leaf_dtype(datasets, feature) is not None:
        return "array"
    raise DataError(
        f"--image_column {column!r} holds {feature}; expected images (datasets.Image), file "
        "paths, encoded image bytes or pixel arrays; choose another column with --image_column"
    )


def _check_caption_feature(datasets, feature, column: str) -> None:
    if isinstance(feature, datasets.Value) and feature.dtype in _TEXT:
        return
    inner = _inner(feature)
    if isinstance(inner, datasets.Value) and inner.dtype in _TEXT:
        return
    raise DataError(
        f"--caption_column {column!r} holds {feature}; it must hold strings or lists of strings; "
        "choose another column with --caption_column"
    )


def _image_ref(value: Any, name: str) -> ImageRef:
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            label = f"{name} ({value['path']})" if value.get("path") else name
            return ImageRef(name=label, data=value["bytes"])
        if value.get("path") is not None:
            return ImageRef(name=value["path"], path=value["path"])
        raise DataError(f"{name}: image has neither bytes nor a path; fix or drop that row")
    if isinstance(value, bytes):
        return ImageRef(name=name, data=value)
    if isinstance(value, str):
        return ImageRef(name=value, path=value)
    if value is None:
        raise DataError(f"{name}: the image is missing (None); fix or drop that row")
    return ImageRef(name=name, array=np.asarray(value))


class HFDatasetSource:
    """A `datasets.Dataset`: one record per row, images undecoded."""

    def __init__(
        self,
        dataset,
        *,
        label: str,
        image_column: str,
        caption_column: str | None,
        array_dtype: str | None,
        summary: str,
    ):
        self._dataset = dataset
        self._label = label
        self._image_column = image_column
        self._caption_column = caption_column
        self._array_dtype = array_dtype
        self._summary = summary

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> Record:
        index = check_index(index, len(self._dataset))
        row = self._dataset[index]
        name = f"dataset {self._label!r}[{index}]"
        image = _image_ref(row[self._image_column], name)
        if self._array_dtype is not None:
            image = ImageRef(name=name, array=image.array.astype(self._array_dtype, copy=False))
        captions = ()
        if self._caption_column is not None:
            where = f"{name} column {self._caption_column!r}"
            try:
                captions = normalize_caption_field(row[self._caption_column], where=where)
            except ValueError as e:  # the message already names the row and column
                raise DataError(str(e)) from None
        return Record(image=image, captions=captions)

    def describe(self) -> str:
        return self._summary


def hf_dataset_source(
    dataset_name: str | None = None,
    *,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str | None = "text",
    max_train_samples: int | None = None,
    seed: int = 0,
) -> HFDatasetSource:
    """A dataset loaded with HF `datasets`, as diffusers' text-to-image script loads it.

    ``load_dataset(dataset_name, dataset_config_name, cache_dir=..., data_dir=train_data_dir)``
    for a hub name or a local dataset folder; ``load_from_disk`` for a folder written by
    ``save_to_disk``; else the "imagefolder" builder over `train_data_dir`.

    Args:
      dataset_name: hub name, local dataset folder, or a ``save_to_disk`` folder.
      dataset_config_name: the dataset's config, if it has several.
      train_data_dir: image folder (without `dataset_name`), or ``data_dir`` of the dataset.
      cache_dir: where `datasets` caches downloads and Arrow files.
      split: the split to read (a single saved Dataset has none and is used whole).
      image_column: column of the images: images, file paths, encoded bytes or pixel arrays.
      caption_column: column of a caption or a list of captions; None for unconditional data.
      max_train_samples: keep the first n rows after ``shuffle(seed)``, as diffusers does
        (all rows when the dataset is smaller).
      seed: the shuffle seed of `max_train_samples`.

    Returns:
      The source.

    Raises:
      ConfigError: no data given, or ``max_train_samples < 1``.
      DataError: a local folder does not exist; a missing split; a missing or unusable column
        (the message lists the columns).
    """
    if max_train_samples is not None and max_train_samples < 1:
        raise ConfigError(f"--max_train_samples must be at least 1, got {max_train_samples}")
    datasets = _import_datasets()
    dataset_name, train_data_dir, cache_dir = (
        None if p is None else os.fspath(p) for p in (dataset_name, train_data_dir, cache_dir)
    )
    dataset = _load(
        datasets,
        dataset_name,
        dataset_config_name=dataset_config_name,
        train_data_dir=train_data_dir,
        cache_dir=cache_dir,
        split=split,
    )
    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column is not None and column not in dataset.column_names:
            raise DataError(
                f"{flag} {column!r} is not a column of the dataset; its columns are "
                f"{dataset.column_names}. Pass the right one with {flag}"
            )
    columns = [image_column] + ([caption_column] if caption_column is not None else [])
    dataset = dataset.select_columns(columns)  # drop the rest; reads then touch only these
    kind = _image_kind(datasets, dataset.features[image_column], image_column)
    if caption_column is not None:
        _check_caption_feature(datasets, dataset.features[caption_column], caption_column)
    array_dtype = None
    if kind == "image" and dataset.features[image_column].decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    elif kind == "array":
        array_dtype = _leaf_dtype(datasets, dataset.features[image_column])
        dataset = dataset.with_format("numpy", columns=[image_column], output_all_columns=True)
    label = dataset_name or f"imagefolder {train_data_dir}"
    summary = f"hf dataset {label!r} (split {split!r}): "
    if max_train_samples is not None:
        total = len(dataset)
        # keep_in_memory: the shuffle's index table must not be written into the user's folder.
        dataset = dataset.shuffle(seed=seed, keep_in_memory=True)
        dataset = dataset.select(range(min(max_train_samples, total)))
        summary += f"first {len(dataset):,} of {total:,} rows after shuffle(seed={seed}), "
    else:
        summary += f"{len(dataset):,} rows, "
    summary += f"images from {image_column!r}, " + (
        f"captions from {caption_column!r}" if caption_column else "no captions"
    )
    return HFDatasetSource(
        dataset,
        label=label,
        image_column=image_column,
        caption_column=caption_column,
        array_dtype=array_dtype,
        summary=summary,
    )
