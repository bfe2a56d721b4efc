"""TensorFlow Datasets as a source, read by random access (array_record) without TensorFlow.

The dataset must already be prepared in ``data_dir`` in the array_record format; nothing is
downloaded. It is opened as ``tfds.data_source(..., download=False)`` opens it (``tfds.builder``
then ``as_data_source``), split in two steps so the features can be checked first. Image features are read undecoded (``tfds.decode.SkipDecoding``): records carry the
encoded PNG/JPEG bytes and decoding happens in the loader's workers. A feature stored as a plain
tensor comes back as an array.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from shared.data.folder import check_index
from shared.data.records import ImageRef, Record
from shared.errors import ConfigError, DataError

_LAYOUT = (
    "{data_dir}/{name}/[<config>/]<version>/ with dataset_info.json, features.json and "
    "{name}-<split>.array_record-NNNNN-of-NNNNN files"
)
_NOT_DATASETS = ("downloads", "manual")  # folders TFDS keeps beside the datasets


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # slow and optional: imported only when used
    except ImportError as e:
        raise ImportError(
            "reading TFDS datasets needs tensorflow-datasets and array-record (TensorFlow is not "
            "needed): pip install 'twindiff[data]'"
        ) from e
    return tfds


def _prepare_hint(name: str, data_dir: str) -> str:
    return (
        f"prepare it with `tfds build {name} --data_dir={data_dir} --file_format=array_record` "
        "(on a machine with TensorFlow) or copy a prepared dataset there"
    )


def _missing_error(name: str, data_dir: str, reason: str) -> DataError:
    layout = _LAYOUT.format(data_dir=data_dir, name=name.split("/")[0].split(":")[0])
    return DataError(
        f"{reason}. --tfds_data_dir must hold {layout}; {_prepare_hint(name, data_dir)}"
    )


def _split_key(key: str) -> list[str]:
    return [part for part in key.split("/") if part]


def _feature_at(features, key: str, flag: str):
    """The feature at a '/'-separated key (a Sequence of dicts is indexed like the dict)."""
    feature = features
    for part in _split_key(key):
        available = list(feature.keys()) if hasattr(feature, "keys") else []
        if part not in available:
            raise DataError(
                f"{flag} {key!r}: no feature {part!r}; the features are {available}. Choose one "
                f"of them with {flag}"
            )
        feature = feature[part]
    return feature


def _value_at(example: dict[str, Any], key: str) -> Any:
    value = example
    for part in _split_key(key):
        value = value[part]
    return value


def _nest(key: str, leaf: Any) -> dict[str, Any]:
    tree = leaf
    for part in reversed(_split_key(key)):
        tree = {part: tree}
    return tree


def _text(value: Any, feature, where: str) -> tuple[str, ...]:
    """Captions from a Text, ClassLabel (its name) or a sequence of them."""
    if isinstance(value, bytes):
        return (value.decode("utf-8"),)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (int, np.integer)) and hasattr(feature, "int2str"):
        return (feature.int2str(int(value)),)
    if isinstance(value, (list, tuple, np.ndarray)):
        inner = getattr(feature, "feature", feature)
        return tuple(c for v in value for c in _text(v, inner, where))
    raise DataError(
        f"{where}: caption {value!r} is not text (Text, ClassLabel or a list of them); choose a "
        "text feature with --caption_column"
    )


class TfdsSource:
    """One split of a prepared TFDS dataset: one record per example."""

    def __init__(
        self,
        data_source,
        *,
        name: str,
        split: str,
        image_key: str,
        caption_key: str | None,
        caption_feature,
        summary: str,
    ):
        self._data_source = data_source  # pickles itself; readers reopen in the worker
        self._name = name
        self._split = split
        self._image_key = image_key
        self._caption_key = caption_key
        self._caption_feature = caption_feature
        self._summary = summary

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> Record:
        index = check_index(index, len(self._data_source))
        example = self._data_source[index]
        name = f"tfds {self._name}[{self._split}][{index}]"
        image = _value_at(example, self._image_key)
        if isinstance(image, bytes):
            ref = ImageRef(name=name, data=image)
        else:
            ref = ImageRef(name=name, array=np.asarray(image))
        captions = ()
        if self._caption_key is not None:
            value = _value_at(example, self._caption_key)
            captions = _text(value, self._caption_feature, f"{name} {self._caption_key!r}")
        return Record(image=ref, captions=captions)

    def describe(self) -> str:
        return self._summary


def tfds_source(
    name: str,
    *,
    data_dir: str | os.PathLike | None,
    split: str = "train",
    image_key: str = "image",
    caption_key: str | None = None,
) -> TfdsSource:
    """A prepared TFDS dataset, read by random access without TensorFlow.

    Args:
      name: dataset name as TFDS spells it, optionally with config and version
        (``"mnist"``, ``"coco_captions/2017:1.1.0"``).
      data_dir: the TFDS data folder (``--tfds_data_dir``); local or ``gs://``.
      split: split, with TFDS slicing allowed (``"train[:10%]"``).
      image_key: the image feature; nested features as ``"a/b"``.
      caption_key: a Text or ClassLabel feature (or a sequence of them, ``"captions/text"``);
        ClassLabel values become their names. None for unconditional data.

    Returns:
      The source.

    Raises:
      ConfigError: no `data_dir`.
      DataError: `data_dir` or the dataset in it is missing (the message shows the expected
        layout and how to prepare it); a missing feature or split; a dataset not stored as
        array_record.
    """
    if data_dir is None:
        raise ConfigError(
            f"TFDS dataset {name!r} needs --tfds_data_dir (the folder it was prepared in)"
        )
    from etils import epath  # a tfds dependency; also handles gs:// folders

    data_dir = os.fspath(data_dir)
    root = epath.Path(data_dir)
    if not root.is_dir():
        raise _missing_error(name, data_dir, f"--tfds_data_dir {data_dir} does not exist")
    base = name.split("/")[0].split(":")[0]
    if not (root / base).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in _NOT_DATASETS)
        raise _missing_error(
            name, data_dir, f"no dataset {base!r} in --tfds_data_dir {data_dir} (found {found})"
        )
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        found = sorted(p.name for p in (root / base).iterdir())
        reason = f"TFDS finds no {name!r} in {data_dir} ({root / base} holds {found})"
        raise _missing_error(name, data_dir, reason) from None
    if not builder.is_prepared():
        raise _missing_error(
            name, data_dir, f"{name!r} version {builder.version} is not prepared in {data_dir}"
        )
    features = builder.info.features
    image_feature = _feature_at(features, image_key, "--image_column")
    caption_feature = (
        _feature_at(features, caption_key, "--caption_column") if caption_key else None
    )
    decoders = None
    if isinstance(image_feature, tfds.features.Image):
        decoders = _nest(image_key, tfds.decode.SkipDecoding())
    try:
        data_source = builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:  # prepared as TFRecord: no random access
        raise DataError(
            f"TFDS {name!r} in {data_dir} is stored as {builder.info.file_format}, which has no "
            f"random access; {_prepare_hint(name, data_dir)}"
        ) from e
    except ValueError as e:  # unknown split
        reason = " ".join(str(e).split())  # one line: TFDS's message may wrap
        raise DataError(f"TFDS {name!r}: {reason} Choose it with --dataset_split") from None
    caption_text = f"captions from {caption_key!r}" if caption_key else "no captions"
    summary = (
        f"tfds {name} (split {split!r}) from {data_dir}: {len(data_source):,} examples, "
        f"images from {image_key!r}, {caption_text}"
    )
    return TfdsSource(
        data_source,
        name=name,
        split=split,
        image_key=image_key,
        caption_key=caption_key,
        caption_feature=caption_feature,
        summary=summary,
    )
