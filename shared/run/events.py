"""Which optimizer update writes a checkpoint, validates or exports: one rule for both trainers.

Steps count optimizer updates (1-based after the update). One update takes
`--gradient_accumulation_steps` micro-batches from the loader's endless stream, so an epoch can
end in the middle of an update; the epoch events of epoch e (0-based) fire after the update in
which the loader finishes it, when (e + 1) is a multiple of the interval:

- checkpoint: `step % --checkpointing_steps == 0` (and on a stop request, see `shared.run.signals`);
- validation: every `--validation_steps` updates when set, else every N epochs by the task's epoch
  flag (`--validation_epochs`; unconditional: `--save_images_epochs`);
- export during training: unconditional only, every `--save_model_epochs` epochs.

The final export and a final validation always run after the last update.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

from shared.config import TrainConfig
from shared.run.task import task_spec

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Events:
    """What to do after one update."""

    checkpoint: bool = False
    validate: bool = False
    export: bool = False
    finished_epochs: tuple[int, ...] = ()  # 0-based epochs the loader finished in this update


def due(interval: int | None, counts: Iterable[int]) -> bool:
    """True when some count is a positive multiple of `interval` (never for None or 0)."""
    return bool(interval) and any(c > 0 and c % interval == 0 for c in counts)


def epoch_interval(cfg: TrainConfig) -> int | None:
    """The epoch interval of validation images: the task's epoch flag, unless steps are set."""
    if cfg.task != "unconditional" and cfg.validation.validation_steps is not None:
        return None
    return cfg.get(task_spec(cfg).epoch_images_flag)


def after_update(cfg: TrainConfig, *, step: int, epoch_before: int, epoch_after: int) -> Events:
    """The events due after update `step`, which moved the loader from `epoch_before` to
    `epoch_after` (its `state()["epoch"]` before and after the update's micro-batches).

    Args:
      cfg: the run config (read anew at every call, so a changed cadence on resume applies).
      step: the number of updates done, this one included.
      epoch_before, epoch_after: the loader's epoch before and after this update.
    """
    finished = tuple(range(epoch_before, epoch_after))
    epoch_counts = [e + 1 for e in finished]
    steps_interval = cfg.validation.validation_steps if cfg.task != "unconditional" else None
    validate = due(steps_interval, [step]) or due(epoch_interval(cfg), epoch_counts)
    return Events(
        checkpoint=due(cfg.checkpoint.checkpointing_steps, [step]),
        validate=validate,
        export=due(task_spec(cfg).export_epochs, epoch_counts),
        finished_epochs=finished,
    )


@dataclasses.dataclass(frozen=True)
class Handlers:
    """What a trainer does for each event; `shared` decides when and in which order."""

    checkpoint: Callable[[], object]
    validate: Callable[[], object]
    export: Callable[[str], object]  # the Hub commit message of an export during training
    stop_requested: Callable[[], str | None]  # the signal's name once any process got one


def handle(due: Events, handlers: Handlers, *, step: int) -> bool:
    """Runs the events due after update `step`, in one order for both backends: checkpoint,
    validation, export, then a stop request (a checkpoint of this step, unless it has one).

    Returns:
      True when a stop signal ends the run here (the caller exits 0 after its cleanup).
    """
    if due.checkpoint:
        handlers.checkpoint()
    if due.validate:
        handlers.validate()
    if due.export:
        handlers.export(f"Epoch {due.finished_epochs[-1]}")
    stopped = handlers.stop_requested()
    if stopped is None:
        return False
    if not due.checkpoint:
        handlers.checkpoint()
    logger.warning(
        "stopped by %s at step %d; resume with --resume_from_checkpoint latest", stopped, step
    )
    return True


def after_step(
    cfg: TrainConfig, handlers: Handlers, *, step: int, epoch_before: int, epoch_after: int
) -> bool:
    """`after_update` then `handle`: what both training loops call after each update.

    Returns:
      True when a stop signal ends the run here.
    """
    due = after_update(cfg, step=step, epoch_before=epoch_before, epoch_after=epoch_after)
    return handle(due, handlers, step=step)
