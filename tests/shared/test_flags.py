"""Every flag of the three diffusers reference scripts parses with the same name, default and meaning.

REFERENCE_FLAGS is the full inventory of diffusers v0.39.0's train_unconditional.py (45 flags),
train_text_to_image.py (57) and train_dreambooth.py (61): (name, default, kind). A diffusers command
line must work unchanged, so every one of them is checked against the parsed config.
"""

import shlex

import pytest

from shared import cli
from shared.config import ConfigError

REFERENCE_FLAGS = {
    # examples/.../train_unconditional.py: 45 flags
    "unconditional": [
        ("model_config_name_or_path", None, "str"),
        ("dataset_name", None, "str"),
        ("dataset_config_name", None, "str"),
        ("train_data_dir", None, "str"),
        ("cache_dir", None, "str"),
        ("dataloader_num_workers", 0, "int"),
        ("resolution", 64, "int"),
        ("center_crop", False, "flag"),
        ("random_flip", False, "flag"),
        ("preserve_input_precision", False, "flag"),
        ("train_batch_size", 16, "int"),
        ("num_epochs", 100, "int"),
        ("gradient_accumulation_steps", 1, "int"),
        ("learning_rate", 0.0001, "float"),
        ("lr_scheduler", "cosine", "str"),
        ("lr_warmup_steps", 500, "int"),
        ("adam_beta1", 0.95, "float"),
        ("adam_beta2", 0.999, "float"),
        ("adam_weight_decay", 1e-06, "float"),
        ("adam_epsilon", 1e-08, "float"),
        ("use_ema", False, "flag"),
        ("ema_inv_gamma", 1.0, "float"),
        ("ema_power", 0.75, "float"),
        ("ema_max_decay", 0.9999, "float"),
        ("prediction_type", "epsilon", "str"),
        ("ddpm_num_steps", 1000, "int"),
        ("ddpm_beta_schedule", "linear", "str"),
        ("mixed_precision", "no", "str"),
        ("enable_xformers_memory_efficient_attention", False, "flag"),
        ("output_dir", "ddpm-model-64", "str"),
        ("overwrite_output_dir", False, "flag"),
        ("save_model_epochs", 10, "int"),
        ("checkpointing_steps", 500, "int"),
        ("checkpoints_total_limit", None, "int"),
        ("resume_from_checkpoint", None, "str"),
        ("eval_batch_size", 16, "int"),
        ("save_images_epochs", 10, "int"),
        ("ddpm_num_inference_steps", 1000, "int"),
        ("logger", "tensorboard", "str"),
        ("logging_dir", "logs", "str"),
        ("local_rank", -1, "int"),
        ("push_to_hub", False, "flag"),
        ("hub_token", None, "str"),
        ("hub_model_id", None, "str"),
        ("hub_private_repo", False, "flag"),
    ],
    # examples/.../train_text_to_image.py: 57 flags
    "text2image": [
        ("pretrained_model_name_or_path", None, "str"),
        ("revision", None, "str"),
        ("variant", None, "str"),
        ("non_ema_revision", None, "str"),
        ("dataset_name", None, "str"),
        ("dataset_config_name", None, "str"),
        ("train_data_dir", None, "str"),
        ("image_column", "image", "str"),
        ("caption_column", "text", "str"),
        ("max_train_samples", None, "int"),
        ("cache_dir", None, "str"),
        ("dataloader_num_workers", 0, "int"),
        ("resolution", 512, "int"),
        ("center_crop", False, "flag"),
        ("random_flip", False, "flag"),
        ("image_interpolation_mode", "lanczos", "str"),
        ("seed", None, "int"),
        ("train_batch_size", 16, "int"),
        ("num_train_epochs", 100, "int"),
        ("max_train_steps", None, "int"),
        ("gradient_accumulation_steps", 1, "int"),
        ("learning_rate", 0.0001, "float"),
        ("scale_lr", False, "flag"),
        ("lr_scheduler", "constant", "str"),
        ("lr_warmup_steps", 500, "int"),
        ("use_8bit_adam", False, "flag"),
        ("adam_beta1", 0.9, "float"),
        ("adam_beta2", 0.999, "float"),
        ("adam_weight_decay", 0.01, "float"),
        ("adam_epsilon", 1e-08, "float"),
        ("max_grad_norm", 1.0, "float"),
        ("use_ema", False, "flag"),
        ("offload_ema", False, "flag"),
        ("foreach_ema", False, "flag"),
        ("input_perturbation", 0, "float"),
        ("snr_gamma", None, "float"),
        ("dream_training", False, "flag"),
        ("dream_detail_preservation", 1.0, "float"),
        ("prediction_type", None, "str"),
        ("noise_offset", 0, "float"),
        ("gradient_checkpointing", False, "flag"),
        ("allow_tf32", False, "flag"),
        ("mixed_precision", None, "str"),
        ("enable_xformers_memory_efficient_attention", False, "flag"),
        ("output_dir", "sd-model-finetuned", "str"),
        ("checkpointing_steps", 500, "int"),
        ("checkpoints_total_limit", None, "int"),
        ("resume_from_checkpoint", None, "str"),
        ("validation_prompts", None, "list"),
        ("validation_epochs", 5, "int"),
        ("logging_dir", "logs", "str"),
        ("report_to", "tensorboard", "str"),
        ("local_rank", -1, "int"),
        ("tracker_project_name", "text2image-fine-tune", "str"),
        ("push_to_hub", False, "flag"),
        ("hub_token", None, "str"),
        ("hub_model_id", None, "str"),
    ],
    # examples/.../train_dreambooth.py: 61 flags
    "dreambooth": [
        ("pretrained_model_name_or_path", None, "str"),
        ("revision", None, "str"),
        ("variant", None, "str"),
        ("tokenizer_name", None, "str"),
        ("dataloader_num_workers", 0, "int"),
        ("resolution", 512, "int"),
        ("center_crop", False, "flag"),
        ("instance_data_dir", None, "str"),
        ("class_data_dir", None, "str"),
        ("instance_prompt", None, "str"),
        ("class_prompt", None, "str"),
        ("with_prior_preservation", False, "flag"),
        ("prior_loss_weight", 1.0, "float"),
        ("num_class_images", 100, "int"),
        ("sample_batch_size", 4, "int"),
        ("prior_generation_precision", None, "str"),
        ("train_text_encoder", False, "flag"),
        ("pre_compute_text_embeddings", False, "flag"),
        ("tokenizer_max_length", None, "int"),
        ("text_encoder_use_attention_mask", False, "flag"),
        ("class_labels_conditioning", None, "str"),
        ("seed", None, "int"),
        ("train_batch_size", 4, "int"),
        ("num_train_epochs", 1, "int"),
        ("max_train_steps", None, "int"),
        ("gradient_accumulation_steps", 1, "int"),
        ("learning_rate", 5e-06, "float"),
        ("scale_lr", False, "flag"),
        ("lr_scheduler", "constant", "str"),
        ("lr_warmup_steps", 500, "int"),
        ("lr_num_cycles", 1, "int"),
        ("lr_power", 1.0, "float"),
        ("use_8bit_adam", False, "flag"),
        ("adam_beta1", 0.9, "float"),
        ("adam_beta2", 0.999, "float"),
        ("adam_weight_decay", 0.01, "float"),
        ("adam_epsilon", 1e-08, "float"),
        ("max_grad_norm", 1.0, "float"),
        ("offset_noise", False, "flag"),
        ("snr_gamma", None, "float"),
        ("gradient_checkpointing", False, "flag"),
        ("allow_tf32", False, "flag"),
        ("mixed_precision", None, "str"),
        ("enable_xformers_memory_efficient_attention", False, "flag"),
        ("set_grads_to_none", False, "flag"),
        ("output_dir", "dreambooth-model", "str"),
        ("checkpointing_steps", 500, "int"),
        ("checkpoints_total_limit", None, "int"),
        ("resume_from_checkpoint", None, "str"),
        ("skip_save_text_encoder", False, "flag"),
        ("validation_prompt", None, "str"),
        ("num_validation_images", 4, "int"),
        ("validation_steps", 100, "int"),
        ("validation_images", None, "list"),
        ("validation_scheduler", "DPMSolverMultistepScheduler", "str"),
        ("logging_dir", "logs", "str"),
        ("report_to", "tensorboard", "str"),
        ("local_rank", -1, "int"),
        ("push_to_hub", False, "flag"),
        ("hub_token", None, "str"),
        ("hub_model_id", None, "str"),
    ],
}

