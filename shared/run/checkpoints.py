"""The checkpoint folder, one format for both backends: layout, manifest, commit, resume, pruning.

    output_dir/checkpoint-<step>/
      ...                     the backend's state files (torch: unet/, optimizer.pt, rng_<rank>.pt;
                              flax: an orbax folder), written by the trainer's `write_main`
      data_<rank>.json        the loader position {"epoch", "position"} of each process
      trainer_state.json      {"global_step": int, ..., "finite": true}
      config.yaml             the resolved config
      manifest.json           written last: every other file with its size, a crc32 for files up
                              to CHECKSUM_MAX_BYTES, and the total bytes

Every process writes into `checkpoint-<step>.tmp/`; the main process then writes the manifest,
fsyncs every file and folder, and renames the folder into place (a rename is atomic on one
filesystem) before it fsyncs `output_dir`. A killed save leaves a `.tmp` folder that is never read
and that `remove_stale` clears at the next start. `--resume_from_checkpoint latest` checks each
candidate against its manifest and skips damaged ones; pruning never removes the newest intact
checkpoint. Folders written before manifests existed are accepted, unverified.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shared.errors import CheckpointError, ConfigError, TrainingError
from shared.run.manifest import (
    MANIFEST,
    check_manifest,
    fsync_path,
    fsync_tree,
    read_manifest,
    tree_bytes,
    write_durable,
    write_manifest,
)
from shared.run.process import ProcessGroup

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
CHECKSUM_MAX_BYTES = 64 * 1024 * 1024
"""Files up to this size get a crc32 in the manifest; larger ones (weights, optimizer moments) are
checked by size only, so that finding `latest` does not read gigabytes."""

_STALE_PATTERN = re.compile(r"^(checkpoint-\d+)(\.tmp|\.old)$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder `save` commits for `step`: `output_dir/checkpoint-<step>`."""
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints of `output_dir` (with a trainer_state.json), oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def is_verified(path: str | os.PathLike) -> bool:
    """Whether the checkpoint has a manifest to check against (False for pre-manifest folders)."""
    return (Path(path) / MANIFEST).is_file()


def verify(path: str | os.PathLike) -> list[str]:
    """What is wrong with the checkpoint at `path`, checked against its manifest.

    Args:
      path: a checkpoint folder.

    Returns:
      One sentence per problem (a missing file, a size or checksum that differs from the manifest,
      an unreadable manifest or trainer state); empty when intact. A folder without a manifest
      (written before manifests existed) returns an empty list: `is_verified` tells it apart.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    problems = []
    if not (path / TRAINER_STATE).is_file():
        problems.append(f"{TRAINER_STATE} is missing")
    if (path / MANIFEST).exists():
        problems.extend(check_manifest(path))
    if (path / TRAINER_STATE).is_file():
        try:
            _parse_trainer_state(path / TRAINER_STATE)
        except ValueError as exc:
            problems.append(f"{TRAINER_STATE} is unreadable ({exc})")
    return list(dict.fromkeys(problems))  # a missing trainer state is found twice


def find_resume(output_dir: str | os.PathLike, wanted: str | None) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names, or None for a fresh start.

    Args:
      output_dir: `--output_dir`.
      wanted: None, "latest", a `checkpoint-<step>` name inside `output_dir`, or a folder path.

    Returns:
      The checkpoint folder to resume from; None when `wanted` is None, or "latest" finds no
      checkpoint yet (a fresh start, as diffusers does).

    Raises:
      ConfigError: a named checkpoint does not exist.
      CheckpointError: the named checkpoint is damaged, or every checkpoint is.
    """
    if wanted is None:
        return None
    output_dir = Path(output_dir)
    if wanted == "latest":
        return _find_latest(output_dir)
    path = Path(wanted)
    candidates = [path] if path.is_absolute() else [output_dir / path, path]
    for candidate in candidates:
        # A manifest without trainer_state.json is a damaged checkpoint, not a missing one.
        if (candidate / TRAINER_STATE).is_file() or (candidate / MANIFEST).is_file():
            problems = verify(candidate)
            if problems:
                raise CheckpointError(
                    f"--resume_from_checkpoint {wanted}: {candidate} is damaged "
                    f"({_summary(problems)}); resume from 'latest' or an older checkpoint-<step> "
                    f"in {output_dir}"
                )
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise ConfigError(
        f"--resume_from_checkpoint {wanted}: no complete checkpoint at {tried} (a checkpoint "
        "folder holds trainer_state.json); pass 'latest', a checkpoint-<step> name inside "
        "--output_dir, or a checkpoint folder path"
    )


