"""Runs that never lose work: each test is a defect found by trying to break a torchdiff run.

Non-finite losses, damaged checkpoints, bad images, changed flags on resume, fp16 on a CPU, a full
disk, user errors as one line with exit status 2, an unreachable Hub, Ctrl-C and SIGTERM during
setup. Runs go through the task entry point in-process (`cli.run_main(dreambooth.main)` is what
`python -m torchdiff.dreambooth` does), with the tiny model and offline assets.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from shared import cli
from shared.run import checkpoints
from torchdiff import dreambooth, text2image

pytestmark = pytest.mark.slow

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _args(tiny_sd_dir, instance_dir, out, *extra, prompt="a photo of sks cat") -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sd_dir),
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", prompt,
        "--output_dir", str(out),
        "--resolution", "64",
        "--train_batch_size", "1",
        "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def _run(args: list[str], main=dreambooth.main) -> int:
    return cli.run_main(lambda: main(args))


def _finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _jpegs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


# --- 1. non-finite loss -----------------------------------------------------------------------


def test_a_diverging_run_never_writes_non_finite_weights(
    tiny_sd_dir, demo_assets, tmp_path, capsys
):
    """lr 1e6: the loss is NaN from step 2. Updates are skipped, checkpoints stay finite, the run
    stops after --max_nonfinite_steps with one line naming the steps, the lr and the checkpoint."""
    out = tmp_path / "out"
    args = _args(
        tiny_sd_dir, demo_assets.instance_dir, out,
        "--learning_rate", "1e6", "--max_train_steps", "8", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", "--max_nonfinite_steps", "3",
    )  # fmt: skip
    assert _run(args) == 2
    line = _one_line_error(capsys)
    assert "consecutive steps" in line and "learning rate 1e+06" in line
    assert "last good checkpoint:" in line and "checkpoint-" in line
    found = checkpoints.list_checkpoints(out)
    assert found, "the last good checkpoints are kept"
    assert all(_finite(path / UNET_WEIGHTS) for path in found)
    assert not (out / "model_index.json").exists()  # no export of a diverged run
    # The skipped updates left the weights as they were: the newest two checkpoints are equal.
    a, b = (load_file(p / UNET_WEIGHTS) for p in found[-2:])
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = checkpoints.read_trainer_state(found[-1])
    assert state["skipped_steps"] >= 1


# --- 2. damaged newest checkpoint -------------------------------------------------------------


def test_latest_skips_a_damaged_checkpoint(tiny_sd_dir, demo_assets, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    first = _args(
        tiny_sd_dir, demo_assets.instance_dir, out, "--max_train_steps", "4",
        "--checkpointing_steps", "2",
    )  # fmt: skip
    assert _run(first) == 0
    weights = out / "checkpoint-4" / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    named = [*first, "--resume_from_checkpoint", "checkpoint-4", "--max_train_steps", "6"]
    assert _run(named) == 2
    assert "checkpoint-4" in _one_line_error(capsys)

    latest = [*first, "--resume_from_checkpoint", "latest", "--max_train_steps", "6"]
    assert _run(latest) == 0
    assert "skipping damaged checkpoint-4" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-2 at step 2" in caplog.text
    assert not checkpoints.verify(out / "checkpoint-6")


# --- 3. a bad image ---------------------------------------------------------------------------


def test_a_truncated_image_is_found_before_step_1(tiny_sd_dir, tmp_path, capsys, caplog):
    images = _jpegs(tmp_path / "instance", 10)
    bad = images[6]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "out"
    args = _args(tiny_sd_dir, tmp_path / "instance", out, "--max_train_steps", "3")
    assert _run(args) == 2
    assert "06.jpg" in capsys.readouterr().err
    assert not checkpoints.list_checkpoints(out)
    # Allowed by the flag: the 9 others train, and the bad file is named once.
    assert _run([*args, "--max_bad_image_fraction", "0.2"]) == 0
    assert caplog.text.count("06.jpg") >= 1
    assert (out / "model_index.json").is_file()


# --- 4. a changed flag on resume --------------------------------------------------------------


def test_a_new_learning_rate_takes_effect_on_resume(tiny_sd_dir, demo_assets, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(
        tiny_sd_dir, demo_assets.instance_dir, out, "--max_train_steps", "2",
        "--checkpointing_steps", "1", "--lr_scheduler", "constant",
    )  # fmt: skip
    assert _run(args) == 0
    more = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    assert _run([*args, *more, "--learning_rate", "2e-4"]) == 0
    state = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert state["param_groups"][0]["lr"] == pytest.approx(2e-4)
    refused = [*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    assert _run([*refused, "--resolution", "32"]) == 2
    line = _one_line_error(capsys)
    assert "--resolution 64 -> 32" in line


# --- 5, 6. fp16 on a CPU, a full disk ---------------------------------------------------------


def test_fp16_on_a_cpu_is_a_config_error(tiny_sd_dir, demo_assets, tmp_path, capsys):
    args = _args(
        tiny_sd_dir, demo_assets.instance_dir, tmp_path / "out", "--mixed_precision", "fp16"
    )
    assert _run(args) == 2
    assert "--mixed_precision bf16" in _one_line_error(capsys)


def test_disk_full_names_the_folder_and_keeps_the_previous_checkpoint(
    tiny_sd_dir, demo_assets, tmp_path, capsys, monkeypatch
):
    from torchdiff import checkpoint as torch_checkpoint

    out = tmp_path / "out"
    args = _args(
        tiny_sd_dir, demo_assets.instance_dir, out, "--max_train_steps", "2",
        "--checkpointing_steps", "1",
    )  # fmt: skip
    real_save, calls = torch_checkpoint._torch_save, []

    def full_on_the_second_checkpoint(obj, path):
        calls.append(path)
        if "checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)

    monkeypatch.setattr(torch_checkpoint, "_torch_save", full_on_the_second_checkpoint)
    assert _run(args) == 2
    line = _one_line_error(capsys)
    assert str(out) in line and "free" in line
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-1"]
    assert not checkpoints.verify(out / "checkpoint-1")
    assert not list(out.glob("checkpoint-*.tmp"))


# --- 8. user errors: one line, exit 2 ---------------------------------------------------------


def test_user_errors_are_one_line(tiny_sd_dir, demo_assets, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("no images here")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    broken = tmp_path / "broken-sd"
    import shutil

    shutil.copytree(tiny_sd_dir, broken)
    weights = broken / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = {
        "empty folder": _args(tiny_sd_dir, empty, tmp_path / "o1"),
        "only non-image files": _args(tiny_sd_dir, junk, tmp_path / "o2"),
        "output dir is a file": _args(tiny_sd_dir, demo_assets.instance_dir, a_file),
        "truncated weights": _args(broken, demo_assets.instance_dir, tmp_path / "o3"),
    }
    expected = {
        "empty folder": str(empty),
        "only non-image files": str(junk),
        "output dir is a file": "--output_dir",
        "truncated weights": "unet",
    }
    for name, args in cases.items():
        assert _run([*args, "--max_train_steps", "1"]) == 2, name
        assert expected[name] in _one_line_error(capsys), name


def test_caption_errors_are_one_line(tiny_sd_dir, tmp_path, capsys):
    folder = tmp_path / "captioned"
    _jpegs(folder, 4)
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "00.jpg", "text": "a"}\n{"file_name": "01.jpg", "text": \n'
    )
    args = [
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--train_data_dir", str(folder),
        "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--train_batch_size", "1",
        "--max_train_steps", "1", "--report_to", "none",
    ]  # fmt: skip
    assert _run(args, text2image.main) == 2
    assert "metadata.jsonl" in _one_line_error(capsys)
    (folder / "metadata.jsonl").write_text(
        "".join(f'{{"file_name": "0{i}.jpg", "caption": "a"}}\n' for i in range(4))
    )
    assert _run(args, text2image.main) == 2
    assert "--caption_column" in _one_line_error(capsys)


# --- 9. the Hub is checked before step 1 ------------------------------------------------------


def test_push_to_hub_without_access_fails_before_training(
    tiny_sd_dir, demo_assets, tmp_path, capsys, monkeypatch
):
    import huggingface_hub

    from torchdiff import models

    class NoNetwork:
        def whoami(self, token=None):
            raise OSError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.setattr(models, "load_components", lambda cfg: pytest.fail("loaded the model"))
    args = _args(tiny_sd_dir, demo_assets.instance_dir, tmp_path / "out", "--push_to_hub")
    assert _run(args) == 2
    assert "--push_to_hub" in _one_line_error(capsys)


# --- 11. Ctrl-C and SIGTERM -------------------------------------------------------------------


def test_ctrl_c_in_training_checkpoints_and_exits_0(
    tiny_sd_dir, demo_assets, tmp_path, monkeypatch
):
    from torchdiff import memory

    out = tmp_path / "out"
    args = _args(
        tiny_sd_dir, demo_assets.instance_dir, out, "--max_train_steps", "4",
        "--checkpointing_steps", "10",
    )  # fmt: skip
    real_zero_grad, calls = memory.zero_grad, []

    def zero_grad_then_ctrl_c(optimizer, cfg):
        real_zero_grad(optimizer, cfg)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(memory, "zero_grad", zero_grad_then_ctrl_c)
    assert _run(args) == 0
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()


def test_sigterm_during_setup_says_so(tiny_sd_dir, demo_assets, tmp_path, capsys, monkeypatch):
    from torchdiff import models

    real_load = models.load_components

    def load_then_sigterm(cfg):
        components = real_load(cfg)
        os.kill(os.getpid(), signal.SIGTERM)
        return components

    monkeypatch.setattr(models, "load_components", load_then_sigterm)
    args = _args(tiny_sd_dir, demo_assets.instance_dir, tmp_path / "out", "--max_train_steps", "2")
    assert _run(args) == 143
    assert "stopped by SIGTERM before training started" in capsys.readouterr().err


# --- 13. no warnings a user cannot act on -----------------------------------------------------


def test_building_a_pipeline_prints_no_torchvision_or_kernels_warning():
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import torchdiff.trainer\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from transformers import CLIPImageProcessor\n"
        "print('built')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and "kernels" not in result.stderr, result.stderr
