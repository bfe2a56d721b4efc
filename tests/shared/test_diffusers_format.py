"""shared.diffusers_format: model_index.json, component lookup, folder checks, crash-safe publish."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import diffusers_format as fmt

ROOT = Path(__file__).resolve().parents[2]
SD_COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", "DDPMScheduler"),
    "safety_checker": None,
}
FILES = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "merges.txt"),
    "scheduler": ("scheduler_config.json",),
}


def fake_pipeline(folder: Path, *, tag: str = "old", components=None) -> Path:
    """A pipeline folder whose files hold `tag` (no real weights: only the layout matters)."""
    components = SD_COMPONENTS if components is None else components
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in components.items():
        if entry is not None:
            (folder / name).mkdir()
            for file in FILES[name]:
                (folder / name / file).write_text(tag)
    fmt.write_model_index(
        folder,
        pipeline_class="StableDiffusionPipeline",
        components=components,
        extra={"requires_safety_checker": False},
    )
    return folder


def test_model_index_round_trip_in_diffusers_format(tmp_path):
    fmt.write_model_index(
        tmp_path,
        pipeline_class="StableDiffusionPipeline",
        components=SD_COMPONENTS,
        extra={"requires_safety_checker": False},
    )
    text = (tmp_path / fmt.MODEL_INDEX).read_text()
    index = fmt.read_model_index(tmp_path)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["_diffusers_version"] == importlib.metadata.version("diffusers")
    assert index["safety_checker"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["requires_safety_checker"] is False
    assert fmt.components_of(index) == SD_COMPONENTS
    assert os.listdir(tmp_path) == [fmt.MODEL_INDEX]  # no temp file left behind


def test_read_model_index_of_a_folder_without_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no model_index\.json"):
        fmt.read_model_index(tmp_path)


def test_resolve_component_local_folders(tmp_path):
    fake_pipeline(tmp_path / "sd")
    flag = "--pretrained_model_name_or_path"
    assert fmt.resolve_component(str(tmp_path / "sd"), "unet", flag=flag) == str(
        tmp_path / "sd" / "unet"
    )
    assert fmt.resolve_component(str(tmp_path / "sd" / "vae"), None, flag="--x") == str(
        tmp_path / "sd" / "vae"
    )
    with pytest.raises(FileNotFoundError, match=rf"{flag} .*sd has no image_encoder/ folder"):
        fmt.resolve_component(str(tmp_path / "sd"), "image_encoder", flag=flag)
    with pytest.raises(NotADirectoryError, match="is a file"):
        fmt.resolve_component(str(tmp_path / "sd" / fmt.MODEL_INDEX), "unet", flag=flag)


def test_resolve_component_hub_ids_and_paths(tmp_path, monkeypatch):
    flag = "--pretrained_model_name_or_path"
    for hub_id in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "gpt2", "org/model.v2_x"):
        assert fmt.resolve_component(hub_id, "unet", flag=flag) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    missing = [
        "/no/such/model",
        "./model",
        "../model",
        "~/no-such-model-folder",
        "outputs/run1",  # looks like a hub id, but outputs/ is here: a path with a typo
        "a/b/c",
        "my model",
    ]
    for path in missing:
        with pytest.raises(FileNotFoundError, match=rf"{flag} .*no such folder"):
            fmt.resolve_component(path, "unet", flag=flag)


def test_pipeline_kind(tmp_path):
    assert fmt.pipeline_kind(fake_pipeline(tmp_path / "sd")) == "latent"
    ddpm = {"unet": ("diffusers", "UNet2DModel"), "scheduler": ("diffusers", "DDPMScheduler")}
    assert fmt.pipeline_kind(fake_pipeline(tmp_path / "ddpm", components=ddpm)) == "unconditional"
    pixel = {k: v for k, v in SD_COMPONENTS.items() if k != "vae"}
    assert fmt.pipeline_kind(fake_pipeline(tmp_path / "if", components=pixel)) == "pixel_text"


def test_check_pipeline_folder_lists_problems(tmp_path):
    folder = fake_pipeline(tmp_path / "sd")
    assert fmt.check_pipeline_folder(folder, required=("unet", "vae", "scheduler")) == []
    assert fmt.check_pipeline_folder(folder, required=("safety_checker",)) == [
        "model_index.json names no safety_checker component"
    ]
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
        folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    )  # a variant still counts
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "scheduler" / "scheduler_config.json").unlink()
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "x.bin")
    for file in FILES["tokenizer"]:
        (folder / "tokenizer" / file).unlink()
    assert fmt.check_pipeline_folder(folder) == [  # in model_index.json's (sorted) order
        "scheduler/ has no scheduler_config.json",
        "text_encoder/ has no weights (model.safetensors)",
        "tokenizer/ has no tokenizer_config.json or vocab.json or tokenizer.json",
        "vae/ has no weights (diffusion_pytorch_model.safetensors)",
    ]
    os.rename(folder / "unet", tmp_path / "elsewhere")
    assert "unet/ is missing (named by model_index.json as UNet2DConditionModel)" in (
        fmt.check_pipeline_folder(folder)
    )
    assert fmt.check_pipeline_folder(tmp_path / "nothing") == [
        f"{tmp_path / 'nothing'} has no model_index.json (expected a diffusers pipeline folder "
        "with model_index.json, unet/, vae/, ...)"
    ]
    assert fmt.COMPONENT_WEIGHT_FILES["transformers"] == "model.safetensors"


def test_publish_replaces_components_and_removes_stale_ones(tmp_path):
    out = fake_pipeline(tmp_path / "run")
    (out / "checkpoint-10" / "unet").mkdir(parents=True)
    (out / "logs").mkdir()
    without_text_encoder = {**SD_COMPONENTS, "text_encoder": None}
    with fmt.staging_folder(out) as staging:
        assert staging.parent == out and staging.name.startswith(fmt.STAGING_PREFIX)
        fake_pipeline(staging, tag="new", components=without_text_encoder)
        installed = fmt.publish_pipeline(staging, out)
    assert installed == ["scheduler", "tokenizer", "unet", "vae"]
    assert not staging.exists()
    assert (out / "unet" / "config.json").read_text() == "new"
    assert not (out / "text_encoder").exists()  # left null by the new index: stale
    assert (out / "checkpoint-10" / "unet").is_dir() and (out / "logs").is_dir()
    assert fmt.read_model_index(out)["text_encoder"] == [None, None]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-10",
        "logs",
        "model_index.json",
        "scheduler",
        "tokenizer",
        "unet",
        "vae",
    ]


def test_publish_into_an_empty_folder(tmp_path):
    out = tmp_path / "fresh"
    with fmt.staging_folder(out) as staging:
        fake_pipeline(staging, tag="new")
        fmt.publish_pipeline(staging, out)
    assert fmt.check_pipeline_folder(out) == []


def test_failed_publish_puts_the_old_folders_back(tmp_path, monkeypatch):
    out = fake_pipeline(tmp_path / "run")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "_install_model_index", crash)
    with pytest.raises(OSError, match="disk full"), fmt.staging_folder(out) as staging:
        fake_pipeline(staging, tag="new", components={**SD_COMPONENTS, "text_encoder": None})
        fmt.publish_pipeline(staging, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_staging_folder_removes_leftovers_of_a_killed_export(tmp_path):
    leftover = tmp_path / f"{fmt.STAGING_PREFIX}dead"
    (leftover / "unet").mkdir(parents=True)
    with fmt.staging_folder(tmp_path) as staging:
        assert not leftover.exists() and staging.is_dir()
    assert list(tmp_path.iterdir()) == []


def test_module_imports_no_backend():
    code = (
        "import sys, shared.diffusers_format\n"
        "bad = {'torch', 'jax', 'flax', 'diffusers', 'transformers'} & "
        "{m.split('.')[0] for m in sys.modules}\n"
        "print(','.join(sorted(bad)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
