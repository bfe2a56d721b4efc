"""Optimizer, learning-rate schedule and EMA of the torch backend, built from `cfg.optim`/`cfg.ema`.

Each builder makes the same call as the diffusers training scripts, so a twindiff run and a
diffusers run with the same flags step identically. The learning rate is an argument, not read from
the config: `--scale_lr` is applied in `shared.plan.RunPlan.learning_rate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from shared.config import TrainConfig
from shared.run import lr

# Every key of `EMAModel.state_dict()`: a checkpoint missing one would be filled silently from the
# live object by `EMAModel.load_state_dict`, which is a wrong resume, so loading requires them all.
_EMA_SCALARS = {
    "decay": float,
    "min_decay": float,
    "optimization_step": int,
    "update_after_step": int,
    "use_ema_warmup": bool,
    "inv_gamma": float,
    "power": float,
}


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainConfig, *, learning_rate: float
) -> torch.optim.Optimizer:
    """AdamW over `params`, or bitsandbytes' 8-bit AdamW with `--use_8bit_adam`.

    Args:
      params: the trainable parameters (or param groups).
      cfg: the run config; reads `cfg.optim` (betas, weight decay, epsilon, `use_8bit_adam`).
      learning_rate: the peak learning rate, after `--scale_lr` (`RunPlan.learning_rate`).

    Raises:
      ImportError: `--use_8bit_adam` without bitsandbytes installed.
    """
    o = cfg.optim
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes"
            ) from err
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        params,
        lr=learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        weight_decay=o.adam_weight_decay,
        eps=o.adam_epsilon,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    max_train_steps: int,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The `--lr_scheduler` schedule over `max_train_steps` updates, positioned at `start_step`.

    The multiplier of each update is `shared.run.lr.lr_multiplier`, the numpy reference that
    equals diffusers' `get_scheduler` at every update (tested) and that the flax backend follows
    too. The LR is a function of the step alone, so a resumed run builds its scheduler at the
    resumed step from its own (possibly changed) flags instead of loading a saved one: a new
    `--learning_rate` or schedule takes effect from there, and an unchanged one continues exactly.

    Warmup (`--lr_warmup_steps`) and the total are counted in optimizer updates: the trainer calls
    `step()` exactly once per update, never per micro-batch nor once per process (diffusers'
    scripts multiply both by `num_processes` to undo accelerate's `AcceleratedScheduler`, so this
    scheduler is not passed through `accelerator.prepare`).

    Args:
      optimizer: the optimizer whose param groups are scheduled; their `lr` is set to the peak
        learning rate (`initial_lr`) times the multiplier of `start_step`.
      cfg: the run config; reads `cfg.optim`.
      max_train_steps: total optimizer updates (`RunPlan.max_train_steps`).
      start_step: updates already done (0, or the resumed step).

    Raises:
      ConfigError: a schedule that would fail mid-run (polynomial with warmup == total, ...).
    """
    o = cfg.optim
    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        lr.check_schedule(o, base_lr=base, total_steps=max_train_steps)
        group["initial_lr"] = base

    def multiplier(step: int) -> float:
        return lr.lr_multiplier(
            o.lr_scheduler,
            step,
            warmup_steps=o.lr_warmup_steps,
            total_steps=max_train_steps,
            num_cycles=o.lr_num_cycles,
            power=o.lr_power,
            base_lr=base_lrs[0],
        )

    # last_epoch = start_step - 1: the constructor's own first step() lands on start_step.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier, last_epoch=start_step - 1)


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, learning_rate: float
) -> None:
    """Sets the config's AdamW hyperparameters and peak LR on every param group.

    Loading an optimizer checkpoint restores the saved groups' values; calling this afterwards
    makes the resumed run's flags take effect (`shared.run.resume`).
    """
    o = cfg.optim
    for group in optimizer.param_groups:
        group.update(
            initial_lr=learning_rate,
            lr=learning_rate,
            betas=(o.adam_beta1, o.adam_beta2),
            weight_decay=o.adam_weight_decay,
            eps=o.adam_epsilon,
        )


