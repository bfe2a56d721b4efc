"""The non-finite policy: a NaN/inf loss or gradient never reaches the weights.

An update whose loss or gradient norm is not finite is skipped: weights, optimizer moments and
the EMA stay as they were. The step still counts (the LR schedule and the data move on, as in a
GradScaler-skipped fp16 step) and `train/skipped_steps` counts it. After
`--max_nonfinite_steps` consecutive skipped updates the run stops with a `TrainingError` naming
the steps, the learning rate and the last good checkpoint. Checkpoints and exports are refused
for non-finite weights (`shared.run.checkpoints.save(finite=False)`), and pruning never removes
the newest intact checkpoint, so a run that diverges keeps its last good state.

With fp16 mixed precision the GradScaler skips overflowing steps itself and lowers its scale; a
step with a finite loss is left to it and does not count toward the limit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from shared.errors import TrainingError
from shared.run import checkpoints

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class NonFiniteGuard:
    """Counts skipped updates and stops the run after `limit` in a row.

    Attributes:
      limit: `--max_nonfinite_steps`.
      output_dir: where the last good checkpoint is looked for.
      skipped: skipped updates in the whole run (saved in checkpoints).
      streak: consecutive skipped updates up to now (saved in checkpoints).
    """

    limit: int
    output_dir: str
    skipped: int = 0
    streak: int = 0

    def state(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped, "nonfinite_streak": self.streak}

    def restore(self, state: dict) -> None:
        self.skipped = int(state.get("skipped_steps", 0))
        self.streak = int(state.get("nonfinite_streak", 0))

    def record(self, *, step: int, finite: bool, loss: float, grad_norm: float, lr: float) -> None:
        """Notes update `step`'s outcome; raises `TrainingError` when the limit is reached."""
        if finite:
            self.streak = 0
            return
        self.skipped += 1
        self.streak += 1
        logger.warning(
            "step %d: non-finite %s (loss %s, gradient norm %s): update skipped (%d in a row)",
            step,
            "loss" if not math.isfinite(loss) else "gradient",
            loss,
            grad_norm,
            self.streak,
        )
        if self.streak >= self.limit:
            good = checkpoints.newest_intact(Path(self.output_dir))
            first = step - self.streak + 1
            raise TrainingError(
                f"the loss or gradient was not finite at {self.streak} consecutive steps "
                f"({first}-{step}) with learning rate {lr:g}: the run stops (the weights are "
                f"those before step {first}); last good checkpoint: {good or 'none'}; lower "
                "--learning_rate (or check the data), then resume from it with "
                "--resume_from_checkpoint latest, or raise --max_nonfinite_steps"
            )
