"""Optimizer, learning-rate schedule and EMA of the torch backend, built from `cfg.optim`/`cfg.ema`.

Each builder makes the same call as the diffusers training scripts, so a twindiff run and a
diffusers run with the same flags step identically. The learning rate is an argument, not read from
the config: `--scale_lr` is applied in `shared.plan.RunPlan.learning_rate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from shared.config import TrainConfig

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
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, max_train_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The `--lr_scheduler` schedule of diffusers' `get_scheduler` over `max_train_steps`.

    Warmup (`--lr_warmup_steps`) and the total are counted in optimizer updates: the trainer calls
    `step()` exactly once per update, never per micro-batch nor once per process. diffusers' scripts
    instead multiply both counts by `num_processes` because accelerate's `AcceleratedScheduler`
    steps the wrapped scheduler `num_processes` times per update; so this scheduler must not be
    passed through `accelerator.prepare` (or the Accelerator must be built with
    `step_scheduler_with_optimizer=False`).

    diffusers' schedules as they are: `constant` ignores the warmup; `cosine` is a half cosine and
    ignores `--lr_num_cycles` (only `cosine_with_restarts` reads it); `polynomial` decays to a fixed
    `lr_end=1e-7` and reads `--lr_power`.

    Args:
      optimizer: the optimizer whose param-group lrs are scheduled (its `lr` is the peak).
      cfg: the run config; reads `cfg.optim`.
      max_train_steps: total optimizer updates (`RunPlan.max_train_steps`).

    Returns:
      A `LambdaLR`. Its `state_dict()` resumes exactly when loaded together with the optimizer's
      state (which holds the param groups' current lr until the next `step()`).
    """
    o = cfg.optim
    if o.lr_scheduler == "polynomial" and o.lr_warmup_steps == max_train_steps:
        # diffusers divides by (total - warmup) at the last step: a ZeroDivisionError mid-run.
        raise ValueError(
            f"--lr_scheduler=polynomial needs --lr_warmup_steps ({o.lr_warmup_steps}) below the "
            f"total optimizer steps ({max_train_steps}); lower the warmup or train longer"
        )
    return get_scheduler(
        o.lr_scheduler,
        optimizer,
        num_warmup_steps=o.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=o.lr_num_cycles,
        power=o.lr_power,
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
    memory (`--offload_ema`). The checkpoint's decay settings win over the config's.

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
