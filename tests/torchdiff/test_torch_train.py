"""End-to-end runs of the three torchdiff tasks on tiny models and the offline demo assets.

Each run goes through a real entry point (`accelerate launch -m torchdiff.dreambooth` in a
subprocess, `main(argv)` in process for the rest), then the output folder is loaded with
diffusers and sampled: the test is that the result is a working pipeline, not that files exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shared.config import ConfigError
from shared.data import count_images
from shared.run import checkpoints
from torchdiff import checkpoint as ckpt
from torchdiff import dreambooth, text2image, unconditional

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _sample_sd(folder: Path, prompt: str = "a photo of sks cat") -> np.ndarray:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = np.asarray(out.images[0])
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    return image


def _dreambooth_args(tiny_sd_dir, demo_assets, out, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sd_dir),
        "--instance_data_dir", str(demo_assets.instance_dir),
        "--instance_prompt", demo_assets.instance_prompt,
        "--output_dir", str(out),
        "--resolution", "64",
        "--train_batch_size", "1",
        "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_dreambooth_through_accelerate_launch(tiny_sd_dir, demo_assets, tmp_path):
    """Prior preservation with class images generated into an empty folder, checkpoints,
    validation on TensorBoard, and an export that diffusers loads and samples."""
    config = tmp_path / "accelerate.json"
    from accelerate.utils import write_basic_config

    write_basic_config(mixed_precision="no", save_location=str(config))
    out, class_dir = tmp_path / "out", tmp_path / "class"
    args = _dreambooth_args(
        tiny_sd_dir, demo_assets, out,
        "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", demo_assets.class_prompt, "--num_class_images", "3",
        "--sample_batch_size", "2", "--snr_gamma", "5.0",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
        "--validation_prompt", "a photo of sks cat on the beach", "--num_validation_images", "1",
        "--validation_steps", "2", "--report_to", "tensorboard",
    )  # fmt: skip
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [accelerate, "launch", "--config_file", str(config), "-m", "torchdiff.dreambooth"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert count_images(class_dir) == 3
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / UNET_WEIGHTS).is_file()
    assert (out / "validation" / "validation-000002.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    _sample_sd(out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["peak_memory_bytes"] > 0


def test_dreambooth_text_encoder_checkpointing_8bit_adam_bf16(tiny_sd_dir, demo_assets, tmp_path):
    out = tmp_path / "out"
    args = _dreambooth_args(
        tiny_sd_dir, demo_assets, out,
        "--train_text_encoder", "--gradient_checkpointing", "--use_8bit_adam",
        "--enable_xformers_memory_efficient_attention", "--set_grads_to_none",
        "--max_train_steps", "2", "--checkpointing_steps", "2", "--mixed_precision", "bf16",
        "--validation_prompt", "a cat", "--num_validation_images", "1", "--validation_steps", "2",
    )  # fmt: skip
    assert dreambooth.main(args) == 0
    # bf16 mixed precision: the frozen VAE ran in bf16, the trained models stay fp32 masters.
    assert {v.dtype for v in load_file(out / UNET_WEIGHTS).values()} == {torch.float32}
    assert (out / "validation" / "validation-000002.png").is_file()
    base = load_file(tiny_sd_dir / "text_encoder" / "model.safetensors")
    trained = load_file(out / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the encoder was trained
    assert (out / "checkpoint-2" / "text_encoder" / "model.safetensors").is_file()
    _sample_sd(out)


def test_dreambooth_pre_computed_embeddings(tiny_sd_dir, demo_assets, tmp_path):
    out = tmp_path / "out"
    args = _dreambooth_args(
        tiny_sd_dir, demo_assets, out,
        "--pre_compute_text_embeddings", "--tokenizer_max_length", "77",
        "--text_encoder_use_attention_mask", "--offset_noise",
        "--max_train_steps", "1", "--validation_prompt", "a photo of sks cat",
        "--num_validation_images", "1", "--validation_steps", "1",
    )  # fmt: skip
    assert dreambooth.main(args) == 0
    assert (out / "validation" / "validation-000001.png").is_file()
    _sample_sd(out)


def test_text2image_with_ema_min_snr_v_prediction_and_accumulation(
    tiny_sd_dir, demo_assets, tmp_path
):
    out = tmp_path / "out"
    args = [
        "--pretrained_model_name_or_path", str(tiny_sd_dir),
        "--train_data_dir", str(demo_assets.captioned_dir),
        "--output_dir", str(out), "--resolution", "64", "--center_crop", "--random_flip",
        "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "2", "--learning_rate", "5e-4", "--scale_lr",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--use_ema", "--snr_gamma", "5.0", "--prediction_type", "v_prediction",
        "--noise_offset", "0.05", "--input_perturbation", "0.1",
        "--validation_prompts", "a cat", "a dog", "--validation_epochs", "1",
        "--report_to", "none", "--checkpointing_steps", "1",
    ]  # fmt: skip
    assert text2image.main(args) == 0
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    # The export holds the EMA weights; the checkpoint holds the raw ones and the EMA state.
    exported, raw = load_file(out / UNET_WEIGHTS), load_file(out / "checkpoint-2" / UNET_WEIGHTS)
    assert any(not torch.equal(exported[k], raw[k]) for k in raw)
    ema = torch.load(out / "checkpoint-2" / "ema.pt", weights_only=True)
    assert ema["optimization_step"] == 2
    # 8 captioned images, micro-batches of 2 accumulated by 2: update 2 ends epoch 0.
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "final-000002.png",
        "validation-000002.png",
    ]
    _sample_sd(out, "a cat")


def test_text2image_dream_training(tiny_sd_dir, demo_assets, tmp_path):
    out = tmp_path / "out"
    args = [
        "--pretrained_model_name_or_path", str(tiny_sd_dir),
        "--train_data_dir", str(demo_assets.captioned_dir), "--output_dir", str(out),
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1",
        "--dream_training", "--dream_detail_preservation", "0.8", "--report_to", "none",
    ]  # fmt: skip
    assert text2image.main(args) == 0
    _sample_sd(out)


def test_unconditional_with_ema_epochs_and_checkpoint_limit(demo_assets, tmp_path):
    from diffusers import DDPMPipeline

    out = tmp_path / "out"
    args = [
        "--config", str(REPO / "configs" / "models" / "tiny-ddpm.yaml"),
        "--train_data_dir", str(demo_assets.digits_dir), "--max_train_samples", "8",
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "4",
        "--num_epochs", "3", "--use_ema", "--learning_rate", "1e-3", "--lr_warmup_steps", "1",
        "--save_images_epochs", "2", "--save_model_epochs", "2", "--eval_batch_size", "2",
        "--ddpm_num_inference_steps", "2", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2", "--logger", "tensorboard",
    ]  # fmt: skip
    assert unconditional.main(args) == 0
    # 8 samples, batch 4: 2 updates per epoch, 6 in all; checkpoints 2, 4, 6 -> keep 4 and 6.
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "final-000006.png",
        "validation-000004.png",
    ]
    pipeline = DDPMPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_missing_checkpoint_is_an_error(tiny_sd_dir, demo_assets, tmp_path):
    args = _dreambooth_args(
        tiny_sd_dir, demo_assets, tmp_path / "out", "--resume_from_checkpoint", "checkpoint-7"
    )
    with pytest.raises(ConfigError, match="--resume_from_checkpoint checkpoint-7"):
        dreambooth.main(args)


class _Interrupt(Exception):
    pass


def test_resume_is_exact(tiny_sd_dir, demo_assets, tmp_path, monkeypatch):
    """4 updates straight == 2 updates, a crash, and a resume to 4: weights equal exactly."""
    common = (
        "--with_prior_preservation", "--class_data_dir", str(demo_assets.class_dir),
        "--class_prompt", demo_assets.class_prompt, "--num_class_images", "4",
        "--train_text_encoder", "--use_ema", "--snr_gamma", "5.0",
        "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--max_train_steps", "4", "--checkpointing_steps", "2",
    )  # fmt: skip
    straight = tmp_path / "straight"
    assert dreambooth.main(_dreambooth_args(tiny_sd_dir, demo_assets, straight, *common)) == 0

    resumed = tmp_path / "resumed"
    real_save = ckpt.save

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        raise _Interrupt(path)

    monkeypatch.setattr(ckpt, "save", save_then_crash)
    with pytest.raises(_Interrupt):
        dreambooth.main(_dreambooth_args(tiny_sd_dir, demo_assets, resumed, *common))
    monkeypatch.setattr(ckpt, "save", real_save)
    assert not (resumed / "model_index.json").exists()
    more = ("--resume_from_checkpoint", "latest")
    assert dreambooth.main(_dreambooth_args(tiny_sd_dir, demo_assets, resumed, *common, *more)) == 0

    for name in (
        UNET_WEIGHTS,  # exported: the EMA weights
        "text_encoder/model.safetensors",
        f"checkpoint-4/{UNET_WEIGHTS}",  # the raw weights
        "checkpoint-4/text_encoder/model.safetensors",
    ):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    for name in ("optimizer.pt", "ema.pt"):
        a = torch.load(straight / "checkpoint-4" / name, weights_only=True)
        b = torch.load(resumed / "checkpoint-4" / name, weights_only=True)
        assert repr(a) == repr(b) or _tree_equal(a, b), name
    assert json.loads((straight / "checkpoint-4" / "data_0.json").read_text()) == json.loads(
        (resumed / "checkpoint-4" / "data_0.json").read_text()
    )


def _tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_checkpoint_limit_across_a_resume(tiny_sd_dir, demo_assets, tmp_path):
    """diffusers' removes_multiple_checkpoints case: {2, 4}, then resume to 8 with limit 2."""
    out = tmp_path / "out"
    first = _dreambooth_args(
        tiny_sd_dir, demo_assets, out, "--max_train_steps", "4", "--checkpointing_steps", "2"
    )
    assert dreambooth.main(first) == 0
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    # A checkpoint's unet/ is a diffusers model: it drops into the base pipeline.
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "checkpoint-2" / "unet")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, unet=unet)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a cat", num_inference_steps=1, height=64, width=64, output_type="np")
    assert np.isfinite(image.images[0]).all()
    again = _dreambooth_args(
        tiny_sd_dir, demo_assets, out,
        "--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
        "--resume_from_checkpoint", "checkpoint-4",
    )  # fmt: skip
    assert dreambooth.main(again) == 0
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]


