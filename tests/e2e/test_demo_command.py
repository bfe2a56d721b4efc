"""The README's first quick-start command, `twindiff demo`, and the launcher, through the real
console entry point."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared import cli

pytestmark = pytest.mark.slow


def twindiff(*args, cwd):
    exe = shutil.which("twindiff")
    command = [exe] if exe else [sys.executable, "-m", "shared.launcher"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _loads_and_samples(out: Path) -> None:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a photo of sks cat", num_inference_steps=2, height=64, width=64, output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_demo_trains_offline_and_writes_a_loadable_pipeline(tmp_path, backend):
    """`twindiff demo dreambooth` (flax by default, torch with --backend torch): DreamBooth with
    prior preservation on the tiny model, then diffusers (PyTorch) loads the result and samples."""
    args = ("demo", "dreambooth", *(("--backend", "torch") if backend == "torch" else ()))
    result = twindiff(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "twindiff-demo"
    cfg = cli.load_saved_config(out / "config.yaml")
    assert (cfg.task, cfg.backend, cfg.diffusion.with_prior_preservation) == (
        "dreambooth",
        backend,
        True,
    )
    assert Path(cfg.data.instance_data_dir) == out / "assets" / "instance"
    assert f"trained with {backend}diff.dreambooth" in result.stdout
    # The trainer's own INFO lines get through the launcher (it set up logging first).
    assert f"INFO {backend}diff.trainer: dreambooth on 1 " in result.stderr
    # demo.yaml: 8 steps, a checkpoint every 4 (at most 2 kept), validation every 4 steps.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    grid = np.asarray(Image.open(out / "validation" / "validation-000008.png"))
    assert grid.shape == (64, 128, 3)  # one prompt, 2 images of 64px
    _loads_and_samples(out)


def test_demo_reuses_assets_given_with_assets(tmp_path):
    assets = tmp_path / "shared-assets"
    result = twindiff(
        "demo", "dreambooth", "--backend", "torch", "--assets", str(assets),
        "--max_train_steps", "1",
        "--validation_steps", "100", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (assets / "instance").is_dir() and not (tmp_path / "twindiff-demo" / "assets").exists()


def test_launcher_errors_are_clear(tmp_path):
    result = twindiff("text2image", "--backend", "torch", cwd=tmp_path)
    assert result.returncode == 2 and "--pretrained_model_name_or_path is required" in result.stderr
    result = twindiff("unconditional", "--backend", "flax", "--num_processes", "2", cwd=tmp_path)
    assert result.returncode == 2 and "--num_processes is for --backend torch" in result.stderr
    result = twindiff("train", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'train'" in result.stderr
    result = twindiff("demo", "--lerning_rate", "1", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'learning_rate'" in result.stderr


def test_config_command_prints_resolved_yaml(tmp_path):
    result = twindiff(
        "config", "dreambooth", "--backend", "torch", "--config", "tasks/dreambooth.yaml",
        "--learning_rate", "2e-6", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = tmp_path / "resolved.yaml"
    path.write_text(result.stdout)
    cfg = cli.load_saved_config(path)
    assert cfg.optim.learning_rate == 2e-6 and cfg.prompts.instance_prompt == "a photo of sks dog"
