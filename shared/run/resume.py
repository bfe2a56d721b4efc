"""What a flag changed between a checkpoint and the command that resumes it means.

At resume, the config saved in the checkpoint (`config.yaml`) is compared with the new one. Each
difference either takes effect from the resumed step on, or is refused, because the checkpoint
cannot be continued under it:

- refused: the model (its weights or architecture, the tokenizer, the noise schedule and the
  prediction type), the resolution, the data and the batch layout (which samples the saved
  data position counts, the batch size per device (unless the global batch and the process
  count stay the same: another device count), accumulation, prior preservation, the seed
  that orders the data) and the state layout (trained text encoder, EMA, 8-bit
  optimizer, the dtype of AdamW's moments);
- takes effect: everything else. The learning rate and its schedule are a function of the step
  (`shared.run.lr`), so a new `--learning_rate`, `--lr_scheduler`, warmup or `--max_train_steps`
  gives the new schedule's value at the resumed step; optimizer hyperparameters, EMA settings,
  loss options, validation and checkpoint cadence and logging are read from the new config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from shared import cli
from shared.config import FIELDS, ConfigError, TrainConfig, thaw
from shared.run import checkpoints

logger = logging.getLogger(__name__)

_MODEL = "the checkpoint holds weights of another model"
_DATA = "the checkpoint's data position counts samples of another data stream"
_BATCH = "the checkpoint's data position and optimizer steps count batches of another layout"
_STATE = "the checkpoint's training state has another layout"
_OBJECTIVE = "the model was trained for another objective"

REFUSED: dict[str, str] = {
    **dict.fromkeys(
        (
            "pretrained_model_name_or_path",
            "revision",
            "variant",
            "non_ema_revision",
            "model_config_name_or_path",
            "tokenizer_name",
            "pretrained_vae_name_or_path",
            "unet_config",
            "vae_config",
            "text_encoder_config",
            "scheduler_config",
            "class_labels_conditioning",
        ),
        _MODEL,
    ),
    **dict.fromkeys(("prediction_type", "ddpm_num_steps", "ddpm_beta_schedule"), _OBJECTIVE),
    "resolution": "the model was trained at another resolution (and the data position counts "
    "images of that size)",
    **dict.fromkeys(
        (
            "dataset_name",
            "dataset_config_name",
            "train_data_dir",
            "dataset_split",
            "tfds_data_dir",
            "max_train_samples",
            "instance_data_dir",
            "class_data_dir",
            "num_class_images",
            "seed",
        ),
        _DATA,
    ),
    **dict.fromkeys(
        ("train_batch_size", "gradient_accumulation_steps", "with_prior_preservation"), _BATCH
    ),
    **dict.fromkeys(
        ("train_text_encoder", "use_ema", "use_8bit_adam", "adam_moments_dtype"), _STATE
    ),
}
# Never compared: where the run is resumed from, and values that are not saved.
_IGNORED = ("resume_from_checkpoint", "hub_token", "local_rank", "overwrite_output_dir")


@dataclasses.dataclass(frozen=True)
class Change:
    """One flag that differs between the checkpoint's config and the new one."""

    name: str
    saved: Any
    new: Any
    refused_because: str | None  # None: takes effect from the resumed step

    def describe(self) -> str:
        return f"--{self.name} {_show(self.saved)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    text = repr(thaw(value))
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(saved: TrainConfig, new: TrainConfig) -> list[Change]:
    """Every flag whose value differs, in schema order."""
    changes = []
    for name in FIELDS:
        if name in _IGNORED:
            continue
        old, now = thaw(saved.get(name)), thaw(new.get(name))
        if old != now:
            changes.append(Change(name, old, now, REFUSED.get(name)))
    return changes


def _same_global_batch(
    checkpoint: str | os.PathLike, cfg: TrainConfig, num_devices: int, num_processes: int
) -> bool:
    """Whether the checkpoint's run had this run's global batch and process count.

    Then a new `--train_batch_size` on another device count (8 devices x 1 -> 4 x 2) keeps every
    process's batch, so the saved data positions and steps count the same batches. Known only
    when the checkpoint saved its plan (`trainer_state.json`'s "plan").
    """
    plan = checkpoints.read_trainer_state(checkpoint).get("plan") or {}
    return (
        plan.get("global_batch_size") == cfg.training.train_batch_size * num_devices
        and plan.get("num_processes") == num_processes
    )


def check_resume_config(
    checkpoint: str | os.PathLike,
    cfg: TrainConfig,
    *,
    step: int,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> list:
    """Compares `checkpoint/config.yaml` with `cfg`; logs what takes effect, refuses the rest.

    With `num_devices` and `num_processes` (the resuming run's), a `--train_batch_size` change
    that keeps the saved global batch and process count takes effect (another device count).

    Returns:
      The changes that take effect (empty when the configs agree or the checkpoint has no
      saved config).

    Raises:
      ConfigError: some change cannot apply to this checkpoint; one line naming each flag, its
        saved value and why, and the fix (the saved value, or a new --output_dir to start over).
    """
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return []
    saved = cli.load_saved_config(path)
    if saved.task != cfg.task:
        raise ConfigError(
            f"--resume_from_checkpoint {checkpoint}: it is a {saved.task} checkpoint, not "
            f"{cfg.task}"
        )
    changes = config_changes(saved, cfg)
    if (
        num_devices is not None
        and num_processes is not None
        and any(c.name == "train_batch_size" for c in changes)
        and _same_global_batch(checkpoint, cfg, num_devices, num_processes)
    ):
        changes = [
            dataclasses.replace(c, refused_because=None) if c.name == "train_batch_size" else c
            for c in changes
        ]
    refused = [c for c in changes if c.refused_because]
    if refused:
        reasons = "; ".join(f"{c.describe()} ({c.refused_because})" for c in refused)
        raise ConfigError(
            f"--resume_from_checkpoint {checkpoint}: cannot resume with {reasons}; resume with "
            "the saved values, or start a new run (another --output_dir) from the exported model"
        )
    applied = [c for c in changes if not c.refused_because]
    for change in applied:
        logger.warning("resuming with %s: takes effect from step %d", change.describe(), step + 1)
    return applied
