"""Tiny offline models for the torch backend's tests, built by code once per session.

``tiny_sd_dir`` and ``tiny_ddpm_dir`` are diffusers pipeline folders made the way a run makes
them (`load_components` from ``configs/models/tiny*.yaml``, then `save_pipeline`), so tests that
load "a pretrained model" load one twindiff wrote. Treat them as read-only: copy before editing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shared import cli, demo
from shared.config import TrainConfig
from shared.prompts import ClipTokenizer

ROOT = Path(__file__).resolve().parents[2]
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case torch was imported before tests/conftest.py set OMP

TINY_YAML = {
    "unconditional": ROOT / "configs" / "models" / "tiny-ddpm.yaml",
    "text2image": ROOT / "configs" / "models" / "tiny.yaml",
    "dreambooth": ROOT / "configs" / "models" / "tiny.yaml",
}


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The demo's tiny CLIP tokenizer (vocab 1000)."""
    return demo.write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def torch_config(tiny_tokenizer_dir, tmp_path_factory) -> Callable[..., TrainConfig]:
    """`make(task, *argv, tiny=True)`: a torch config of `task` that validates offline.

    `tiny=True` reads the task's tiny model YAML and names the tiny tokenizer; the data flags
    each task requires point at an empty folder (loading models never reads it).
    """
    data_dir = tmp_path_factory.mktemp("no-data")

    def make(task: str, *argv: str, tiny: bool = True) -> TrainConfig:
        args = ["--config", str(TINY_YAML[task])] if tiny else []
        if tiny and task != "unconditional":
            args += ["--tokenizer_name", str(tiny_tokenizer_dir)]
        if task == "dreambooth":
            args += ["--instance_data_dir", str(data_dir), "--instance_prompt", "a sks cat"]
        else:
            args += ["--train_data_dir", str(data_dir)]
        return cli.parse_args([*args, *argv], task=task, backend="torch")

    return make


@pytest.fixture(scope="session")
def tiny_sd_dir(torch_config, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A StableDiffusionPipeline folder of the tiny.yaml model (random weights, seed 0)."""
    from torchdiff.export import save_pipeline
    from torchdiff.models import load_components

    components = load_components(torch_config("text2image", "--seed", "0"))
    vocab = ClipTokenizer.from_pretrained(tiny_tokenizer_dir, subfolder=None).vocab_size
    assert vocab <= components.text_encoder.config.vocab_size, "tokenizer ids would overflow"
    out = tmp_path_factory.mktemp("tiny-sd")
    return save_pipeline(out, components, unet=components.unet, text_encoder=None)


@pytest.fixture(scope="session")
def tiny_ddpm_dir(torch_config, tmp_path_factory) -> Path:
    """A DDPMPipeline folder of the tiny-ddpm.yaml UNet2DModel (random weights, seed 0)."""
    from torchdiff.export import save_pipeline
    from torchdiff.models import load_components

    components = load_components(torch_config("unconditional", "--seed", "0"))
    out = tmp_path_factory.mktemp("tiny-ddpm")
    return save_pipeline(out, components, unet=components.unet, text_encoder=None)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> demo.DemoAssets:
    """All demo assets (tokenizer, instance/class images, captioned and digits folders)."""
    return demo.build_demo_assets(tmp_path_factory.mktemp("demo") / "assets")


@pytest.fixture
def sd_copy(tiny_sd_dir, tmp_path) -> Path:
    """An editable copy of `tiny_sd_dir`."""
    return Path(shutil.copytree(tiny_sd_dir, tmp_path / "sd-copy"))
