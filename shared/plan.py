"""Values derived from a config and the data: batch sizes, steps, the scaled learning rate.

They live in `RunPlan`, computed by `plan_run`, and are never written back into the config.
"""

from __future__ import annotations

import dataclasses
import math

from shared.config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Values derived from a config and the data; never written back into the config.

    Attributes:
      num_devices: devices over all processes (data-parallel replicas).
      num_processes: processes (hosts on TPU, one per GPU on torch).
      per_process_batch_size: examples one process loads per micro-batch.
      global_batch_size: examples per micro-batch over all devices.
      effective_batch_size: examples per optimizer update (x gradient accumulation).
      batches_per_epoch: micro-batches per epoch (the remainder of the data is dropped).
      updates_per_epoch: optimizer updates per epoch.
      max_train_steps: total optimizer updates.
      num_train_epochs: epochs, recomputed from max_train_steps when it is given.
      learning_rate: after --scale_lr.
    """

    num_devices: int
    num_processes: int
    per_process_batch_size: int
    global_batch_size: int
    effective_batch_size: int
    batches_per_epoch: int
    updates_per_epoch: int
    max_train_steps: int
    num_train_epochs: int
    learning_rate: float


def plan_run(
    cfg: TrainConfig, *, dataset_size: int, num_devices: int = 1, num_processes: int = 1
) -> RunPlan:
    """Derives batch sizes, steps and the learning rate for `dataset_size` examples."""
    if num_devices < num_processes or num_devices % num_processes:
        raise ConfigError(
            f"{num_devices} devices cannot be split evenly over {num_processes} processes"
        )
    t = cfg.training
    global_batch = t.train_batch_size * num_devices
    batches_per_epoch = dataset_size // global_batch
    if batches_per_epoch == 0:
        raise ConfigError(
            f"the dataset has {dataset_size} examples, fewer than one global batch "
            f"({t.train_batch_size} per device x {num_devices} devices = {global_batch}); "
            "lower --train_batch_size or add data"
        )
    updates_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    if t.max_train_steps is None:
        max_steps, epochs = t.num_train_epochs * updates_per_epoch, t.num_train_epochs
    else:
        max_steps, epochs = t.max_train_steps, math.ceil(t.max_train_steps / updates_per_epoch)
    effective = global_batch * t.gradient_accumulation_steps
    lr = cfg.optim.learning_rate * (effective if cfg.optim.scale_lr else 1)
    return RunPlan(
        num_devices=num_devices,
        num_processes=num_processes,
        per_process_batch_size=global_batch // num_processes,
        global_batch_size=global_batch,
        effective_batch_size=effective,
        batches_per_epoch=batches_per_epoch,
        updates_per_epoch=updates_per_epoch,
        max_train_steps=max_steps,
        num_train_epochs=epochs,
        learning_rate=lr,
    )
