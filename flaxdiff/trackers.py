"""The flax trainer's trackers: TensorBoard event files (tensorboardX, no TensorFlow) and wandb.

TensorBoard events go to ``<output_dir>/<logging_dir>/<tracker_project_name>``, the folder
torchdiff's Accelerate TensorBoard tracker writes to, so ``tensorboard --logdir
<output_dir>/logs`` shows the runs of both backends the same way: scalars under the metric names,
validation images under their tag (NHWC). The run config (`report.tracker_config`) is written once
as a markdown table under the text tag ``config``, not with ``add_hparams``, which would start a
second run folder beside the first. wandb is imported only when asked for; ``--report_to all``
means every tracker installed, as in Accelerate: TensorBoard, and wandb when it imports. Only the
main process writes; elsewhere every method does nothing.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from shared.config import TrainConfig
from shared.errors import ConfigError
from shared.run import report

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

logger = logging.getLogger(__name__)

SUPPORTED = ("tensorboard", "wandb", "all", "none")


def _import_wandb(report_to: str, *, required: bool) -> ModuleType | None:
    """The wandb module; None when it is missing and not `required`."""
    try:
        return importlib.import_module("wandb")
    except ImportError as err:
        if not required:
            return None
        raise ConfigError(
            f"--report_to {report_to} needs wandb: pip install wandb (or --report_to tensorboard)"
        ) from err


def _markdown_table(config: dict[str, Any]) -> str:
    rows = [f"| {name} | {value} |" for name, value in config.items()]
    return "\n".join(["| option | value |", "| --- | --- |", *rows])


class Trackers:
    """The run's TensorBoard writer and wandb run, either or both absent; a context manager."""

    def __init__(
        self,
        *,
        writer: SummaryWriter | None = None,
        wandb: ModuleType | None = None,
        wandb_run: Any | None = None,
    ) -> None:
        """Takes the open TensorBoard writer, and the wandb module with its run (both or neither)."""
        self.writer = writer
        self.wandb = wandb
        self.wandb_run = wandb_run

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, is_main: bool) -> Trackers:
        """Opens the trackers of ``--report_to`` and logs the run config to each.

        Every process checks the flag (and that wandb imports), so all fail together before
        training; only the main process opens anything.

        Raises:
          ConfigError: ``comet_ml``, which the flax backend lacks, or wandb asked for and missing.
        """
        report_to = cfg.logging.report_to
        if report_to not in SUPPORTED:
            raise ConfigError(
                f"--report_to {report_to} is not supported by the flax backend: use "
                "--report_to tensorboard, wandb, all or none"
            )
        wandb = None
        if report_to in ("wandb", "all"):
            wandb = _import_wandb(report_to, required=report_to == "wandb")
        if not is_main or report_to == "none":
            return cls()
        output_dir = Path(cfg.checkpoint.output_dir)
        project = cfg.logging.tracker_project_name
        config = report.tracker_config(cfg)
        writer = wandb_run = None
        if report_to in ("tensorboard", "all"):
            from tensorboardX import SummaryWriter

            logdir = output_dir / cfg.logging.logging_dir / project
            writer = SummaryWriter(str(logdir))
            writer.add_text("config", _markdown_table(config), 0)
            writer.flush()
            logger.info("TensorBoard events: %s", logdir)
        if wandb is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            wandb_run = wandb.init(project=project, config=config, dir=str(output_dir))
        return cls(writer=writer, wandb=wandb, wandb_run=wandb_run)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Logs scalars (Python or NumPy/JAX scalars) at optimizer step `step`."""
        values = {name: float(value) for name, value in metrics.items()}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        """Logs a batch of images, floats in [0, 1] of shape (N, H, W, 3), under `tag`."""
        images = np.asarray(images)
        if self.writer is not None:
            self.writer.add_images(tag, images, step, dataformats="NHWC")
            self.writer.flush()
        if self.wandb_run is not None and self.wandb is not None:
            self.wandb_run.log({tag: [self.wandb.Image(image) for image in images]}, step=step)

    def close(self) -> None:
        """Flushes and closes the writer and finishes the wandb run; safe to call twice."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