def remove_stale(output_dir: str | os.PathLike) -> list[Path]:
    """Clears what a killed save left in `output_dir`; the main process calls it at start.

    `checkpoint-<step>.tmp` folders (a save that never committed) are deleted. A
    `checkpoint-<step>.old` folder is the previous copy of a step being saved again: it is deleted
    when `checkpoint-<step>` exists, and renamed back to it when the kill came between the two
    renames, so that the committed copy is never lost.

    Returns:
      The folders deleted.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        match = _STALE_PATTERN.match(child.name)
        if not match or not child.is_dir():
            continue
        final = root / match.group(1)
        if match.group(2) == OLD_SUFFIX and not final.exists():
            os.replace(child, final)
            fsync_path(root)
            logger.warning(
                "restored %s from %s (a save of that step was interrupted)", final, child
            )
            continue
        shutil.rmtree(child)
        logger.info("removed %s, left by an interrupted save", child)
        removed.append(child)
    return removed


def save(
    output_dir: str | os.PathLike,
    step: int,
    *,
    group: ProcessGroup,
    write_main: Callable[[Path], None],
    write_each: Callable[[Path, int], None] | None = None,
    trainer_state: Mapping[str, Any],
    config_text: str,
    loader_state: Mapping[str, int],
    limit: int | None,
    finite: bool = True,
) -> Path:
    """Writes and commits `checkpoint-<step>`; every process calls it.

    Args:
      output_dir: `--output_dir`.
      step: the global step; names the folder.
      group: this process among the run's processes.
      write_main: the main process's writer of the backend's state files into the folder it gets.
      write_each: a writer every process calls with the folder and its rank (per-process state
        such as rng), or None.
      trainer_state: saved as trainer_state.json (its "global_step", when given, must be `step`).
      config_text: the resolved config, saved as config.yaml.
      loader_state: this process's loader position, {"epoch", "position"}.
      limit: `--checkpoints_total_limit`: older checkpoints beyond it are pruned after the commit.
      finite: whether the weights are finite; False refuses to write anything.

    Returns:
      The committed checkpoint folder.

    Raises:
      TrainingError: `finite` is False.
      CheckpointError: the disk is full (the partial folder is removed, the previous checkpoint
        stays loadable), or another process failed to write its part.
      OSError: this process failed to write for another reason (after the same cleanup).
    """
    output_dir = Path(output_dir)
    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if not finite:
        last = newest_intact(output_dir)
        fix = (
            f"last good checkpoint: {last}; resume from it with a lower --learning_rate or "
            "--max_grad_norm"
            if last
            else "no good checkpoint yet; start again with a lower --learning_rate or --max_grad_norm"
        )
        raise TrainingError(f"weights are not finite at step {step}: no checkpoint written; {fix}")
    state = {"global_step": step, **trainer_state, "finite": True}
    if state["global_step"] != step:
        raise ValueError(f"trainer_state global_step {state['global_step']} != step {step}")
    existed = output_dir.is_dir()

    error = None
    if group.is_main:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # a save of this step that died before its commit
            tmp.mkdir(parents=True)
        except Exception as exc:
            error = exc
    # all_true is also the barrier: nobody writes into tmp before it exists.
    _agree(group, error, output_dir=output_dir, final=final, tmp=tmp)

    error = None
    try:
        if group.is_main:
            write_main(tmp)
        if write_each is not None:
            write_each(tmp, group.index)
        position = {key: int(value) for key, value in loader_state.items()}
        write_durable(tmp / f"data_{group.index}.json", json.dumps(position) + "\n")
    except Exception as exc:
        error = exc
    _agree(group, error, output_dir=output_dir, final=final, tmp=tmp)

    error = None
    if group.is_main:
        try:
            write_durable(tmp / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
            write_durable(tmp / CONFIG, config_text)
            write_manifest(tmp, checksum_max_bytes=CHECKSUM_MAX_BYTES, extra={"global_step": step})
            fsync_tree(tmp)
            _commit(tmp, final)
            if not existed:
                fsync_path(output_dir.parent)
        except Exception as exc:
            error = exc
        else:
            logger.info("saved %s", final)
            try:
                prune(output_dir, limit)
            except OSError as exc:  # the checkpoint is committed; pruning can wait for the next one
                logger.warning("--checkpoints_total_limit: pruning %s failed (%s)", output_dir, exc)
    _agree(group, error, output_dir=output_dir, final=final, tmp=tmp)
    return final


def prune(output_dir: str | os.PathLike, limit: int | None) -> list[Path]:
    """Deletes the oldest committed checkpoints beyond `limit`, never the newest intact one.

    A damaged newest checkpoint (or a few) therefore never pushes out the last good one.

    Returns:
      The folders deleted.
    """
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    excess = found[: max(0, len(found) - limit)]
    keep = newest_intact(output_dir) if excess else None
    removed = []
    for old in excess:
        if old == keep:
            logger.warning(
                "--checkpoints_total_limit %d: keeping %s, the newest intact checkpoint", limit, old
            )
            continue
        logger.info("--checkpoints_total_limit %d: removing %s", limit, old)
        try:
            shutil.rmtree(old)
        except OSError as exc:
            # The new checkpoint is committed; a folder that will not go is not worth losing it.
            logger.warning("could not remove %s (%s); delete it by hand", old, exc)
            continue
        removed.append(old)
    return removed


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer_state.json of the checkpoint at `path`.

    Raises:
      CheckpointError: the file is missing or unreadable.
    """
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint folder")
    try:
        return _parse_trainer_state(file)
    except ValueError as exc:
        raise CheckpointError(
            f"{file} is unreadable ({exc}); resume from 'latest' or an older checkpoint-<step>"
        ) from None


