"""Local image folders: image listing and the HF "imagefolder" caption convention.

A folder lists every image under it in sorted order of relative path, so the same folder always
gives the same records. Captions come, per image, from the nearest rule that has one:

1. ``metadata.jsonl`` / ``metadata.csv`` rows (HF imagefolder): ``file_name`` is relative to the
   metadata file, which may sit at the root or in any subfolder. As in HF, a metadata file speaks
   for its whole subtree: images there that no row names are skipped (``describe`` counts them).
   Several rows naming one image give one record whose captions are all of their cells.
2. A sidecar ``<image stem>.txt`` beside the image: each non-empty line is one candidate caption.
3. Nothing: empty captions (unconditional training).

Hidden files and folders (``.DS_Store``, ``.git``), ``__MACOSX`` and non-image files are ignored.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import posixpath
from collections.abc import Collection, Iterator
from typing import Any

from shared.data.records import ImageRef, LocalImages, Record
from shared.errors import DataError
from shared.prompts import normalize_caption_field

# Formats PIL opens; matched case-insensitively.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_UNSUPPORTED_METADATA = ("metadata.parquet",)
_IGNORED_DIRS = ("__MACOSX",)
_FOUND_SHOWN = 8  # names quoted in "no images" errors


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIRS


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclasses.dataclass
class _Scan:
    """What one walk of a folder found; all paths relative to the root, '/'-separated, sorted."""

    images: list[str]
    metadata: list[str]
    unsupported_metadata: list[str]
    texts: dict[str, str]  # "dir/stem" -> "dir/stem.txt"
    found: list[str]  # the first entries seen, ignored ones included (for error messages)
    n_found: int


def _scan(root: str, *, recursive: bool) -> _Scan:
    images, metadata, unsupported, texts, found = [], [], [], {}, []
    n_found = 0
    visited = set()
    # followlinks: linked subfolders are common in curated datasets; `visited` breaks link cycles.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        entries = [prefix + d + "/" for d in sorted(dirnames)]
        dirnames[:] = sorted(d for d in dirnames if recursive and not _ignored(d))
        for name in sorted(filenames):
            rel = prefix + name
            entries.append(rel)
            if _ignored(name):
                continue
            stem, ext = os.path.splitext(rel)
            if ext.lower() in IMAGE_EXTENSIONS:
                images.append(rel)
            elif name in METADATA_NAMES:
                metadata.append(rel)
            elif name in _UNSUPPORTED_METADATA:
                unsupported.append(rel)
            elif ext.lower() == ".txt":
                texts.setdefault(stem, rel)
        n_found += len(entries)
        found.extend(entries[: _FOUND_SHOWN - len(found)])
    images.sort()
    metadata.sort()
    return _Scan(images, metadata, unsupported, texts, found, n_found)


def _check_folder(folder: str | os.PathLike, flag: str | None) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    via = f" (given by {flag})" if flag else ""
    if not os.path.exists(path):
        raise DataError(f"image folder {path}{via} does not exist; check {flag or 'the path'}")
    if not os.path.isdir(path):
        raise DataError(
            f"{path}{via} is a file, not a folder; point {flag or 'the path'} at the folder that "
            "holds the images"
        )
    return path


def _no_images_error(root: str, scan: _Scan, flag: str | None) -> DataError:
    via = f" (given by {flag})" if flag else ""
    fix = f"add images to it or point {flag} at another folder" if flag else "add images to it"
    if not scan.n_found:
        return DataError(f"image folder {root}{via} is empty; {fix}")
    shown = ", ".join(scan.found) + (", ..." if scan.n_found > len(scan.found) else "")
    return DataError(
        f"no images in {root}{via}: found {scan.n_found} other entries ({shown}); images must end "
        f"in one of {', '.join(IMAGE_EXTENSIONS)}; {fix}"
    )


def list_images(
    folder: str | os.PathLike,
    *,
    recursive: bool = True,
    allow_empty: bool = True,
    flag: str | None = None,
) -> list[str]:
    """Absolute paths of the images under `folder`, sorted by relative path.

    Args:
      folder: the folder to list.
      recursive: descend into subfolders (hidden ones and ``__MACOSX`` are skipped).
      allow_empty: return [] for a folder without images instead of raising.
      flag: the command-line flag that gave `folder`, named in error messages.

    Returns:
      The image paths.

    Raises:
      DataError: `folder` does not exist or is a file; no images and not `allow_empty` (the
        message lists what the folder holds).
    """
    root = _check_folder(folder, flag)
    scan = _scan(root, recursive=recursive)
    if not scan.images and not allow_empty:
        raise _no_images_error(root, scan, flag)
    return [os.path.join(root, rel) for rel in scan.images]


def count_images(folder: str | os.PathLike, *, recursive: bool = True) -> int:
    """Number of images under `folder`; 0 when it does not exist (e.g. class images not yet made)."""
    if not os.path.isdir(folder):
        return 0
    return len(list_images(folder, recursive=recursive))


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {line_number}: malformed JSON ({e.msg}); each line must be one "
                    'object such as {"file_name": "0001.png", "text": "a photo of a dog"}'
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {line_number}: expected a JSON object, got "
                    f'{type(row).__name__}; write each line as {{"file_name": ..., "text": ...}}'
                )
            yield line_number, row


def _read_csv(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataError(
                        f"{path} line {reader.line_num}: {len(row) - 1 + len(row[None])} cells "
                        f"but the header has {len(reader.fieldnames or ())} columns; quote cells "
                        "that contain commas"
                    )
                # An empty cell is a missing value, as pandas (and so HF) reads it.
                yield reader.line_num, {k: (None if v == "" else v) for k, v in row.items()}
        except csv.Error as e:
            raise DataError(
                f"{path} line {reader.line_num}: malformed CSV ({e}); fix that line"
            ) from None


def _read_metadata(path: str) -> list[tuple[int, dict[str, Any]]]:
    read = _read_jsonl if path.endswith(".jsonl") else _read_csv
    try:
        return list(read(path))
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None


def _columns_error(
    path: str, what: str, column: str, rows: list[tuple[int, dict[str, Any]]], flag: str
) -> DataError:
    columns = sorted({key for _, row in rows for key in row if key is not None})
    return DataError(
        f"{path} has no {what} column {column!r}; its columns are {columns}. Pass the right one "
        f"with {flag}"
    )


def _metadata_captions(
    root: str,
    scan: _Scan,
    *,
    file_name_column: str,
    caption_column: str | None,
) -> dict[str, list[str]]:
    """Image (relative path) -> captions from all metadata rows naming it."""
    listed = set(scan.images)
    captions: dict[str, list[str]] = {}
    for meta_rel in scan.metadata:
        path = os.path.join(root, meta_rel)
        meta_dir = posixpath.dirname(meta_rel)
        rows = _read_metadata(path)
        if rows and not any(file_name_column in row for _, row in rows):
            raise _columns_error(path, "file name", file_name_column, rows, "file_name_column=")
        if rows and caption_column and not any(caption_column in row for _, row in rows):
            raise _columns_error(path, "caption", caption_column, rows, "--caption_column")
        for line, row in rows:
            where = f"{path} line {line}"
            file_name = row.get(file_name_column)
            if not isinstance(file_name, str) or not file_name:
                raise DataError(
                    f"{where}: {file_name_column!r} must be a non-empty string, got {file_name!r}"
                )
            file_rel = posixpath.normpath(file_name.replace("\\", "/"))
            # As HF: no absolute paths, URLs or "..": a row cannot leave its metadata folder.
            if os.path.isabs(file_rel) or "://" in file_name or file_rel.split("/")[0] == "..":
                raise DataError(
                    f"{where}: {file_name_column} {file_name!r} must be a path relative to the "
                    "metadata file, inside its folder"
                )
            rel = posixpath.normpath(posixpath.join(meta_dir, file_rel))
            if rel not in listed:
                full = os.path.join(root, rel)
                if not os.path.isfile(full):
                    raise DataError(
                        f"{where} names a missing image {file_name!r} ({full}); add the image or "
                        "remove the row"
                    )
                if not _is_image(rel):
                    raise DataError(
                        f"{where}: {file_name!r} is not an image (images end in "
                        f"{', '.join(IMAGE_EXTENSIONS)}); remove the row"
                    )
                continue  # an image the listing left out on purpose (hidden, not recursive)
            try:
                cell = (
                    normalize_caption_field(row.get(caption_column), where=where)
                    if caption_column
                    else ()
                )
            except ValueError as e:  # the message already names the file and line
                raise DataError(str(e)) from None
            captions.setdefault(rel, []).extend(cell)
    return captions


def _sidecar_captions(path: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return tuple(line.strip() for line in f if line.strip())
    except UnicodeDecodeError as e:
        raise DataError(
            f"caption file {path} is not UTF-8 text ({e.reason}); save it as UTF-8"
        ) from None


def check_index(index: int, length: int) -> int:
    """`index` as a position in a source of `length` records; negative counts from the end."""
    position = int(index)
    if position < 0:
        position += length
    if not 0 <= position < length:
        raise IndexError(f"record {index} out of range for a source of {length}")
    return position


def excluded_note(excluded: int, *, used: int) -> str:
    """The ``describe()`` suffix of a source that dropped unreadable images ("" for none)."""
    if not excluded:
        return ""
    return f"; {excluded:,} unreadable image{'s' if excluded > 1 else ''} excluded ({used:,} used)"


class ImageFolderSource:
    """A local image folder: one record per image, images as file paths."""

    def __init__(
        self,
        root: str,
        images: list[str],
        captions: list[tuple[str, ...]],
        *,
        summary: str,
        flag: str = "--train_data_dir",
        excluded: int = 0,
    ):
        self.root = root
        self.flag = flag
        self.excluded = excluded
        self._images = images  # relative paths, kept short for pickling to workers
        self._captions = captions
        self._summary = summary

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Record:
        index = check_index(index, len(self._images))
        path = os.path.join(self.root, self._images[index])
        return Record(image=ImageRef(name=path, path=path), captions=self._captions[index])

    def describe(self) -> str:
        return f"imagefolder {self.root}: {self._summary}{excluded_note(self.excluded, used=len(self))}"

    def local_images(self) -> list[LocalImages]:
        """This folder's images, in record order (`shared.data.verify` checks them)."""
        paths = tuple(os.path.join(self.root, rel) for rel in self._images)
        return [LocalImages(folder=self.root, flag=self.flag, paths=paths)]

    def without(self, paths: Collection[str]) -> ImageFolderSource:
        """This source minus the images at `paths` (absolute), the others in the same order.

        Raises:
          DataError: no image would be left.
        """
        drop = {os.path.abspath(p) for p in paths}
        keep = [i for i, rel in enumerate(self._images) if os.path.join(self.root, rel) not in drop]
        if not keep:
            raise DataError(
                f"no readable image is left in {self.root} (given by {self.flag}); replace the "
                "unreadable files"
            )
        return ImageFolderSource(
            self.root,
            [self._images[i] for i in keep],
            [self._captions[i] for i in keep],
            summary=self._summary,
            flag=self.flag,
            excluded=self.excluded + len(self._images) - len(keep),
        )


