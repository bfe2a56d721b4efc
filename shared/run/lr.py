"""The learning rate of every optimizer update: a numpy reference of diffusers' `get_scheduler`.

Both trainers schedule `--learning_rate` with `--lr_scheduler`; torchdiff builds diffusers'
`LambdaLR`, flaxdiff an optax schedule. This module says what either must produce, so both are
tested against one definition. Steps count optimizer updates: step 0 is the first update, and after
`n` completed updates the next one uses the value at step `n` (a torch scheduler after `n` calls of
`scheduler.step()`).

diffusers' schedules, kept as they are (a command line copied from a diffusers script must train
the same way):
- `constant` ignores `--lr_warmup_steps`.
- warmup (every other schedule) ramps linearly from 0: the multiplier at step `s < W` is `s / W`.
- `linear` falls from 1 at the end of warmup to 0 at `--max_train_steps`, and stays 0 beyond.
- `cosine` is a half cosine from 1 to 0; `get_scheduler` never passes `--lr_num_cycles` to it.
- `cosine_with_restarts` runs `--lr_num_cycles` half cosines, each restarting at 1; 0 from the end.
- `polynomial` decays from the base LR to a fixed `lr_end = 1e-7` with exponent `--lr_power`,
  and holds `lr_end` past the end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from shared.errors import ConfigError
from shared.schema import LR_SCHEDULERS, OptimConfig

# diffusers' `get_polynomial_decay_schedule_with_warmup` default; `get_scheduler` never overrides it.
POLYNOMIAL_LR_END = 1e-7
# `get_scheduler` does not pass `num_cycles` to the plain cosine, which keeps this default: one
# half period of the cosine over the decay.
_COSINE_HALF_PERIOD = 0.5


@dataclasses.dataclass(frozen=True)
class _Schedule:
    warmup_steps: int
    total_steps: int
    num_cycles: int
    power: float
    base_lr: float
    lr_end: float

    def warmup(self, step: int) -> float:
        return float(step) / float(max(1, self.warmup_steps))

    def progress(self, step: int) -> float:
        """Fraction of the decay done; diffusers guards the divisor so warmup == total divides by 1."""
        return float(step - self.warmup_steps) / float(max(1, self.total_steps - self.warmup_steps))


def _constant(step: int, s: _Schedule) -> float:
    return 1.0


def _constant_with_warmup(step: int, s: _Schedule) -> float:
    return s.warmup(step) if step < s.warmup_steps else 1.0


def _linear(step: int, s: _Schedule) -> float:
    if step < s.warmup_steps:
        return s.warmup(step)
    remaining = float(s.total_steps - step) / float(max(1, s.total_steps - s.warmup_steps))
    return max(0.0, remaining)


def _cosine(step: int, s: _Schedule) -> float:
    if step < s.warmup_steps:
        return s.warmup(step)
    angle = math.pi * _COSINE_HALF_PERIOD * 2.0 * s.progress(step)
    return max(0.0, 0.5 * (1.0 + math.cos(angle)))


def _cosine_with_restarts(step: int, s: _Schedule) -> float:
    if step < s.warmup_steps:
        return s.warmup(step)
    progress = s.progress(step)
    if progress >= 1.0:
        return 0.0
    # Each cycle is a fresh half cosine from 1: the phase within the cycle is the fractional part.
    phase = (float(s.num_cycles) * progress) % 1.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * phase)))


def _polynomial(step: int, s: _Schedule) -> float:
    if step < s.warmup_steps:
        return s.warmup(step)
    # diffusers returns an absolute LR divided by the base one (LambdaLR multiplies it back), so the
    # multiplier is formed the same way to reproduce its rounding.
    if step > s.total_steps:
        return s.lr_end / s.base_lr
    remaining = 1 - (step - s.warmup_steps) / (s.total_steps - s.warmup_steps)
    lr = (s.base_lr - s.lr_end) * remaining**s.power + s.lr_end
    return lr / s.base_lr


_MULTIPLIERS: dict[str, Callable[[int, _Schedule], float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
}


def _validate(
    name: str, *, warmup_steps: int, total_steps: int, base_lr: float, lr_end: float
) -> None:
    if name not in _MULTIPLIERS:
        raise ConfigError(
            f"--lr_scheduler={name!r} is not a schedule; choose one of {', '.join(LR_SCHEDULERS)}"
        )
    if name != "polynomial":
        return
    if not base_lr > lr_end:
        raise ConfigError(
            f"--lr_scheduler=polynomial decays to {lr_end:g}, so --learning_rate (after "
            f"--scale_lr) must be above it, got {base_lr:g}; raise --learning_rate or pick "
            "another --lr_scheduler"
        )
    if warmup_steps == total_steps:
        # diffusers divides by (total - warmup) when stepped after the last update: a crash at the
        # very end of the run, after all the compute was spent.
        raise ConfigError(
            f"--lr_scheduler=polynomial needs --lr_warmup_steps ({warmup_steps}) below "
            f"--max_train_steps ({total_steps} optimizer updates); lower the warmup or train longer"
        )


def lr_multiplier(
    name: str,
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    base_lr: float,
    lr_end: float = POLYNOMIAL_LR_END,
) -> float:
    """The factor diffusers' `get_scheduler(name, ...)` applies to the base LR at `step`.

    Args:
      name: a `--lr_scheduler` choice (`shared.schema.LR_SCHEDULERS`).
      step: completed optimizer updates (0: the first update's LR); may exceed `total_steps`.
      warmup_steps: `num_warmup_steps` (`--lr_warmup_steps`); `constant` ignores it.
      total_steps: `num_training_steps` (the run's total optimizer updates).
      num_cycles: hard restarts of `cosine_with_restarts`; the other schedules ignore it.
      power: exponent of `polynomial`; the other schedules ignore it.
      base_lr: the peak LR; `polynomial` needs it because it decays to an absolute `lr_end`.
      lr_end: the final LR of `polynomial` (diffusers' fixed 1e-7 by default).

    Returns:
      The multiplier: the LR of that update is `base_lr * multiplier`.

    Raises:
      ConfigError: an unknown schedule, or a `polynomial` one diffusers cannot run (base LR not
        above `lr_end`, or warmup equal to the total).
      ValueError: a negative `step` (a caller's bug).
    """
    if step < 0:
        raise ValueError(f"step counts completed updates and cannot be negative, got {step}")
    _validate(
        name, warmup_steps=warmup_steps, total_steps=total_steps, base_lr=base_lr, lr_end=lr_end
    )
    schedule = _Schedule(
        warmup_steps=int(warmup_steps),
        total_steps=int(total_steps),
        num_cycles=int(num_cycles),
        power=float(power),
        base_lr=float(base_lr),
        lr_end=float(lr_end),
    )
    return float(_MULTIPLIERS[name](int(step), schedule))


def _schedule_kwargs(optim: OptimConfig) -> dict:
    return {
        "warmup_steps": optim.lr_warmup_steps,
        "num_cycles": optim.lr_num_cycles,
        "power": optim.lr_power,
    }


def check_schedule(optim: OptimConfig, *, base_lr: float, total_steps: int) -> None:
    """Raises up front what the schedule would raise later; trainers call it before the first update.

    Args:
      optim: the run's `cfg.optim` (reads `lr_scheduler`, `lr_warmup_steps`).
      base_lr: the peak LR the optimizer is built with (after `--scale_lr`).
      total_steps: the run's total optimizer updates.

    Raises:
      ConfigError: naming the flag to change (see `lr_multiplier`).
    """
    _validate(
        optim.lr_scheduler,
        warmup_steps=optim.lr_warmup_steps,
        total_steps=total_steps,
        base_lr=base_lr,
        lr_end=POLYNOMIAL_LR_END,
    )


def learning_rate(optim: OptimConfig, *, base_lr: float, total_steps: int, step: int) -> float:
    """The LR of the update that follows `step` completed updates.

    Equals `optimizer.param_groups[0]["lr"]` of a torch optimizer with `lr=base_lr` after `step`
    calls of a diffusers `get_scheduler` scheduler's `step()`.

    Args:
      optim: the run's `cfg.optim`.
      base_lr: the peak LR (after `--scale_lr`).
      total_steps: the run's total optimizer updates.
      step: completed updates (0 for the first update).

    Returns:
      The learning rate, a Python float.
    """
    multiplier = lr_multiplier(
        optim.lr_scheduler,
        step,
        total_steps=total_steps,
        base_lr=base_lr,
        **_schedule_kwargs(optim),
    )
    # Same operand order as torch's LambdaLR (base_lr * factor), so the product rounds alike.
    return base_lr * multiplier


def learning_rates(optim: OptimConfig, *, base_lr: float, total_steps: int) -> np.ndarray:
    """The LR of every update of a run.

    Args:
      optim: the run's `cfg.optim`.
      base_lr: the peak LR (after `--scale_lr`).
      total_steps: the run's total optimizer updates.

    Returns:
      float64 array of shape (total_steps,): entry `i` is the LR of update `i + 1`.
    """
    check_schedule(optim, base_lr=base_lr, total_steps=total_steps)
    return np.array(
        [
            learning_rate(optim, base_lr=base_lr, total_steps=total_steps, step=step)
            for step in range(total_steps)
        ],
        dtype=np.float64,
    )
