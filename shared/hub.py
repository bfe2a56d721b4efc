"""`--push_to_hub`: a model card and the upload of the exported folder, for both backends.

The token (`--hub_token`, else the cached login) is passed to huggingface_hub and nowhere else:
it is never logged and never written (saved configs redact it). Checkpoints and logs stay local.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from pathlib import Path

from shared.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

TAGS = {
    "unconditional": ["unconditional-image-generation", "ddpm", "diffusers-training", "twindiff"],
    "text2image": ["stable-diffusion", "text-to-image", "diffusers-training", "twindiff"],
    "dreambooth": ["text-to-image", "dreambooth", "diffusers-training", "twindiff"],
}


def repo_id(cfg: TrainConfig) -> str:
    """`--hub_model_id`, else the output folder's name (as the reference scripts)."""
    return cfg.hub.hub_model_id or Path(cfg.checkpoint.output_dir).resolve().name


def model_card(cfg: TrainConfig, *, images: list[str] = ()) -> str:
    """README.md of the uploaded model: what was trained from what, with which settings."""
    base = cfg.model.pretrained_model_name_or_path or "a randomly initialized model"
    lines = [
        "---",
        "library_name: diffusers",
        *(["license: creativeml-openrail-m"] if cfg.task != "unconditional" else []),
        *([f"base_model: {base}"] if cfg.model.pretrained_model_name_or_path else []),
        "tags:",
        *[f"- {tag}" for tag in TAGS[cfg.task]],
        "---",
        "",
        f"# {repo_id(cfg)}",
        "",
        f"Trained with twindiff ({cfg.task}, {cfg.backend} backend) from {base}.",
        "",
    ]
    if cfg.task == "dreambooth":
        lines += [f"Instance prompt: `{cfg.prompts.instance_prompt}`.", ""]
    prompts = cfg.validation_prompt_list
    if prompts:
        lines += ["Validation prompts: " + "; ".join(f"`{p}`" for p in prompts) + ".", ""]
    for image in images:
        lines += [f"![validation]({image})", ""]
    t, o = cfg.training, cfg.optim
    lines += [
        "## Training settings",
        "",
        f"- resolution {cfg.data.resolution}, batch {t.train_batch_size} per device, "
        f"gradient accumulation {t.gradient_accumulation_steps}",
        f"- learning rate {o.learning_rate} ({o.lr_scheduler}), mixed precision "
        f"{t.mixed_precision or 'default'}",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        f'pipeline = DiffusionPipeline.from_pretrained("{repo_id(cfg)}")',
        "```",
        "",
    ]
    return "\n".join(lines)


CHECK_TIMEOUT_SECONDS = 30.0


def check_access(cfg: TrainConfig, *, api=None, timeout: float = CHECK_TIMEOUT_SECONDS) -> str:
    """Before step 1: the token is valid and the repo exists or can be created; returns its id.

    A run with `--push_to_hub` would otherwise find a missing network or a bad token only after
    training. The check runs in a thread bounded by `timeout`, so an unreachable Hub costs
    seconds, not a TCP timeout.

    Raises:
      ConfigError: one line naming the failure and the fix.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    token = cfg.hub.hub_token
    name = repo_id(cfg)

    def reach() -> str:
        api.whoami(token=token)
        created = api.create_repo(
            name, exist_ok=True, private=cfg.hub.hub_private_repo, token=token
        )
        return getattr(created, "repo_id", None) or name

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hub-check")
    future = pool.submit(reach)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        reason = f"no answer from the Hub in {timeout:.0f} s"
    except Exception as err:  # any failure of the Hub client is the user's to fix here
        first = (str(err).strip().splitlines() or [""])[0]
        reason = f"{type(err).__name__}: {first}"[:300]
    finally:
        pool.shutdown(wait=False)
    raise ConfigError(
        f"--push_to_hub: cannot use the Hub repo {name!r} ({reason}); check the network, log in "
        "with `hf auth login` or pass --hub_token, or drop --push_to_hub (nothing was trained yet)"
    )


def push(cfg: TrainConfig, *, commit_message: str, images: list[str] = (), api=None) -> str:
    """Uploads `--output_dir` (without checkpoints and logs) to the Hub; returns the repo id.

    Args:
      commit_message: e.g. "End of training" or "Epoch 10".
      images: files inside the output folder to show in the model card.
      api: a `huggingface_hub.HfApi` (tests pass a fake; None: a real one).
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    output_dir = Path(cfg.checkpoint.output_dir)
    token = cfg.hub.hub_token
    created = api.create_repo(
        repo_id(cfg), exist_ok=True, private=cfg.hub.hub_private_repo, token=token
    )
    name = getattr(created, "repo_id", None) or repo_id(cfg)
    card = output_dir / "README.md"
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text(model_card(cfg, images=list(images)), encoding="utf-8")
    os.replace(tmp, card)
    logging_dir = Path(cfg.logging.logging_dir).parts[0] if cfg.logging.logging_dir else "logs"
    api.upload_folder(
        repo_id=name,
        folder_path=str(output_dir),
        commit_message=commit_message,
        ignore_patterns=["step_*", "epoch_*", "checkpoint-*", f"{logging_dir}/*", ".*"],
        token=token,
    )
    logger.info("pushed %s to the Hub as %s", output_dir, name)
    return name
