"""twindiff from Python (a notebook): build a config, train it on either backend, sample.

    import twindiff

    cfg = twindiff.config("digits.yaml", train_data_dir="digits/train", max_train_steps=200)
    result = twindiff.train(cfg, backend="torch")        # or "flax"; the same config
    result.output_dir, result.losses[-1], result.summary["mean_step_seconds"]
    images = twindiff.sample(result.output_dir, num_images=16)   # (16, H, W, C) in [0, 1]

Like the launcher, this module reaches the backends by module name only (`shared` imports no
framework): training runs in this process, as `python -m {backend}diff.{task}` would.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared import cli
from shared import config as C
from shared.config import ConfigError, TrainConfig
from shared.run.report import SUMMARY

# backend -> (the framework it imports, the pip extra that installs it)
FRAMEWORKS = {"flax": ("jax", "flax"), "torch": ("torch", "torch")}


def _installed(backend: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(FRAMEWORKS[backend][0]) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as none
        return False


def installed_backends() -> list[str]:
    """The backends (flax first) whose framework is installed."""
    return [b for b in C.BACKENDS if _installed(b)]


def default_backend() -> str:
    """The first installed backend (flax, then torch); flax when neither is."""
    return (installed_backends() or [C.BACKENDS[0]])[0]


def check_backend(backend: str) -> str:
    """`backend` if it is a backend and installed, else a one-line error with the fix."""
    if backend not in C.BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(C.BACKENDS)}, got {backend!r}")
    if not _installed(backend):
        module, extra = FRAMEWORKS[backend]
        raise ConfigError(
            f'--backend {backend} needs {module}: pip install -e ".[{extra},data]" (or pick the '
            "other --backend)"
        )
    return backend


def config(
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    task: str | None = None,
    backend: str | None = None,
    **overrides: Any,
) -> TrainConfig:
    """A validated config from a YAML file, a dict, keyword overrides, or all three.

    Args:
      source: a YAML file (a path, or a name under ``configs/`` such as ``"digits.yaml"``; its
        ``base_config`` chain is read) or a mapping, nested by section as the YAML files are or
        flat by flag name.
      task: "unconditional", "text2image" or "dreambooth"; may come from the YAML's ``task``.
      backend: "flax" or "torch"; may come from the YAML's ``backend``; else the first
        installed. `train` can still run the config on the other backend.
      overrides: flag values by flag name (``learning_rate=1e-4``), the last word.

    Raises:
      ConfigError: an unknown flag, a bad value or a missing task, in one line.
    """
    values: dict[str, Any] = {}
    if isinstance(source, Mapping):
        values.update(cli.flatten(source, "the config mapping"))
    elif source is not None:
        values.update(cli.load_yaml(source))
    values.update(cli.flatten(overrides, "the keyword arguments"))
    task = task or values.pop("task", None)
    backend = backend or values.pop("backend", None) or default_backend()
    values.pop("task", None), values.pop("backend", None)
    if task is None:
        raise ConfigError(f"no task: pass task= one of {', '.join(C.TASKS)} (or task: in YAML)")
    return C.build(task, backend, values)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns.

    Attributes:
      output_dir: the diffusers folder (`DiffusionPipeline.from_pretrained` loads it).
      summary: ``train_summary.json``: steps, mean step seconds, peak memory, device, ...
      losses: the training loss of each update of this run.
    """

    output_dir: Path
    summary: dict[str, Any]

    @property
    def losses(self) -> list[float]:
        return list(self.summary.get("losses", []))


def train(cfg: TrainConfig, *, backend: str | None = None, **overrides: Any) -> TrainResult:
    """Trains `cfg` in this process on `backend` (default: the config's) and returns the result.

    `overrides` are flag values applied on top of `cfg` (``max_train_steps=10``). The same
    config trains on either backend: it is rebuilt for the one asked, so backend-only flags are
    checked again.
    """
    backend = check_backend(backend or cfg.backend)
    if backend != cfg.backend or overrides:
        values = {**_flat(cfg), **cli.flatten(overrides, "the keyword arguments")}
        cfg = C.build(cfg.task, backend, values)
    trainer = importlib.import_module(f"{backend}diff.trainer")
    task = importlib.import_module(f"{backend}diff.{cfg.task}").TASK
    if backend == "flax":
        importlib.import_module("flaxdiff.distributed").initialize()
    output_dir = Path(trainer.train(cfg, task))
    summary_path = output_dir / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return TrainResult(output_dir=output_dir, summary=summary)


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    """The config's values by flag name, only those another backend's schema also has."""
    nested = cli.to_dict(cfg, redact=False)
    defaults = C.defaults_for(cfg.task)
    values = {}
    for section in C.COMPONENTS:
        for name, value in nested.get(section, {}).items():
            if value != defaults.get(name):
                values[name] = value
    return values


def sample(
    folder: str | os.PathLike,
    *,
    backend: str | None = None,
    num_images: int = 16,
    num_inference_steps: int = 1000,
    seed: int = 0,
    scheduler: str | None = None,
) -> np.ndarray:
    """Samples an unconditional pipeline folder: float32 (N, H, W, C) images in [0, 1].

    Either backend samples a folder written by either (or by diffusers); `scheduler` names a
    diffusers scheduler class to use instead of the folder's (e.g. "DDIMScheduler" with 50
    steps).
    """
    backend = check_backend(backend or default_backend())
    generate = importlib.import_module(f"{backend}diff.generate")
    return generate.sample_unconditional(
        folder,
        num_images=num_images,
        num_inference_steps=num_inference_steps,
        seed=seed,
        scheduler=scheduler,
    )