def image_folder_source(
    root: str | os.PathLike,
    *,
    caption_column: str | None = "text",
    file_name_column: str = "file_name",
    recursive: bool = True,
    flag: str = "--train_data_dir",
) -> ImageFolderSource:
    """A local image folder in the HF "imagefolder" convention (see the module docstring).

    Args:
      root: the folder.
      caption_column: metadata column holding a caption or a list of captions; None reads no
        captions (metadata still decides which images belong, as in HF).
      file_name_column: metadata column naming the image, relative to the metadata file.
      recursive: include subfolders.
      flag: the command-line flag that gave `root`, named in error messages.

    Returns:
      The source, in sorted order of relative image path.

    Raises:
      DataError: `root` is missing or a file; no images; malformed metadata; a row naming a
        missing image; a missing column (the message lists those that exist).
    """
    root = _check_folder(root, flag)
    scan = _scan(root, recursive=recursive)
    if not scan.images:
        raise _no_images_error(root, scan, flag)
    if scan.unsupported_metadata:
        raise DataError(
            f"{os.path.join(root, scan.unsupported_metadata[0])} is not read by the image folder "
            "source; load the folder with --dataset_name (HF datasets) or convert it to "
            "metadata.jsonl"
        )
    from_metadata = _metadata_captions(
        root, scan, file_name_column=file_name_column, caption_column=caption_column
    )
    metadata_dirs = {posixpath.dirname(m) for m in scan.metadata}
    images, captions = [], []
    counts = {"metadata": 0, "txt": 0, "none": 0, "skipped": 0}
    for rel in scan.images:
        if rel in from_metadata:
            images.append(rel)
            captions.append(tuple(from_metadata[rel]))
            counts["metadata"] += 1
        elif metadata_dirs and _covered(rel, metadata_dirs):
            counts["skipped"] += 1
        else:
            sidecar = scan.texts.get(os.path.splitext(rel)[0])
            cell = (
                _sidecar_captions(os.path.join(root, sidecar)) if sidecar and caption_column else ()
            )
            images.append(rel)
            captions.append(cell)
            counts["txt" if cell else "none"] += 1
    if not images:
        raise DataError(
            f"no image of {root} is named in its metadata files ({', '.join(scan.metadata)}): "
            f"{counts['skipped']} images skipped. Add rows with a {file_name_column!r} column"
        )
    return ImageFolderSource(
        root, images, captions, summary=_summary(len(images), counts), flag=flag
    )


def _covered(rel: str, metadata_dirs: set[str]) -> bool:
    """Whether a metadata file in an ancestor folder (or the image's own) speaks for `rel`."""
    parent = posixpath.dirname(rel)
    while True:
        if parent in metadata_dirs:
            return True
        if not parent:
            return False
        parent = posixpath.dirname(parent)


def _summary(n: int, counts: dict[str, int]) -> str:
    parts = [
        f"{counts[key]:,} {label}"
        for key, label in (("metadata", "from metadata"), ("txt", "from .txt"), ("none", "none"))
        if counts[key]
    ]
    text = f"{n:,} images, captions: {', '.join(parts)}"
    if counts["skipped"]:
        text += f"; {counts['skipped']:,} images not named in metadata skipped"
    return text
