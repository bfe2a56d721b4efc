"""What a run prints and writes about itself: the logging setup, the tracker config, the summary.

One logging setup serves every entry point (`twindiff`, `python -m flaxdiff.<task>`,
`python -m torchdiff.<task>`): INFO on the main process, warnings only on the others, and
`TWINDIFF_LOG_LEVEL` overrides both. It replaces the handler an earlier call installed (the
launcher calls it before the trainer does), so the trainer's INFO lines are never dropped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from shared import cli
from shared.config import TrainConfig
from shared.diffusers_format import atomic_write_text

logger = logging.getLogger(__name__)

LEVEL_ENV = "TWINDIFF_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SUMMARY = "train_summary.json"
# Config entries that are not scalars a tracker can show, or that must never leave the machine.
_NOT_TRACKED = ("hub_token", "unet_config", "vae_config", "text_encoder_config", "scheduler_config")


class _TwindiffHandler(logging.StreamHandler):
    """Writes through tqdm, so a log line never lands in the middle of a progress bar; marks the
    handler this module installed, so a second setup replaces it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.Handler.emit: a broken stream must not kill the run
            self.handleError(record)


def _ours_or_a_library_default(handler: logging.Handler) -> bool:
    """Our handler, or the bare stderr handler of a `logging.basicConfig()` that a library ran
    at import (orbax does): replacing it keeps one format and keeps lines out of progress bars."""
    if isinstance(handler, _TwindiffHandler):
        return True
    fmt = getattr(handler.formatter, "_fmt", None)
    return (
        type(handler) is logging.StreamHandler
        and handler.stream is sys.stderr
        and fmt in (None, logging.BASIC_FORMAT)
    )


def setup_logging(*, is_main: bool = True, default: str | int | None = None) -> None:
    """Configures the root logger for a run.

    Args:
      is_main: the main process logs INFO; the others WARNING.
      default: the level to use instead of that (the launcher's quiet default), unless
        `TWINDIFF_LOG_LEVEL` is set.
    """
    level = os.environ.get(LEVEL_ENV) or default or (logging.INFO if is_main else logging.WARNING)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _ours_or_a_library_default(h)]:
        root.removeHandler(handler)
    if not root.handlers:  # a notebook or caller that configured logging keeps its handlers
        handler = _TwindiffHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The flat config for trackers: scalars only (TensorBoard hparams), no secrets."""
    flat: dict[str, Any] = {}
    for section, values in cli.to_dict(cfg).items():
        items = values.items() if isinstance(values, dict) else [(section, values)]
        for name, value in items:
            if name in _NOT_TRACKED:
                continue
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def peak_rss_bytes() -> int:
    """The peak resident set size of this process (Python, libraries and host arrays included):
    the peak-memory figure of a run on a CPU."""
    import resource  # POSIX only: imported here so that importing this module never needs it

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # KiB on Linux, bytes on macOS


def write_summary(
    output_dir: str | os.PathLike,
    *,
    steps: int,
    step_times: Sequence[float],
    peak_memory_bytes: int | None,
    device: str,
    skipped_steps: int = 0,
    losses: Sequence[float] = (),
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes `train_summary.json`: steps, the mean step time (the first step, with its warm-up
    or compile, left out), peak memory, the device and the skipped non-finite steps.

    Args:
      steps: the run's total optimizer steps.
      step_times: seconds of each update of this process's run (checkpoints etc. excluded).
      peak_memory_bytes: the backend's peak memory figure (device memory on accelerators, the
        process's peak RSS on a CPU).
      losses: the training loss of each update of this run, in order (the loss curve that
        `twindiff.train` returns; the first is that of update ``steps - len(losses) + 1``).
    """
    timed = list(step_times[1:] or step_times)
    summary = {
        "steps": steps,
        "steps_this_run": len(step_times),
        "mean_step_seconds": sum(timed) / len(timed) if timed else None,
        "first_step_seconds": step_times[0] if step_times else None,
        "peak_memory_bytes": peak_memory_bytes,
        "device": device,
        "skipped_steps": skipped_steps,
        **(extra or {}),
        "losses": [float(x) for x in losses],
    }
    path = Path(output_dir) / SUMMARY
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    logger.info("summary: %s", summary)
    return path