def read_loader_state(path: str | os.PathLike, rank: int) -> dict[str, int]:
    """The loader position {"epoch", "position"} process `rank` saved in the checkpoint at `path`.

    Raises:
      CheckpointError: the file is missing (the checkpoint was written by a different number of
        processes) or unreadable.
    """
    path = Path(path)
    file = path / f"data_{rank}.json"
    if not file.is_file():
        written = len(list(path.glob("data_*.json")))
        raise CheckpointError(
            f"{file} is missing: {path} was written by {written} process(es), not one with rank "
            f"{rank}; resume with the process count it was saved with"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return {"epoch": int(data["epoch"]), "position": int(data["position"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{file} is unreadable ({exc!r}); resume from 'latest' or an older checkpoint-<step>"
        ) from None


# --- discovery ---


def _find_latest(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    if not found:
        logger.warning(
            "--resume_from_checkpoint latest: no checkpoint in %s yet; starting fresh", output_dir
        )
        return None
    damaged = []
    for path in reversed(found):
        problems = verify(path)
        if not problems:
            if not is_verified(path):
                logger.info("resuming from %s, written without a manifest (not verified)", path)
            return path
        logger.warning(
            "--resume_from_checkpoint latest: skipping damaged %s: %s",
            path.name,
            _summary(problems),
        )
        damaged.append(f"{path.name}: {problems[0]}")
    raise CheckpointError(
        f"--resume_from_checkpoint latest: every checkpoint in {output_dir} is damaged "
        f"({'; '.join(damaged)}); start fresh without --resume_from_checkpoint, or pass another "
        "--output_dir"
    )


def newest_intact(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of `output_dir` that passes `verify` (the last good one), or None."""
    for path in reversed(list_checkpoints(output_dir)):
        if not verify(path):
            return path
    return None


def _summary(problems: list[str]) -> str:
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _parse_trainer_state(file: Path) -> dict[str, Any]:
    state = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError("no integer global_step")
    return state


# --- the commit, and agreeing across processes ---


def _commit(tmp: Path, final: Path) -> None:
    stale = None
    if final.exists():
        # A resumed run saving a step again: the new copy replaces it, and the old one is deleted
        # only once the new one is in place (`remove_stale` restores it if a kill comes between).
        stale = final.with_name(final.name + OLD_SUFFIX)
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
    try:
        os.replace(tmp, final)
    except OSError:
        if stale is not None and not final.exists():
            os.replace(stale, final)
        raise
    fsync_path(final.parent)
    if stale is not None:
        shutil.rmtree(stale)


def _agree(
    group: ProcessGroup,
    error: BaseException | None,
    *,
    output_dir: Path,
    final: Path,
    tmp: Path,
) -> None:
    """Every process learns whether all of them succeeded; on failure all raise, tmp removed."""
    disk_full = _disk_full_errno(error) if error is not None else None
    # Measured before the main process removes tmp: the fallback estimate of the space needed.
    written = tree_bytes(tmp) if disk_full is not None else 0
    if group.all_true(error is None):
        return
    if group.is_main and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    latest = newest_intact(output_dir)
    still = f"{latest.name} is still the latest checkpoint" if latest else "no checkpoint is saved"
    if error is None:
        raise CheckpointError(
            f"{final} was not written: another process failed while writing its part (its own "
            f"error says why); {still}"
        )
    if disk_full is not None:
        message = _disk_full_message(output_dir, final, written, disk_full, still)
        raise CheckpointError(message) from error
    raise error


def _disk_full_errno(error: BaseException) -> int | None:
    """ENOSPC/EDQUOT anywhere in the exception chain, or in the message of a wrapping error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current.errno
        # Writers such as safetensors report an OS error only as text.
        for code in _DISK_FULL:
            if os.strerror(code) in str(current):
                return code
        current = current.__cause__ or current.__context__
    return None


def _disk_full_message(output_dir: Path, final: Path, written: int, code: int, still: str) -> str:
    found = list_checkpoints(output_dir)
    previous = _checkpoint_bytes(found[-1]) if found else None
    if previous is not None and previous >= written:
        needed = f"about {_human(previous)} needed (the size of {found[-1].name}), "
    elif written:
        needed = f"at least {_human(written)} needed, "
    else:  # failed before writing anything and nothing to compare with
        needed = ""
    try:
        free = _human(shutil.disk_usage(output_dir).free)
    except OSError:
        free = "unknown"
    what = "the disk quota is exceeded" if code != errno.ENOSPC else "the disk is full"
    return (
        f"{final} was not written: {what} ({needed}{free} free now); free some space, keep "
        f"fewer checkpoints with --checkpoints_total_limit, or pass another --output_dir; {still}"
    )


def _checkpoint_bytes(path: Path) -> int:
    try:
        return int(read_manifest(path)["total_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return tree_bytes(path)


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"
