"""The config schema: every flag of both backends, with its default, help, choices and scope.

One frozen dataclass per component; every field is named after the diffusers flag it mirrors
(`--train_batch_size`, `--snr_gamma`, ...), and field names are unique across components, which
keeps the command line flat. Defaults depend on the task, as they do in the three reference
scripts: `TASK_DEFAULTS` holds each task's differences from the dataclass defaults (which are those
of `train_text_to_image.py`). `shared.config` assembles a `TrainConfig` from these parts, and
`shared.config_checks` checks it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from shared.errors import ConfigError

TASKS = ("unconditional", "text2image", "dreambooth")
BACKENDS = ("flax", "torch")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
INTERPOLATION_MODES = (
    "nearest",
    "nearest_exact",
    "bilinear",
    "bicubic",
    "box",
    "hamming",
    "lanczos",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "none")
VALIDATION_SCHEDULERS = ("DPMSolverMultistepScheduler", "DDPMScheduler")
PRIOR_PRECISIONS = ("no", "fp32", "fp16", "bf16")
PARALLELISM = ("pmap", "mesh")
FLAX_ATTENTION = ("dot_product", "einsum", "flash")
ADAM_MOMENTS_DTYPES = ("float32", "bfloat16")


def flag(default: Any, help: str, *, choices=None, tasks=None, backend=None, secret=False):
    """A config field: its default, help line and where it applies.

    Args:
      default: the default of `train_text_to_image.py` (other tasks override in TASK_DEFAULTS).
      help: one line for `--help` and the README flag table.
      choices: allowed values, checked at validation.
      tasks: the tasks that read this flag (None: all). Setting it elsewhere is an error.
      backend: "torch" or "flax" for backend-only flags (refused with a message on the other).
      secret: never written to logs or saved configs.
    """
    meta = {"help": help, "choices": choices, "tasks": tasks, "backend": backend, "secret": secret}
    if isinstance(default, (dict, list)):
        raise TypeError("mutable defaults are not allowed in config fields")
    return dataclasses.field(default=default, metadata=meta)


_DB = ("dreambooth",)
_LATENT = ("text2image", "dreambooth")
_UNCOND = ("unconditional",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str | None = flag(
        None, "Hub id or local folder of the base diffusers pipeline", tasks=_LATENT
    )
    revision: str | None = flag(None, "Hub revision (branch, tag or commit) of the base model")
    variant: str | None = flag(None, "weight-file variant to load, e.g. fp16")
    non_ema_revision: str | None = flag(
        None,
        "revision holding the non-EMA UNet weights to train from (default: --revision)",
        tasks=("text2image",),
    )
    model_config_name_or_path: str | None = flag(
        None,
        "UNet2DModel config (file or folder) to build from; None: the built-in DDPM UNet",
        tasks=_UNCOND,
    )
    tokenizer_name: str | None = flag(
        None, "tokenizer folder or hub id, if not the model's tokenizer/"
    )
    pretrained_vae_name_or_path: str | None = flag(
        None, "VAE folder or hub id to use instead of the model's vae/", tasks=_LATENT
    )
    train_text_encoder: bool = flag(False, "train the text encoder too", tasks=_DB)
    class_labels_conditioning: str | None = flag(
        None,
        "pass class_labels to the UNet; only 'timesteps' (DeepFloyd IF upscaler)",
        tasks=_DB,
        choices=(None, "timesteps"),
    )
    # Architectures for random init (configs/models/*.yaml): diffusers/transformers config dicts.
    unet_config: Mapping[str, Any] | None = flag(None, "UNet architecture to initialize randomly")
    vae_config: Mapping[str, Any] | None = flag(None, "AutoencoderKL architecture (random init)")
    text_encoder_config: Mapping[str, Any] | None = flag(None, "CLIP text encoder architecture")
    scheduler_config: Mapping[str, Any] | None = flag(None, "noise scheduler config (random init)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset_name: str | None = flag(
        None,
        "HF datasets name or local dataset folder; 'tfds:NAME' reads TensorFlow Datasets",
        tasks=("unconditional", "text2image"),
    )
    dataset_config_name: str | None = flag(None, "dataset config name")
    train_data_dir: str | None = flag(
        None,
        "local image folder (captions from metadata.jsonl/.csv or .txt sidecars)",
        tasks=("unconditional", "text2image"),
    )
    dataset_split: str = flag("train", "dataset split to train on")
    tfds_data_dir: str | None = flag(None, "TensorFlow Datasets data_dir for 'tfds:' datasets")
    image_column: str = flag("image", "dataset column holding the images")
    caption_column: str = flag("text", "dataset column holding a caption or a list of captions")
    max_train_samples: int | None = flag(None, "truncate the training set (after a seeded shuffle)")
    cache_dir: str | None = flag(None, "cache folder for downloaded datasets and models")
    dataloader_num_workers: int = flag(0, "decode worker processes (0: decode in the main process)")
    max_bad_image_fraction: float = flag(
        0.05, "stop when more than this fraction of the images cannot be decoded (they are skipped)"
    )
    resolution: int = flag(512, "resize the shorter side to this, then crop a square of it")
    center_crop: bool = flag(False, "center crop instead of random crop")
    random_flip: bool = flag(False, "random horizontal flip")
    image_interpolation_mode: str = flag(
        "lanczos", "resampling filter of the resize", choices=INTERPOLATION_MODES
    )
    preserve_input_precision: bool = flag(
        False, "keep 16-bit image precision instead of converting to 8-bit RGB", tasks=_UNCOND
    )
    instance_data_dir: str | None = flag(None, "folder of the subject (instance) images", tasks=_DB)
    class_data_dir: str | None = flag(
        None, "folder of class (prior) images; filled by generation when short", tasks=_DB
    )


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    instance_prompt: str | None = flag(
        None, "prompt with the identifier, e.g. 'a photo of sks dog'", tasks=_DB
    )
    class_prompt: str | None = flag(None, "prompt of the class images", tasks=_DB)
    num_class_images: int = flag(
        100, "minimum number of class images; missing ones are generated", tasks=_DB
    )
    sample_batch_size: int = flag(4, "per-device batch size of class-image generation", tasks=_DB)
    prior_generation_precision: str | None = flag(
        None,
        "dtype of class-image generation (default fp16 on GPU, else fp32)",
        tasks=_DB,
        choices=(None, *PRIOR_PRECISIONS),
    )
    pre_compute_text_embeddings: bool = flag(
        False, "encode the prompts once and drop the text encoder from memory", tasks=_DB
    )
    tokenizer_max_length: int | None = flag(
        None, "override the tokenizer's max length", tasks=_LATENT
    )
    text_encoder_use_attention_mask: bool = flag(
        False, "pass the attention mask to the text encoder", tasks=_LATENT
    )


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    seed: int | None = flag(None, "random seed (None: 0 for data order and noise)")
    train_batch_size: int = flag(16, "batch size per device")
    num_train_epochs: int = flag(100, "epochs (overridden by --max_train_steps)")
    max_train_steps: int | None = flag(None, "total optimizer steps; overrides epochs")
    gradient_accumulation_steps: int = flag(1, "micro-batches accumulated per optimizer step")
    mixed_precision: str | None = flag(
        None,
        "no, fp16 or bf16 (None: accelerate's config; 'no' on flax)",
        choices=(None, *MIXED_PRECISION),
    )
    gradient_checkpointing: bool = flag(
        False, "recompute activations in the backward pass (torch checkpointing, flax remat)"
    )
    max_nonfinite_steps: int = flag(
        5, "stop after this many consecutive updates with a non-finite loss or gradient (skipped)"
    )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = flag(1e-4, "learning rate after warmup")
    scale_lr: bool = flag(False, "multiply the lr by accumulation x batch x devices")
    lr_scheduler: str = flag("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = flag(500, "warmup steps, counted in optimizer updates")
    lr_num_cycles: int = flag(1, "hard restarts of cosine_with_restarts")
    lr_power: float = flag(1.0, "power of the polynomial schedule")
    use_8bit_adam: bool = flag(False, "8-bit AdamW states (bitsandbytes)", backend="torch")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_weight_decay: float = flag(1e-2, "AdamW weight decay")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(1.0, "clip the global gradient norm to this")


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    use_ema: bool = flag(False, "keep an exponential moving average of the UNet")
    ema_inv_gamma: float = flag(1.0, "EMA warmup inverse gamma")
    ema_power: float = flag(2 / 3, "EMA warmup power")
    ema_max_decay: float = flag(0.9999, "maximum EMA decay")
    ema_use_warmup: bool = flag(False, "ramp the EMA decay up (diffusers EMAModel use_ema_warmup)")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    prediction_type: str | None = flag(
        None,
        "epsilon, v_prediction or sample (None: the scheduler config's)",
        choices=(None, *PREDICTION_TYPES),
    )
    ddpm_num_steps: int = flag(1000, "training timesteps of the DDPM schedule", tasks=_UNCOND)
    ddpm_beta_schedule: str = flag("linear", "beta schedule", tasks=_UNCOND, choices=BETA_SCHEDULES)
    snr_gamma: float | None = flag(None, "Min-SNR loss weighting gamma (5.0 recommended)")
    noise_offset: float = flag(
        0.0, "offset-noise scale: noise += s * N(0,1) per sample and channel"
    )
    offset_noise: bool = flag(False, "offset noise with the fixed scale 0.1 (DreamBooth's flag)")
    input_perturbation: float = flag(0.0, "input-perturbation scale (0.1 recommended)")
    dream_training: bool = flag(False, "DREAM training (arXiv 2312.00210)", tasks=("text2image",))
    dream_detail_preservation: float = flag(
        1.0, "DREAM detail-preservation factor p", tasks=("text2image",)
    )
    with_prior_preservation: bool = flag(
        False, "add the prior-preservation loss on class images", tasks=_DB
    )
    prior_loss_weight: float = flag(1.0, "weight of the prior-preservation loss", tasks=_DB)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str = flag("sd-model-finetuned", "output folder of the model and checkpoints")
    overwrite_output_dir: bool = flag(
        False, "accepted for compatibility; never read (as in diffusers)"
    )
    checkpointing_steps: int = flag(500, "save the training state every N optimizer steps")
    checkpoints_total_limit: int | None = flag(None, "keep at most N checkpoints")
    resume_from_checkpoint: str | None = flag(None, "checkpoint folder, its name, or 'latest'")
    save_model_epochs: int = flag(10, "export the pipeline every N epochs", tasks=_UNCOND)
    skip_save_text_encoder: bool = flag(
        False, "export the pipeline without the text encoder", tasks=_DB
    )


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    validation_prompt: str | None = flag(None, "prompt sampled at each validation", tasks=_LATENT)
    validation_prompts: tuple[str, ...] | None = flag(
        None, "prompts sampled at each validation, one image each", tasks=_LATENT
    )
    num_validation_images: int = flag(4, "images per validation prompt", tasks=_LATENT)
    validation_steps: int | None = flag(None, "validate every N optimizer steps", tasks=_LATENT)
    validation_epochs: int | None = flag(5, "validate every N epochs", tasks=_LATENT)
    validation_images: tuple[str, ...] | None = flag(
        None, "input images for image-conditioned validation pipelines", tasks=_DB
    )
    validation_scheduler: str = flag(
        "DPMSolverMultistepScheduler",
        "scheduler used to sample validation images",
        choices=VALIDATION_SCHEDULERS,
    )
    eval_batch_size: int = flag(16, "images sampled at each sampling", tasks=_UNCOND)
    save_images_epochs: int = flag(10, "sample images every N epochs", tasks=_UNCOND)
    ddpm_num_inference_steps: int = flag(1000, "DDPM steps of the sample images", tasks=_UNCOND)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    logging_dir: str = flag("logs", "TensorBoard folder, relative to --output_dir")
    report_to: str = flag(
        "tensorboard", "tracker: tensorboard, wandb, comet_ml, all, none", choices=REPORT_TO
    )
    tracker_project_name: str = flag("text2image-fine-tune", "project name given to the tracker")
    local_rank: int = flag(-1, "distributed local rank (the LOCAL_RANK env var wins)")


@dataclasses.dataclass(frozen=True)
class HubConfig:
    push_to_hub: bool = flag(False, "upload the output folder to the Hugging Face Hub")
    hub_token: str | None = flag(None, "Hub token (never logged or saved)", secret=True)
    hub_model_id: str | None = flag(None, "Hub repo id (default: the output folder's name)")
    hub_private_repo: bool = flag(False, "create the Hub repo as private")


@dataclasses.dataclass(frozen=True)
class TorchConfig:
    enable_xformers_memory_efficient_attention: bool = flag(
        False,
        "xFormers attention (falls back to PyTorch SDPA where xFormers cannot run)",
        backend="torch",
    )
    allow_tf32: bool = flag(False, "allow TF32 matmuls on Ampere+ GPUs", backend="torch")
    set_grads_to_none: bool = flag(False, "optimizer.zero_grad(set_to_none=True)", backend="torch")
    offload_ema: bool = flag(
        False, "keep the EMA weights on the CPU between updates", backend="torch"
    )
    foreach_ema: bool = flag(False, "use the foreach EMA update", backend="torch")


@dataclasses.dataclass(frozen=True)
class FlaxConfig:
    parallelism: str = flag(
        "pmap",
        "pmap (replicate/shard) or mesh (jit over a data x fsdp mesh)",
        backend="flax",
        choices=PARALLELISM,
    )
    fsdp_size: int = flag(
        1, "devices per FSDP group on the mesh (the data axis takes the rest)", backend="flax"
    )
    attention: str = flag(
        "dot_product",
        "attention kernel: dot_product (fused), einsum (reference), flash (TPU)",
        backend="flax",
        choices=FLAX_ATTENTION,
    )
    adam_moments_dtype: str = flag(
        "float32",
        "dtype of AdamW's two moment estimates: bfloat16 halves the optimizer's memory "
        "(2 x 2 bytes per parameter instead of 2 x 4), the counterpart of --use_8bit_adam",
        backend="flax",
        choices=ADAM_MOMENTS_DTYPES,
    )


COMPONENTS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "prompts": PromptConfig,
    "training": TrainingConfig,
    "optim": OptimConfig,
    "ema": EMAConfig,
    "diffusion": DiffusionConfig,
    "checkpoint": CheckpointConfig,
    "validation": ValidationConfig,
    "logging": LoggingConfig,
    "hub": HubConfig,
    "torch": TorchConfig,
    "flax": FlaxConfig,
}

# Flags of the reference scripts that name a field differently.
ALIASES = {"num_epochs": "num_train_epochs", "logger": "report_to"}

# Each task's defaults where they differ from train_text_to_image.py's (the dataclass defaults).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "unconditional": {
        "resolution": 64,
        "image_interpolation_mode": "bilinear",
        "lr_scheduler": "cosine",
        "adam_beta1": 0.95,
        "adam_weight_decay": 1e-6,
        "ema_power": 0.75,
        "ema_use_warmup": True,
        "prediction_type": "epsilon",
        "mixed_precision": "no",
        "output_dir": "ddpm-model-64",
        "tracker_project_name": "train_unconditional",
        "validation_epochs": None,
    },
    "text2image": {},
    "dreambooth": {
        "train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 5e-6,
        "image_interpolation_mode": "bilinear",
        "output_dir": "dreambooth-model",
        "tracker_project_name": "dreambooth",
        "validation_steps": 100,
        "validation_epochs": None,
    },
}


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for component, cls in COMPONENTS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise TypeError(f"config field {f.name!r} is defined twice")
            index[f.name] = (component, f)
    return index


FIELDS = _field_index()


def field_type(name: str) -> Any:
    """The resolved type annotation of a field, e.g. `int | None`."""
    component, _ = FIELDS[name]
    return typing.get_type_hints(COMPONENTS[component])[name]


def defaults_for(task: str) -> dict[str, Any]:
    """Every field's default for `task` (flag name -> value)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    values = {name: f.default for name, (_, f) in FIELDS.items()}
    values.update(TASK_DEFAULTS[task])
    return values