def build_ema(model: torch.nn.Module, cfg: TrainConfig) -> EMAModel | None:
    """An EMA of `model`'s parameters (diffusers `EMAModel`), or None without `--use_ema`.

    The shadow parameters start as copies of the current weights on the model's device; keeping
    them on the CPU (`--offload_ema`) is the trainer's business. The decay of update n is diffusers'
    `EMAModel.get_decay`: 0 at n=1, then `1 - (1 + (n-1)/inv_gamma)**-power` with
    `--ema_use_warmup`, else `n/(n+9)`, capped at `--ema_max_decay`.

    Args:
      model: a diffusers model (its `config` is kept so `EMAModel.save_pretrained` works).
      cfg: the run config; reads `cfg.ema` and `cfg.torch.foreach_ema`.
    """
    e = cfg.ema
    if not e.use_ema:
        return None
    # Parameters, not the module: passing a module is deprecated and forces use_ema_warmup=True.
    return EMAModel(
        model.parameters(),
        decay=e.ema_max_decay,
        use_ema_warmup=e.ema_use_warmup,
        inv_gamma=e.ema_inv_gamma,
        power=e.ema_power,
        foreach=cfg.torch.foreach_ema,
        model_cls=type(model),
        model_config=model.config,
    )


def ema_state_dict(ema: EMAModel) -> dict[str, Any]:
    """A snapshot of the EMA state that `torch.load(..., weights_only=True)` reads back.

    Unlike `EMAModel.state_dict()`, which returns references to the live shadow tensors (later
    updated in place), this copies them to the CPU: the snapshot stays as it was when taken, costs
    no accelerator memory, and loads on any machine. Scalars become plain Python numbers.
    """
    state = ema.state_dict()
    snapshot: dict[str, Any] = {key: cast(state[key]) for key, cast in _EMA_SCALARS.items()}
    snapshot["shadow_params"] = [p.detach().to("cpu", copy=True) for p in state["shadow_params"]]
    return snapshot


def load_ema_state_dict(ema: EMAModel, state: dict[str, Any]) -> None:
    """Restores `ema` from `ema_state_dict` output (or `EMAModel.state_dict()` output).

    Shadow tensors are copied into the existing ones, so they keep their device, dtype and pinned
    memory (`--offload_ema`). The checkpoint's decay settings are restored; a resumed run then
    applies its own with `apply_ema_settings`.

    Raises:
      ValueError: a key is missing, or the shadow parameters do not match the model's.
    """
    missing = sorted({*_EMA_SCALARS, "shadow_params"} - state.keys())
    if missing:
        raise ValueError(f"EMA state is missing {', '.join(missing)}")
    shadow = list(state["shadow_params"])
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(
            f"EMA state has {len(shadow)} shadow parameters; the model has {len(ema.shadow_params)}"
        )
    for i, (saved, live) in enumerate(zip(shadow, ema.shadow_params, strict=True)):
        if saved.shape != live.shape:
            raise ValueError(
                f"EMA shadow parameter {i} has shape {tuple(saved.shape)}; the model's is "
                f"{tuple(live.shape)}"
            )
    with torch.no_grad():
        for saved, live in zip(shadow, ema.shadow_params, strict=True):
            live.copy_(saved)
    # Without shadow_params, EMAModel.load_state_dict keeps the tensors just filled and validates
    # and sets the scalars (it would otherwise deep-copy every tensor first).
    ema.load_state_dict({key: cast(state[key]) for key, cast in _EMA_SCALARS.items()})


def apply_ema_settings(ema: EMAModel, cfg: TrainConfig) -> None:
    """Sets `cfg.ema`'s decay settings on a (restored) EMA: a resumed run's flags take effect."""
    e = cfg.ema
    ema.decay = e.ema_max_decay
    ema.use_ema_warmup = e.ema_use_warmup
    ema.inv_gamma = e.ema_inv_gamma
    ema.power = e.ema_power
