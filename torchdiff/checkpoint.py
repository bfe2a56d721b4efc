"""The torch state inside the shared checkpoint folder (`shared.run.checkpoints`).

The shared code owns the folder: its layout, the manifest, the atomic commit, discovery, resume
rules and pruning. This module writes and reads the torch files inside it:

    checkpoint-<step>/
      unet/  text_encoder/         trained models, diffusers/transformers format (loadable alone)
      optimizer.pt  ema.pt  scaler.pt     (the last two when used)
      rng_<rank>.pt                python, numpy, torch (+cuda) and the noise generator, per process
      + the shared files: trainer_state.json, config.yaml, data_<rank>.json, manifest.json

There is no LR-scheduler file: the LR is a function of the step (`shared.run.lr`), rebuilt at
resume from the resumed run's flags.
"""

from __future__ import annotations

import dataclasses
import errno
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import CheckpointError
from shared.run import checkpoints
from shared.run.process import ProcessGroup

_NEARLY_FULL = 64 * 2**20  # bytes free below which a failed write means a full disk


def process_group(accelerator) -> ProcessGroup:
    """The shared view of Accelerate's processes: barrier and an all-processes AND."""
    if accelerator.num_processes == 1:
        return ProcessGroup()

    def all_true(flag: bool) -> bool:
        mine = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
        return bool(accelerator.gather(mine).min().item() > 0)

    return ProcessGroup(
        index=accelerator.process_index,
        count=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        all_true=all_true,
    )


@dataclasses.dataclass
class TrainingState:
    """What the trainer hands to `save` and gets back from `load`, besides the models.

    Attributes:
      models: name -> unwrapped module saved in diffusers/transformers format ("unet", ...).
      optimizer: saved with its `state_dict`.
      generator: the noise generator.
      ema: a diffusers `EMAModel` or None.
      ema_state / load_ema_state: functions turning the EMA into a `torch.load(weights_only=True)`
        friendly dict and back.
      scaler: the fp16 grad scaler (or None).
    """

    models: Mapping[str, torch.nn.Module]
    optimizer: Any
    generator: torch.Generator
    ema: Any = None
    ema_state: Callable[[Any], dict] | None = None
    load_ema_state: Callable[[Any, dict], None] | None = None
    scaler: Any = None

    def finite(self) -> bool:
        """Whether every trained weight (and EMA weight) is finite: one device sync."""
        tensors = [p for m in self.models.values() for p in m.parameters()]
        if self.ema is not None:
            tensors += list(self.ema.shadow_params)
        flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
        return bool(torch.stack(flags).all().item()) if flags else True


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


def save(
    output_dir: str | Path,
    state: TrainingState,
    *,
    group: ProcessGroup,
    step: int,
    trainer_state: Mapping[str, Any],
    config_text: str,
    loader_state: Mapping[str, int],
    limit: int | None,
) -> Path:
    """Writes `checkpoint-<step>` through the shared protocol; every process calls it."""

    def write_main(folder: Path) -> None:
        for name, model in state.models.items():
            # The trained models are fp32 masters already: save_pretrained writes them as they are.
            model.save_pretrained(folder / name, safe_serialization=True)
        _torch_save(state.optimizer.state_dict(), folder / "optimizer.pt")
        if state.ema is not None:
            _torch_save(state.ema_state(state.ema), folder / "ema.pt")
        if state.scaler is not None:
            _torch_save(state.scaler.state_dict(), folder / "scaler.pt")

    def write_each(folder: Path, rank: int) -> None:
        _torch_save(_rng_state(state.generator), folder / f"rng_{rank}.pt")

    return checkpoints.save(
        output_dir,
        step,
        group=group,
        write_main=write_main,
        write_each=write_each,
        trainer_state=trainer_state,
        config_text=config_text,
        loader_state=loader_state,
        limit=limit,
        finite=state.finite(),
    )


def load(path: Path, state: TrainingState, *, rank: int) -> dict[str, Any]:
    """Restores `state` from the checkpoint at `path` (already verified by the shared code).

    Returns:
      {"trainer_state": dict, "loader_state": {"epoch", "position"}}.

    Raises:
      CheckpointError: a file the run needs is missing or unreadable; one line naming it.
    """
    missing = [
        name
        for name in (*state.models, "optimizer.pt", f"rng_{rank}.pt")
        if not (path / name).exists()
    ]
    if state.ema is not None and not (path / "ema.pt").exists():
        missing.append("ema.pt (the run uses --use_ema; the checkpoint was saved without it)")
    if missing:
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: the checkpoint lacks {', '.join(missing)}; it was "
            "written by a run with different options (--train_text_encoder, --use_ema, or more "
            "processes). Resume with the options it was saved with."
        )
    try:
        for name, model in state.models.items():
            loaded = type(model).from_pretrained(path / name)
            model.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
        state.optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
        if state.ema is not None:
            state.load_ema_state(state.ema, _torch_load(path / "ema.pt"))
        _set_rng_state(_torch_load(path / f"rng_{rank}.pt"), state.generator)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: cannot load it ({type(err).__name__}: {first}); "
            "resume from an older checkpoint"
        ) from err
    return {
        "trainer_state": checkpoints.read_trainer_state(path),
        "loader_state": checkpoints.read_loader_state(path, rank),
    }


def load_scaler(path: Path, scaler) -> None:
    """Restores the fp16 GradScaler (it exists only once Accelerate has prepared the run)."""
    if (path / "scaler.pt").exists():
        scaler.load_state_dict(_torch_load(path / "scaler.pt"))


def _torch_save(obj: Any, path: Path) -> None:
    """`torch.save`, with a full disk reported as the OSError it is.

    torch's zip writer turns a failed write into a bare RuntimeError ("PytorchStreamWriter failed
    writing file"); the shared checkpoint code recognizes a full disk by its errno.
    """
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        if "failed writing" in str(err) and shutil.disk_usage(path.parent).free < _NEARLY_FULL:
            raise OSError(errno.ENOSPC, f"No space left on device writing {path}") from err
        raise


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
