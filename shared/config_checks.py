"""Cross-field validation of a `TrainConfig`: what cannot run is an error naming the flag and fix.

`TrainConfig.__post_init__` calls `validate`, so every config that exists has passed it; single
values are checked against the schema's choices, task scopes and backend scopes, then ranges,
then combinations.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared.errors import ConfigError
from shared.schema import _LATENT, BACKENDS, FIELDS, TASKS, defaults_for

if TYPE_CHECKING:
    from shared.config import TrainConfig

logger = logging.getLogger("shared.config")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Raises ConfigError for a value or combination that cannot run."""
    _check(cfg.task in TASKS, f"unknown task {cfg.task!r}; valid tasks: {', '.join(TASKS)}")
    _check(
        cfg.backend in BACKENDS, f"unknown backend {cfg.backend!r}; valid: {', '.join(BACKENDS)}"
    )
    task_defaults = defaults_for(cfg.task)
    for name, (component, f) in FIELDS.items():
        value = getattr(getattr(cfg, component), name)
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            _check(False, f"--{name}={value!r} is not valid; choose one of: {shown}")
        if value == task_defaults[name]:
            continue
        tasks, backend = f.metadata["tasks"], f.metadata["backend"]
        if tasks is not None and cfg.task not in tasks:
            _check(
                False,
                f"--{name} is a flag of {'/'.join(tasks)}; the {cfg.task} task does not use it",
            )
        if backend is not None and cfg.backend != backend:
            _check(
                False, f"--{name} is a {backend}-only flag; {_BACKEND_HINTS.get(name, 'remove it')}"
            )
    _validate_ranges(cfg)
    _validate_task(cfg)


_BACKEND_HINTS = {
    "use_8bit_adam": "bitsandbytes is torch-only; --adam_moments_dtype bfloat16 is the flax way "
    "to halve the optimizer's memory",
    "enable_xformers_memory_efficient_attention": "flax uses a fused attention kernel; see --attention",
    "allow_tf32": "XLA picks matmul precision on TPU/GPU; remove it for the flax backend",
    "set_grads_to_none": "flax has no gradient buffers to reset; remove it",
    "offload_ema": "flax keeps EMA params sharded like the params; remove it",
    "foreach_ema": "the flax EMA update is one fused tree_map; remove it",
    "parallelism": "torch parallelism is configured by `accelerate config`",
    "fsdp_size": "torch parallelism is configured by `accelerate config`",
    "attention": "use --enable_xformers_memory_efficient_attention on torch",
    "adam_moments_dtype": "use --use_8bit_adam on torch",
}


def _validate_ranges(cfg: TrainConfig) -> None:
    t, o, d, c = cfg.training, cfg.optim, cfg.diffusion, cfg.checkpoint
    positive = {
        "train_batch_size": t.train_batch_size,
        "num_train_epochs": t.num_train_epochs,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "resolution": cfg.data.resolution,
        "checkpointing_steps": c.checkpointing_steps,
        "sample_batch_size": cfg.prompts.sample_batch_size,
        "lr_num_cycles": o.lr_num_cycles,
        "fsdp_size": cfg.flax.fsdp_size,
        "max_nonfinite_steps": t.max_nonfinite_steps,
    }
    optional_positive = {
        "max_train_steps": t.max_train_steps,
        "checkpoints_total_limit": c.checkpoints_total_limit,
        "max_train_samples": cfg.data.max_train_samples,
        "tokenizer_max_length": cfg.prompts.tokenizer_max_length,
        "validation_steps": cfg.validation.validation_steps,
        "validation_epochs": cfg.validation.validation_epochs,
    }
    for name, value in {**positive, **optional_positive}.items():
        if value is not None:
            _check(value >= 1, f"--{name} must be at least 1, got {value}")
    non_negative = {
        "learning_rate": o.learning_rate,
        "lr_warmup_steps": o.lr_warmup_steps,
        "adam_weight_decay": o.adam_weight_decay,
        "adam_epsilon": o.adam_epsilon,
        "max_grad_norm": o.max_grad_norm,
        "noise_offset": d.noise_offset,
        "input_perturbation": d.input_perturbation,
        "prior_loss_weight": d.prior_loss_weight,
        "dataloader_num_workers": cfg.data.dataloader_num_workers,
        "num_class_images": cfg.prompts.num_class_images,
    }
    for name, value in non_negative.items():
        _check(value >= 0, f"--{name} must be >= 0, got {value}")
    for name in ("adam_beta1", "adam_beta2", "ema_max_decay"):
        value = cfg.get(name)
        _check(0 <= value < 1, f"--{name} must be in [0, 1), got {value}")
    _check(
        0 <= cfg.data.max_bad_image_fraction < 1,
        f"--max_bad_image_fraction must be in [0, 1), got {cfg.data.max_bad_image_fraction}",
    )
    if d.snr_gamma is not None:
        _check(d.snr_gamma > 0, f"--snr_gamma must be > 0 (5.0 is recommended), got {d.snr_gamma}")
    _check(
        not (d.offset_noise and d.noise_offset not in (0.0, 0.1)),
        f"--offset_noise means --noise_offset=0.1; it conflicts with --noise_offset={d.noise_offset}",
    )


