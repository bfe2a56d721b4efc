"""What a validation round samples and where its images go; the backends only run the sampler.

Latent tasks sample each validation prompt with `--validation_scheduler` for 20 steps
(text2image) or 25 (DreamBooth), as the reference scripts do, the generator seeded with `--seed`:
`--validation_prompts` give one image each, `--validation_prompt` gives `--num_validation_images`.
The unconditional task samples `--eval_batch_size` images with DDPM for
`--ddpm_num_inference_steps` steps, seeded 0. Images are saved as one PNG grid per round,
`output_dir/validation/<tag>-<step:06d>.png`, one row per prompt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shared.config import TrainConfig

INFERENCE_STEPS = {"text2image": 20, "dreambooth": 25}
FOLDER = "validation"


@dataclasses.dataclass(frozen=True)
class ValidationPlan:
    """One validation round.

    Attributes:
      prompts: the prompts, in row order (empty for unconditional).
      images_per_prompt: images of each prompt (unconditional: the whole batch in one row).
      num_inference_steps: sampler steps.
      seed: the sampling generator's seed.
      rows: rows of the grid.
    """

    prompts: tuple[str, ...]
    images_per_prompt: int
    num_inference_steps: int
    seed: int
    rows: int


def wants_validation(cfg: TrainConfig) -> bool:
    """Whether the run samples validation images at all."""
    if cfg.task == "unconditional":
        return cfg.validation.eval_batch_size > 0
    return bool(cfg.validation_prompt_list) and cfg.validation.num_validation_images > 0


def plan_validation(cfg: TrainConfig) -> ValidationPlan:
    """The round `cfg` asks for (see the module docstring)."""
    v = cfg.validation
    if cfg.task == "unconditional":
        return ValidationPlan((), v.eval_batch_size, v.ddpm_num_inference_steps, seed=0, rows=1)
    prompts = cfg.validation_prompt_list
    return ValidationPlan(
        prompts=prompts,
        images_per_prompt=1 if v.validation_prompts else v.num_validation_images,
        num_inference_steps=INFERENCE_STEPS[cfg.task],
        seed=cfg.seed,
        rows=max(len(prompts), 1),
    )


def grid_path(cfg: TrainConfig, *, tag: str, step: int) -> Path:
    """`output_dir/validation/<tag>-<step:06d>.png`; tag is "validation" or "final"."""
    return Path(cfg.checkpoint.output_dir) / FOLDER / f"{tag}-{step:06d}.png"