# The minimum each task needs (the reference scripts require the same).
REQUIRED = {
    "unconditional": ["--dataset_name", "some/dataset"],
    "text2image": ["--pretrained_model_name_or_path", "some/model", "--dataset_name", "some/dataset"],
    "dreambooth": [
        "--pretrained_model_name_or_path", "some/model",
        "--instance_data_dir", "dog",
        "--instance_prompt", "a photo of sks dog",
    ],
}  # fmt: skip

# A valid non-default value for string flags with choices (others take "some/value").
STRING_VALUES = {
    "lr_scheduler": "cosine_with_restarts",
    "mixed_precision": "bf16",
    "logger": "wandb",
    "report_to": "wandb",
    "image_interpolation_mode": "bicubic",
    "validation_scheduler": "DDPMScheduler",
    "prior_generation_precision": "fp16",
    "ddpm_beta_schedule": "squaredcos_cap_v2",
    "class_labels_conditioning": "timesteps",
    "resume_from_checkpoint": "latest",
}
PREDICTION_VALUES = {"unconditional": "sample", "text2image": "v_prediction"}
# Flags whose value needs companions to pass cross-field validation.
COMPANIONS = {
    "with_prior_preservation": ["--class_data_dir", "cls", "--class_prompt", "a photo of dog"],
}
SAMPLE = {"int": ("64", 64), "float": ("0.5", 0.5)}
# Reference flags twindiff parses but refuses, with the reason's key words.
REFUSED = {"validation_images": "does not train"}


