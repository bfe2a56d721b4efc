"""Local image folders checked before step 1, so a bad file never stops a run half-way.

`shared.data.build_source` calls `verify_source` for image-folder and DreamBooth sources (HF and
TFDS datasets are not checked here; the loader still skips what it cannot read). Every image is
opened and decoded once, in threads (PIL releases the GIL while it decodes). JPEGs are decoded at
1/8 scale (``Image.draft``): libjpeg still reads the whole entropy-coded stream, so a truncated
file fails as it does at full size (measured: baseline and progressive JPEGs cut at 50%, 90%,
99.9% and just before the end marker all raise), for less work (a 4 MP photo-like JPEG: 6.9 ms
instead of 13.7 ms; noise-like content gains less, as entropy decoding dominates).

The rule, per folder (``--train_data_dir``, ``--instance_data_dir``, ``--class_data_dir``):

- unreadable files are listed once, in one warning, and left out of the source;
- more than ``--max_bad_image_fraction`` (default 0.05) of a folder's images unreadable stops the
  run before step 1 with a `DataError` that lists them.

The default suits tiny folders on purpose: in a 10-image DreamBooth folder a single bad image is
10% > 5%, so the run stops before step 1 and names the file; ``--max_bad_image_fraction 0.2``
trains on the other 9. A subject seen in 9 photos instead of the 10 the user chose is a
different run, which is why it needs asking for.

Results are remembered in ``<output_dir>/.twindiff/image-check.json`` (absolute path -> size,
mtime_ns, ok/reason), so a restart decodes only new or changed files. Only good results are
trusted: an unreadable file is decoded again next time (there are few, and a file repaired in
place with its old timestamp is then noticed). A missing, damaged or unwritable cache only means
checking again; it never fails a run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from shared.data.records import LocalImages, LocalImageSource
from shared.diffusers_format import atomic_write_text
from shared.errors import DataError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

CACHE_FILE = os.path.join(".twindiff", "image-check.json")
CACHE_VERSION = 1
PROGRESS_MIN_IMAGES = 256  # a bar for more images than this; small folders check in a blink
_LISTED = 20  # files named in one message; the rest are counted
_CHUNK_PER_WORKER = 64  # paths in flight per thread: bounded memory for million-image folders


def cache_path(output_dir: str | os.PathLike) -> str:
    """Where the image checks of runs writing into `output_dir` are remembered."""
    return os.path.join(os.path.abspath(os.fspath(output_dir)), CACHE_FILE)


def check_image(path: str) -> str | None:
    """Decodes the image at `path`; None when it is readable, else why it is not (one line)."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            # Image.open reads only the header; load() decodes, so a truncated file raises here.
            img.load()
            if img.width == 0 or img.height == 0:
                return f"zero-size image ({img.width}x{img.height})"
    except MemoryError:
        raise
    except UnidentifiedImageError:
        return "not an image file PIL can identify (corrupt, or not an image)"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


@dataclasses.dataclass(frozen=True)
class ImageChecks:
    """What `check_images` found.

    Attributes:
      bad: absolute path -> why it cannot be read, for the unreadable files only.
      checked: how many files were checked.
      decoded: how many of them were decoded this time.
      cached: how many a past check vouched for, unchanged since (not decoded again).
    """

    bad: dict[str, str]
    checked: int
    decoded: int
    cached: int


