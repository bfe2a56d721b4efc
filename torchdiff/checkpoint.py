"""Training-state checkpoints: `output_dir/checkpoint-<step>/`, atomic, exact to resume from.

A checkpoint holds everything an uninterrupted run would still have in memory:

    checkpoint-<step>/
      unet/  text_encoder/         trained models, diffusers/transformers format (loadable alone)
      optimizer.pt  lr_scheduler.pt  ema.pt  scaler.pt      (the last two when used)
      rng_<rank>.pt                python, numpy, torch (+cuda) and the noise generator, per process
      data_<rank>.json             the shared loader's {epoch, position}, per process
      trainer_state.json           global step and the values of the run plan
      config.yaml                  the resolved config (hub token redacted)

Every process writes into `checkpoint-<step>.tmp/`; after a barrier the main process renames it
to `checkpoint-<step>/` (a rename is atomic on one filesystem), and only then deletes the oldest
checkpoints beyond `--checkpoints_total_limit`. A crash at any point leaves the previous
checkpoints whole; a leftover `.tmp` folder is never read and is cleared by the next save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared import cli
from shared.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_SUFFIX = ".tmp"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints of `output_dir`, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names, or None for a fresh start.

    "latest" with no checkpoint yet starts fresh (as diffusers does); a name or path that does
    not hold a complete checkpoint is an error, never a silent fresh start.
    """
    wanted = cfg.checkpoint.resume_from_checkpoint
    if wanted is None:
        return None
    output_dir = Path(cfg.checkpoint.output_dir)
    if wanted == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet", output_dir)
            return None
        return found[-1]
    path = Path(wanted)
    candidates = [path] if path.is_absolute() else [output_dir / path, path]
    for candidate in candidates:
        if (candidate / "trainer_state.json").is_file():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise ConfigError(
        f"--resume_from_checkpoint {wanted}: no complete checkpoint at {tried} (a checkpoint "
        "folder holds trainer_state.json); pass 'latest', a checkpoint-<step> name inside "
        "--output_dir, or a checkpoint folder path"
    )


@dataclasses.dataclass
class TrainingState:
    """What the trainer hands to `save` and gets back from `load`, besides the models.

    Attributes:
      models: name -> module to save in diffusers/transformers format ("unet", "text_encoder").
      optimizer, lr_scheduler: saved with their `state_dict`.
      ema: a diffusers `EMAModel` or None.
      ema_state / load_ema_state: functions turning the EMA into a `torch.load(weights_only=True)`
        friendly dict and back.
      scaler: the fp16 grad scaler (or None).
      generator: the noise generator.
    """

    models: Mapping[str, torch.nn.Module]
    optimizer: Any
    lr_scheduler: Any
    generator: torch.Generator
    ema: Any = None
    ema_state: Callable[[Any], dict] | None = None
    load_ema_state: Callable[[Any, dict], None] | None = None
    scaler: Any = None


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    # Plain types and tensors only, so that loading needs no pickle (weights_only=True).
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_model(model: torch.nn.Module, folder: Path) -> None:
    # An fp32 CPU copy is not needed: the trained models are fp32 already (mixed precision keeps
    # master weights in fp32), and save_pretrained writes safetensors from any device.
    model.save_pretrained(folder, safe_serialization=True)


def _load_model(model: torch.nn.Module, folder: Path) -> None:
    loaded = type(model).from_pretrained(folder)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded


def save(
    accelerator,
    cfg: TrainConfig,
    state: TrainingState,
    *,
    step: int,
    loader_state: Mapping[str, int],
    plan_values: Mapping[str, Any],
) -> Path:
    """Writes `checkpoint-<step>` atomically on every process; returns its path.

    Every process must call it (each writes its own rng and data position).
    """
    output_dir = Path(cfg.checkpoint.output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}{TMP_SUFFIX}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # a save that died before its commit
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, model in state.models.items():
            _save_model(accelerator.unwrap_model(model), tmp / name)
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(state.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if state.ema is not None:
            torch.save(state.ema_state(state.ema), tmp / "ema.pt")
        if state.scaler is not None:
            torch.save(state.scaler.state_dict(), tmp / "scaler.pt")
        cli.save_config(cfg, tmp / "config.yaml")
        trainer_state = {"global_step": step, "plan": dict(plan_values)}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    torch.save(_rng_state(state.generator), tmp / f"rng_{rank}.pt")
    (tmp / f"data_{rank}.json").write_text(json.dumps(dict(loader_state)) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stale = None
        if final.exists():
            # A resumed run saving a step again: the new one replaces it, and the old one is
            # deleted only once the new one is in place.
            stale = final.with_name(final.name + ".old")
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final, stale)
        os.replace(tmp, final)
        if stale is not None:
            shutil.rmtree(stale)
        _prune(output_dir, cfg.checkpoint.checkpoints_total_limit)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: Path, limit: int | None) -> None:
    """Deletes the oldest committed checkpoints beyond `limit` (the newest is already whole)."""
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        logger.info("--checkpoints_total_limit %d: removing %s", limit, old)
        shutil.rmtree(old)


def load(accelerator, path: Path, state: TrainingState) -> dict[str, Any]:
    """Restores `state` from the checkpoint at `path`; returns step and this process's data state.

    Returns:
      {"global_step": int, "loader_state": {"epoch", "position"}, "plan": dict}.
    """
    rank = accelerator.process_index
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    missing = [
        name
        for name in (*state.models, "optimizer.pt", "lr_scheduler.pt", f"rng_{rank}.pt")
        if not (path / name).exists()
    ]
    if state.ema is not None and not (path / "ema.pt").exists():
        missing.append("ema.pt (the run uses --use_ema; the checkpoint was saved without it)")
    if missing:
        raise ConfigError(
            f"--resume_from_checkpoint {path}: the checkpoint lacks {', '.join(missing)}; it was "
            "written by a run with different options (--train_text_encoder, --use_ema, or more "
            "processes). Resume with the options it was saved with."
        )
    for name, model in state.models.items():
        _load_model(accelerator.unwrap_model(model), path / name)
    state.optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    state.lr_scheduler.load_state_dict(_torch_load(path / "lr_scheduler.pt"))
    if state.ema is not None:
        state.load_ema_state(state.ema, _torch_load(path / "ema.pt"))
    if state.scaler is not None and (path / "scaler.pt").exists():
        state.scaler.load_state_dict(_torch_load(path / "scaler.pt"))
    _set_rng_state(_torch_load(path / f"rng_{rank}.pt"), state.generator)
    loader_state = json.loads((path / f"data_{rank}.json").read_text())
    return {
        "global_step": int(trainer_state["global_step"]),
        "loader_state": loader_state,
        "plan": trainer_state.get("plan", {}),
    }


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
