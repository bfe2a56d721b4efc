"""A folder's manifest and durable writes: what `shared.run.checkpoints` builds its commit on.

`manifest.json` lists every other file of a folder (relative posix path) with its size, a crc32
(zlib, hex) for files up to a size limit, and the total bytes. Checking a folder against it finds a
truncated file by its size and a flipped bit in a small file by its checksum, without reading the
large weight files.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_READ_CHUNK = 1 << 20


def crc32(file: Path) -> str:
    """The zlib crc32 of `file`'s bytes as 8 hex digits."""
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def list_files(folder: Path) -> list[tuple[str, Path]]:
    """Every file under `folder` as (relative posix path, path), sorted, the manifest left out."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            file = Path(dirpath) / name
            relative = file.relative_to(folder).as_posix()
            if relative != MANIFEST:
                found.append((relative, file))
    return sorted(found)


def tree_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 when it does not exist); vanished files count 0."""
    total = 0
    for _, file in list_files(folder) if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            total += file.stat().st_size
    return total


def write_manifest(
    folder: Path, *, checksum_max_bytes: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Writes `folder/manifest.json` (durably) describing every other file; returns it.

    Args:
      folder: the folder to describe.
      checksum_max_bytes: files up to this size get a crc32; larger ones only their size.
      extra: further top-level entries (e.g. the global step).
    """
    files = {}
    for relative, file in list_files(folder):
        size = file.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= checksum_max_bytes:
            entry["crc32"] = crc32(file)
        files[relative] = entry
    manifest = {
        "format": MANIFEST_FORMAT,
        **(extra or {}),
        "total_bytes": sum(entry["size"] for entry in files.values()),
        "files": files,
    }
    write_durable(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of `folder`, its structure checked.

    Raises:
      OSError: it cannot be read.
      ValueError: it is not JSON, or not a manifest (no files table, an entry without an integer
        size, a path outside the folder).
    """
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError("no 'files' table")
    for name, entry in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"it lists a path outside the folder, {name}")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise ValueError(f"the entry of {name} has no integer size")
    return manifest


def check_manifest(folder: Path) -> list[str]:
    """What differs between `folder` and its manifest, one sentence each; empty when it matches.

    Files the manifest does not list are ignored: only what it promises is checked.
    """
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST} is unreadable ({exc})"]
    problems = []
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        size = file.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name} is {size} bytes, the manifest says {entry['size']}")
            continue
        if "crc32" not in entry:
            continue
        try:
            actual = crc32(file)
        except OSError as exc:
            problems.append(f"{name} is unreadable ({exc.strerror or exc})")
            continue
        if actual != entry["crc32"]:
            problems.append(
                f"{name} fails its checksum (crc32 {actual}, the manifest says {entry['crc32']})"
            )
    return problems


def write_durable(file: Path, text: str) -> None:
    """Writes UTF-8 `text` to `file` and fsyncs it before returning."""
    with open(file, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        # Each process makes its own file durable: on a network filesystem another host's fsync
        # of this file would not flush this host's cache.
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsyncs one file or folder (a folder's fsync makes the names in it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsyncs every file and folder under `folder`, and `folder` itself."""
    # Backends write with plain writes; without this a power loss after the commit's rename could
    # leave a committed folder whose files are empty.
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))
