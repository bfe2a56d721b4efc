"""The EMA decay of every update and the update itself: a numpy reference of diffusers' `EMAModel`.

torchdiff keeps diffusers' `EMAModel`; flaxdiff updates its EMA params in the jitted step. Both are
tested against these functions, so `--use_ema` means one thing on either backend.

Updates are counted from 1 here, as `EMAModel` counts them: its `step()` increments
`optimization_step` before computing the decay, so the first EMA update is update 1, whose decay
is 0 (the shadow becomes a copy of the weights just trained). From update `n` on, with
`s = n - update_after_step - 1`:
- with `--ema_use_warmup`: `1 - (1 + s / inv_gamma) ** -power` (@crowsonkb's warmup);
- without: `(1 + s) / (10 + s)`;
then capped at `--ema_max_decay` and floored at `min_decay`. Updates with `s <= 0` use 0.
"""

from __future__ import annotations

import numpy as np

from shared.schema import EMAConfig


def ema_decay(
    step: int,
    *,
    max_decay: float,
    use_warmup: bool,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    min_decay: float = 0.0,
    update_after_step: int = 0,
) -> float:
    """The decay diffusers' `EMAModel` uses at its `step`-th call of `step()`.

    Args:
      step: 1-based EMA update count (`EMAModel.optimization_step` after the increment).
      max_decay: `--ema_max_decay` (`EMAModel(decay=...)`), the cap.
      use_warmup: `--ema_use_warmup`: the inverse-gamma warmup instead of `(1 + s) / (10 + s)`.
      inv_gamma: `--ema_inv_gamma`, warmup only.
      power: `--ema_power`, warmup only.
      min_decay: the floor (`EMAModel(min_decay=...)`); not applied where the decay is 0.
      update_after_step: updates before the EMA starts averaging (`EMAModel(update_after_step=...)`).

    Returns:
      The decay `d` of that update: `shadow <- shadow - (1 - d) * (shadow - param)`.

    Raises:
      ValueError: a negative `step` (a caller's bug).
    """
    if step < 0:
        raise ValueError(f"step counts EMA updates from 1 and cannot be negative, got {step}")
    # Shifted by one: the first counted update has decay 0, so the shadow restarts from the weights
    # just trained instead of averaging in whatever it was initialized with.
    s = max(0, step - update_after_step - 1)
    if s <= 0:
        return 0.0
    # The inverse-gamma warmup ramps up slowly enough for long runs; the default ramp is faster.
    decay = 1 - (1 + s / inv_gamma) ** -power if use_warmup else (1 + s) / (10 + s)
    # Cap first, then floor: with min_decay > max_decay the floor wins, as in diffusers.
    return float(max(min(decay, max_decay), min_decay))


def decay_from_config(ema_cfg: EMAConfig, step: int) -> float:
    """`ema_decay` with the run's `cfg.ema` flags (diffusers' `min_decay=0`, `update_after_step=0`).

    Args:
      ema_cfg: the run's `cfg.ema` (reads `ema_max_decay`, `ema_use_warmup`, `ema_inv_gamma`,
        `ema_power`).
      step: 1-based EMA update count.

    Returns:
      The decay of that update.
    """
    return ema_decay(
        step,
        max_decay=ema_cfg.ema_max_decay,
        use_warmup=ema_cfg.ema_use_warmup,
        inv_gamma=ema_cfg.ema_inv_gamma,
        power=ema_cfg.ema_power,
    )


def ema_update(shadow: np.ndarray, param: np.ndarray, decay: float) -> np.ndarray:
    """One EMA update of a shadow parameter toward the trained one, as `EMAModel.step` does it.

    The form `shadow - (1 - decay) * (shadow - param)` (not `decay * shadow + (1 - decay) * param`)
    is diffusers' and rounds like it.

    Args:
      shadow: the EMA parameter, any shape.
      param: the trained parameter, same shape.
      decay: the decay of this update (`ema_decay`).

    Returns:
      The new shadow parameter (a new array; the inputs are not modified), in their dtype.
    """
    shadow = np.asarray(shadow)
    param = np.asarray(param)
    if shadow.shape != param.shape:
        raise ValueError(f"shadow {shadow.shape} and param {param.shape} differ in shape")
    one_minus_decay = 1 - decay
    return shadow - one_minus_decay * (shadow - param)
