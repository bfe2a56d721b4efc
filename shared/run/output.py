"""The output folder of a run, prepared and checked before anything is trained.

A run never dies halfway over something it could have checked at the start: the folder must be
creatable and writable (a file in its place, a read-only disk or a missing permission is a
`ConfigError` now, not at the first checkpoint), and leftovers of a killed save are removed.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from shared import cli
from shared.config import ConfigError, TrainConfig
from shared.run import checkpoints

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def check_writable(folder: str | os.PathLike, *, flag: str = "--output_dir") -> Path:
    """Creates `folder` if needed and proves it writable; returns it.

    Raises:
      ConfigError: a file stands where the folder should be, or the folder (or a parent)
        cannot be created or written; the message names the folder and the fix.
    """
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(
            f"{flag} {folder}: {blocking} is a file, not a folder; choose another {flag}"
        )
    probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{flag} {folder} is not writable ({err.strerror or err}); fix its permissions or "
            f"choose another {flag}"
        ) from err
    return folder


def prepare_output_dir(cfg: TrainConfig, *, is_main: bool) -> Path:
    """Checks the output folder and, on the main process, clears stale partial checkpoints and
    saves the resolved config (hub token redacted). Every process calls it before setup."""
    output_dir = Path(cfg.checkpoint.output_dir)
    if not is_main:
        return output_dir
    check_writable(output_dir)
    for stale in checkpoints.remove_stale(output_dir):
        logger.info("removed %s, left by an interrupted save", stale)
    cli.save_config(cfg, output_dir / CONFIG_FILE)
    return output_dir