def _params(*, with_required=True):
    for task, flags in REFERENCE_FLAGS.items():
        for name, default, kind in flags:
            if with_required or f"--{name}" not in REQUIRED[task]:
                yield pytest.param(task, name, default, kind, id=f"{task}-{name}")


def test_inventory_counts():
    counts = {task: len(flags) for task, flags in REFERENCE_FLAGS.items()}
    assert counts == {"unconditional": 45, "text2image": 57, "dreambooth": 61}


# Required flags have no default to check: test_required_flags covers them.
@pytest.mark.parametrize(("task", "name", "default", "kind"), list(_params(with_required=False)))
def test_reference_default(task, name, default, kind):
    cfg = cli.parse_args(REQUIRED[task], task=task, backend="torch")
    value = cfg.get(name)
    assert value == default
    kind_type = {"flag": bool, "int": int, "float": float, "str": str, "list": tuple}[kind]
    assert value is None or type(value) is kind_type


@pytest.mark.parametrize(("task", "name", "default", "kind"), list(_params()))
def test_reference_flag_parses(task, name, default, kind):
    argv = list(REQUIRED[task])
    if kind == "flag":
        argv += [f"--{name}"]
        expected = True
    elif kind == "list":
        argv += [f"--{name}", "a photo", "another photo"]
        expected = ("a photo", "another photo")
    elif kind in SAMPLE:
        raw, expected = SAMPLE[kind]
        argv += [f"--{name}", raw]
    else:
        expected = PREDICTION_VALUES.get(task) if name == "prediction_type" else None
        expected = expected or STRING_VALUES.get(name, "some/value")
        argv += [f"--{name}={expected}"]
    argv += COMPANIONS.get(name, [])
    if name in REFUSED:
        with pytest.raises(ConfigError, match=f"--{name}.*{REFUSED[name]}"):
            cli.parse_args(argv, task=task, backend="torch")
        return
    cfg = cli.parse_args(argv, task=task, backend="torch")
    assert cfg.get(name) == expected


@pytest.mark.parametrize(
    ("task", "missing"),
    [
        ("text2image", "--pretrained_model_name_or_path"),
        ("dreambooth", "--pretrained_model_name_or_path"),
        ("dreambooth", "--instance_data_dir"),
        ("dreambooth", "--instance_prompt"),
        ("text2image", "--dataset_name"),
        ("unconditional", "--dataset_name"),
    ],
)
def test_required_flags(task, missing):
    argv = list(REQUIRED[task])
    i = argv.index(missing)
    del argv[i : i + 2]
    with pytest.raises(ConfigError, match=missing):
        cli.parse_args(argv, task=task, backend="torch")


def test_diffusers_example_test_command_lines_parse():
    """The command lines of diffusers' own example tests (tiny hub ids swapped for local paths)."""
    uncond = cli.parse_args(
        shlex.split(
            "--dataset_name data --model_config_name_or_path cfg --resolution 64 --output_dir out "
            "--train_batch_size 2 --num_epochs 1 --gradient_accumulation_steps 1 "
            "--ddpm_num_inference_steps 2 --learning_rate 1e-3 --lr_warmup_steps 5 "
            "--checkpointing_steps=2 --checkpoints_total_limit=2"
        ),
        task="unconditional",
        backend="torch",
    )
    assert (uncond.training.num_train_epochs, uncond.checkpoint.checkpoints_total_limit) == (1, 2)
    t2i = cli.parse_args(
        shlex.split(
            "--pretrained_model_name_or_path tiny --dataset_name data --resolution 64 "
            "--center_crop --random_flip --train_batch_size 1 --gradient_accumulation_steps 1 "
            "--max_train_steps 2 --learning_rate 5.0e-04 --scale_lr --lr_scheduler constant "
            "--lr_warmup_steps 0 --output_dir out --checkpointing_steps=2 "
            "--resume_from_checkpoint=checkpoint-4"
        ),
        task="text2image",
        backend="torch",
    )
    assert t2i.optim.scale_lr and t2i.checkpoint.resume_from_checkpoint == "checkpoint-4"
    db = cli.parse_args(
        shlex.split(
            "--pretrained_model_name_or_path tiny --instance_data_dir imgs --instance_prompt "
            "photo --resolution 64 --train_batch_size 1 --gradient_accumulation_steps 1 "
            "--max_train_steps 2 --learning_rate 5.0e-04 --scale_lr --lr_scheduler constant "
            "--lr_warmup_steps 0 --output_dir out --pre_compute_text_embeddings "
            "--tokenizer_max_length=77 --text_encoder_use_attention_mask"
        ),
        task="dreambooth",
        backend="torch",
    )
    assert db.prompts.tokenizer_max_length == 77 and db.prompts.text_encoder_use_attention_mask
