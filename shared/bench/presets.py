"""The configs `twindiff bench` knows by name, and the training command line each becomes.

A preset is a task, a model YAML from `configs/models/`, offline data made by `shared.demo`
(no download) and two sizes: the one it is meant for on a GPU or TPU and a small one a CPU
finishes in seconds to a few minutes. The command line is a plain training command of either
backend (`python -m {backend}diff.{task} ...`), so anything a run accepts can be added to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from shared.demo import DemoAssets


@dataclasses.dataclass(frozen=True)
class Size:
    """One preset's shape on one kind of machine."""

    resolution: int
    batch_size: int  # per device: the global batch on one device
    steps: int  # timed updates
    warmup: int  # untimed updates before them


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named benchmark config.

    Attributes:
      model_config: a YAML under `configs/` (random weights: its model configs, no download).
      data: "digits" (the demo's 500 digits, an image folder) or "captioned" (its 8 captioned
        photos, with the demo's CLIP tokenizer).
      accelerator: the size on a GPU or TPU; cpu: the size on a CPU.
      flags: training flags the preset always adds.
    """

    name: str
    description: str
    task: str
    model_config: str
    data: str
    accelerator: Size
    cpu: Size
    flags: tuple[str, ...] = ()

    def size(self, device: str) -> Size:
        return self.cpu if device == "cpu" else self.accelerator


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="tiny",
            description="tiny-ddpm UNet2DModel on the offline digits (unconditional)",
            task="unconditional",
            model_config="models/tiny-ddpm.yaml",
            data="digits",
            accelerator=Size(resolution=32, batch_size=16, steps=20, warmup=3),
            cpu=Size(resolution=32, batch_size=16, steps=20, warmup=3),
        ),
        Preset(
            name="ddpm-128",
            description="the diffusers tutorial's 128px DDPM UNet2DModel, random weights",
            task="unconditional",
            model_config="models/ddpm-128.yaml",
            data="digits",
            accelerator=Size(resolution=128, batch_size=16, steps=20, warmup=3),
            cpu=Size(resolution=128, batch_size=1, steps=3, warmup=1),
        ),
        Preset(
            name="sd15",
            description="Stable Diffusion 1.5 text2image (UNet, VAE, CLIP text), random weights",
            task="text2image",
            model_config="models/sd15.yaml",
            data="captioned",
            accelerator=Size(resolution=512, batch_size=4, steps=20, warmup=3),
            cpu=Size(resolution=64, batch_size=1, steps=2, warmup=1),
        ),
    )
}


def training_args(
    preset: Preset,
    size: Size,
    *,
    assets: DemoAssets,
    output_dir: str | Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """The training flags of one backend's run of `preset` at `size` (`extra` last, so a user's
    flag overrides the preset's)."""
    if preset.data == "digits":
        data = ["--train_data_dir", str(assets.digits_dir)]
    elif preset.data == "captioned":
        data = ["--train_data_dir", str(assets.captioned_dir)]
        data += ["--tokenizer_name", str(assets.tokenizer_dir)]
    else:
        raise ValueError(f"preset {preset.name}: unknown data {preset.data!r}")
    return [
        "--config", preset.model_config,
        *data,
        "--resolution", str(size.resolution),
        "--train_batch_size", str(size.batch_size),
        "--max_train_steps", str(size.warmup + size.steps),
        "--output_dir", str(output_dir),
        "--report_to", "none",
        *preset.flags,
        *extra,
    ]  # fmt: skip