class _Cache:
    """The JSON file of past checks; every failure to read or write it is one warning at most."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        self._warned = False
        if path is not None:
            self._load(path)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("%s; images are checked again (this costs time, nothing else)", message)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self._warn(f"cannot read the image-check cache {path} ({type(e).__name__}: {e})")
            return
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            self._warn(f"the image-check cache {path} is damaged")
            return
        if data.get("version") == CACHE_VERSION:  # another version: checked by other rules
            self.entries = {k: v for k, v in files.items() if isinstance(v, dict)}

    def known_good(self, path: str, stat: os.stat_result) -> bool:
        entry = self.entries.get(path)
        return (
            entry is not None
            and entry.get("ok") is True
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        )

    def record(self, path: str, stat: os.stat_result, reason: str | None) -> None:
        self.entries[path] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "ok": reason is None,
            "reason": reason,
        }
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        # Files deleted since are forgotten, so the cache does not grow with every folder tried.
        rows = [
            f"{json.dumps(path)}: {json.dumps(entry)}"
            for path, entry in sorted(self.entries.items())
            if os.path.exists(path)
        ]
        # One file per line: still JSON, and `grep` finds why a file was left out.
        text = f'{{"version": {CACHE_VERSION}, "files": {{\n' + ",\n".join(rows) + "\n}}\n"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write_text(self.path, text)
        except OSError as e:
            self._warn(f"cannot write the image-check cache {self.path} ({e})")


def _chunks(items: Sequence[_T], size: int) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_images(
    paths: Sequence[str],
    *,
    cache_file: str | None = None,
    workers: int | None = None,
    label: str = "checking images",
) -> ImageChecks:
    """Decodes every image of `paths` that the cache does not already vouch for.

    Args:
      paths: absolute image paths.
      cache_file: the JSON cache (`cache_path`); None checks everything and remembers nothing.
      workers: decoding threads; None uses ``os.cpu_count()``.
      label: the progress bar's text, shown for more than `PROGRESS_MIN_IMAGES` images to decode.

    Returns:
      The unreadable files with their reasons, and how many files were decoded.
    """
    cache = _Cache(cache_file)
    unique = list(dict.fromkeys(paths))
    bad: dict[str, str] = {}
    todo: list[tuple[str, os.stat_result]] = []
    cached = 0
    for path in unique:
        try:
            stat = os.stat(path)
        except OSError as e:  # vanished or unreadable folder entry: not cached, nothing to key on
            bad[path] = f"cannot read the file ({e.strerror or e})"
            continue
        if cache.known_good(path, stat):
            cached += 1
        else:
            todo.append((path, stat))
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(todo), desc=label, unit="img") if len(todo) > PROGRESS_MIN_IMAGES else None
    try:
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(workers, len(todo) or 1)
        ) as pool:
            for chunk in _chunks(todo, workers * _CHUNK_PER_WORKER):
                reasons = pool.map(check_image, [path for path, _ in chunk])
                for (path, stat), reason in zip(chunk, reasons, strict=True):
                    cache.record(path, stat, reason)
                    if reason is not None:
                        bad[path] = reason
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
        cache.save()  # also after Ctrl-C: what was checked need not be checked again
    return ImageChecks(bad=bad, checked=len(unique), decoded=len(todo), cached=cached)


def _listing(paths: Sequence[str], bad: dict[str, str]) -> str:
    lines = [f"  {path}: {bad[path]}" for path in paths[:_LISTED]]
    if len(paths) > _LISTED:
        lines.append(f"  ... and {len(paths) - _LISTED:,} more")
    return "\n".join(lines)


def fraction_needed(n_bad: int, total: int) -> float | None:
    """The smallest short ``--max_bad_image_fraction`` that tolerates `n_bad` of `total` bad.

    None when no valid fraction (below 1) does, i.e. every image is bad.
    """
    for digits in range(2, 7):
        scale = 10**digits
        fraction = math.ceil(n_bad * scale / total) / scale
        if fraction < 1 and n_bad <= fraction * total:
            return fraction
    return None


def _too_many_error(
    group: LocalImages, group_bad: list[str], bad: dict[str, str], limit: float
) -> DataError:
    total, n_bad = len(group.paths), len(group_bad)
    where = f"{group.folder} ({group.flag})"
    if n_bad == total:
        summary = f"none of the {total:,} images in {where} can be read; fix or replace them"
    else:
        needed = fraction_needed(n_bad, total)
        raise_it = (
            f"pass --max_bad_image_fraction {needed:g}"
            if needed is not None
            else "raise --max_bad_image_fraction"
        )
        summary = (
            f"{n_bad:,} of the {total:,} images in {where} cannot be read ({n_bad / total:.1%}), "
            f"more than --max_bad_image_fraction={limit:g} allows; fix or remove them, or "
            f"{raise_it} to train on the other {total - n_bad:,}"
        )
    return DataError(f"{summary}:\n{_listing(group_bad, bad)}")


def verify_source(
    source: LocalImageSource,
    *,
    max_bad_fraction: float,
    cache_file: str | None = None,
    workers: int | None = None,
) -> LocalImageSource:
    """`source` with its unreadable images left out, after decoding each of them once.

    Args:
      source: an image-folder or DreamBooth source (anything with ``local_images``/``without``).
      max_bad_fraction: ``--max_bad_image_fraction``: the share of a folder's images that may be
        unreadable and left out.
      cache_file: the JSON cache of past checks (`cache_path`); None remembers nothing.
      workers: decoding threads; None uses ``os.cpu_count()``.

    Returns:
      `source` itself when every image reads, else ``source.without(unreadable)``.

    Raises:
      DataError: a folder has more unreadable images than `max_bad_fraction` allows; the first
        line says how many, where and which flag to raise, the next lines list the files.
    """
    groups = [group for group in source.local_images() if group.paths]
    paths = [path for group in groups for path in group.paths]
    if not paths:
        return source
    checks = check_images(paths, cache_file=cache_file, workers=workers)
    logger.info(
        "checked %d images of %s: %d decoded, %d known from earlier runs, %d unreadable",
        checks.checked,
        ", ".join(group.folder for group in groups),
        checks.decoded,
        checks.cached,
        len(checks.bad),
    )
    if not checks.bad:
        return source
    for group in groups:
        group_bad = [path for path in dict.fromkeys(group.paths) if path in checks.bad]
        if len(group_bad) > max_bad_fraction * len(group.paths):
            raise _too_many_error(group, group_bad, checks.bad, max_bad_fraction)
    listed = list(dict.fromkeys(path for path in paths if path in checks.bad))
    logger.warning(
        "leaving out %d unreadable image%s (within --max_bad_image_fraction=%g):\n%s",
        len(listed),
        "s" if len(listed) > 1 else "",
        max_bad_fraction,
        _listing(listed, checks.bad),
    )
    return source.without(listed)