def _validate_task(cfg: TrainConfig) -> None:
    m, data, p, d = cfg.model, cfg.data, cfg.prompts, cfg.diffusion
    _check(
        not cfg.validation.validation_images,
        "--validation_images feeds image-conditioned pipelines (DeepFloyd IF's upscaler), which "
        "twindiff does not train; remove it (--validation_prompt samples the Stable Diffusion "
        "pipeline)",
    )
    if cfg.task in _LATENT:
        inline = all((m.unet_config, m.vae_config, m.text_encoder_config, m.tokenizer_name))
        _check(
            m.pretrained_model_name_or_path is not None or inline,
            f"--pretrained_model_name_or_path is required for {cfg.task} (a hub id or a diffusers "
            "folder), unless a model config (configs/models/*.yaml) gives unet_config, vae_config and "
            "text_encoder_config and --tokenizer_name names a tokenizer",
        )
        _check(
            data.resolution % 8 == 0,
            f"--resolution={data.resolution} must be a multiple of 8 (the VAE downsamples by 8)",
        )
        _check(
            d.prediction_type != "sample",
            "--prediction_type=sample is for the unconditional task; use epsilon or v_prediction",
        )
    if cfg.task == "unconditional":
        _check(
            d.prediction_type in ("epsilon", "sample", "v_prediction"),
            "--prediction_type must be set for the unconditional task (epsilon, v_prediction or sample)",
        )
    if cfg.task in ("unconditional", "text2image"):
        _check(
            data.dataset_name is not None or data.train_data_dir is not None,
            f"{cfg.task} needs data: give --dataset_name (hub name, local dataset, or tfds:NAME) "
            "or --train_data_dir (a local image folder)",
        )
    if cfg.task == "dreambooth":
        _check(
            data.instance_data_dir is not None,
            "dreambooth needs --instance_data_dir (subject images)",
        )
        _check(
            p.instance_prompt is not None,
            "dreambooth needs --instance_prompt, e.g. 'a photo of sks dog'",
        )
        if d.with_prior_preservation:
            _check(
                data.class_data_dir is not None,
                "--with_prior_preservation needs --class_data_dir (created and filled if short)",
            )
            _check(p.class_prompt is not None, "--with_prior_preservation needs --class_prompt")
        elif data.class_data_dir is not None or p.class_prompt is not None:
            logger.warning(
                "--class_data_dir/--class_prompt are ignored without --with_prior_preservation"
            )
        _check(
            not (m.train_text_encoder and p.pre_compute_text_embeddings),
            "--train_text_encoder and --pre_compute_text_embeddings cannot be combined: precomputed "
            "embeddings freeze the text encoder; drop one of them",
        )
    if cfg.backend == "flax":
        _check(
            cfg.training.mixed_precision != "fp16",
            "--mixed_precision=fp16 is not supported on the flax backend (no loss scaling; TPUs "
            "compute in bf16): use --mixed_precision=bf16",
        )
    _check(
        not (cfg.hub.hub_token and cfg.logging.report_to in ("wandb", "all")),
        "--hub_token with --report_to=wandb would expose the token to wandb; log in with "
        "`huggingface-cli login` instead",
    )