def test_two_processes_shard_the_data_and_resume_exactly(tiny_sd_dir, demo_assets, tmp_path):
    """torchrun with 2 CPU processes (gloo): per-process data and rng in the checkpoints, and a
    2-process resume from checkpoint-2 reproduces the straight run's checkpoint-4 exactly."""
    out = tmp_path / "out"
    args = _dreambooth_args(
        tiny_sd_dir, demo_assets, out,
        "--with_prior_preservation", "--class_data_dir", str(demo_assets.class_dir),
        "--class_prompt", demo_assets.class_prompt, "--num_class_images", "4",
        "--max_train_steps", "4", "--checkpointing_steps", "2",
    )  # fmt: skip
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    # Accelerate needs ACCELERATE_USE_CPU to run a torchrun job on CPUs (gloo).
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--nproc_per_node", "2", "-m", "torchdiff.dreambooth"]

    def run(*extra):
        result = subprocess.run(
            [*command, *args, *extra], capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    run()
    first = out / "checkpoint-4"
    assert {p.name for p in first.glob("data_*.json")} == {"data_0.json", "data_1.json"}
    # 5 instance images, 2 processes x batch 1: one global batch of 2 per step, 2 per epoch.
    assert [json.loads((first / f"data_{r}.json").read_text()) for r in (0, 1)] == [
        {"epoch": 2, "position": 0},
        {"epoch": 2, "position": 0},
    ]
    straight = load_file(first / UNET_WEIGHTS)
    run("--resume_from_checkpoint", "checkpoint-2")
    again = load_file(out / "checkpoint-4" / UNET_WEIGHTS)
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(
    tiny_sd_dir, demo_assets, tmp_path, monkeypatch
):
    """A preempted run (SIGTERM) checkpoints the step it is on and exits without exporting."""
    import signal

    from torchdiff import memory

    out = tmp_path / "out"
    args = _dreambooth_args(
        tiny_sd_dir, demo_assets, out, "--max_train_steps", "3", "--checkpointing_steps", "10"
    )
    real_zero_grad, calls = memory.zero_grad, []

    def zero_grad_then_sigterm(optimizer, cfg):
        real_zero_grad(optimizer, cfg)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(memory, "zero_grad", zero_grad_then_sigterm)
    assert dreambooth.main(args) == 0
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    monkeypatch.setattr(memory, "zero_grad", real_zero_grad)
    assert dreambooth.main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert (out / "model_index.json").is_file()


def test_push_to_hub_uploads_once_and_never_writes_the_token(
    tiny_sd_dir, demo_assets, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    calls = []

    class FakeApi:
        def whoami(self, token=None):
            calls.append(("whoami", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["token"]))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], kwargs["token"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    args = _dreambooth_args(
        tiny_sd_dir, demo_assets, out, "--max_train_steps", "1", "--push_to_hub",
        "--hub_token", "hf_do_not_leak", "--hub_model_id", "me/cat",
    )  # fmt: skip
    assert dreambooth.main(args) == 0
    # Checked before step 1 (whoami, create), uploaded once after the export.
    token = "hf_do_not_leak"
    assert calls == [
        ("whoami", token),
        ("create", "me/cat", token),
        ("create", "me/cat", token),
        ("upload", "me/cat", token),
    ]
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".md")]
    assert all("hf_do_not_leak" not in p.read_text(errors="ignore") for p in written)
    assert "hf_do_not_leak" not in capsys.readouterr().err


def test_wandb_without_the_package_is_a_clear_error(
    tiny_sd_dir, demo_assets, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    args = _dreambooth_args(tiny_sd_dir, demo_assets, tmp_path / "out", "--report_to", "wandb")
    with pytest.raises(ConfigError, match="--report_to wandb needs wandb: pip install wandb"):
        dreambooth.main(args)
