"""torchdiff.models and torchdiff.export: loading, random init, and folders diffusers loads."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from shared import config as C
from shared import diffusers_format as fmt
from shared.diffusers_format import check_pipeline_folder, read_model_index
from shared.errors import ConfigError
from shared.model_folders import DDPM_UNET_CONFIG, SUPPORTED_TEXT_ENCODERS
from shared.prompts import ClipTokenizer
from torchdiff import export
from torchdiff.export import save_model_folder, save_pipeline
from torchdiff.models import TEXT_ENCODERS, cast_frozen, freeze, load_components

WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert value.dtype == expected[key].dtype, key
        assert torch.equal(value, expected[key]), key


def assert_folder_weights(module: torch.nn.Module, folder: Path, part: str) -> None:
    assert_same_state(module, load_file(folder / part / WEIGHTS[part]))


@pytest.fixture(scope="module")
def loaded(torch_config, tiny_sd_dir):
    """Components loaded back from the tiny SD folder (shared: tests must not change them)."""
    return load_components(
        torch_config("text2image", "--pretrained_model_name_or_path", str(tiny_sd_dir), tiny=False)
    )


def test_load_components_from_folder_gives_the_saved_weights(loaded, tiny_sd_dir):
    assert loaded.base == str(tiny_sd_dir)
    assert Path(loaded.tokenizer_dir) == tiny_sd_dir / "tokenizer"
    assert type(loaded.unet) is diffusers.UNet2DConditionModel
    assert type(loaded.noise_scheduler) is diffusers.DDPMScheduler
    for part in WEIGHTS:
        assert_folder_weights(getattr(loaded, part), tiny_sd_dir, part)
    assert check_pipeline_folder(tiny_sd_dir, required=("unet", "vae", "text_encoder")) == []


def test_exported_tokenizer_gives_the_same_ids(tiny_sd_dir, tiny_tokenizer_dir):
    texts = ["a photo of sks cat, café", "", "DON'T worry: 42 東京"]
    original = ClipTokenizer.from_pretrained(tiny_tokenizer_dir, subfolder=None)(texts)
    exported = ClipTokenizer.from_pretrained(tiny_sd_dir)(texts)
    np.testing.assert_array_equal(exported.input_ids, original.input_ids)


def test_exported_stable_diffusion_folder_generates(tiny_sd_dir):
    pipeline = diffusers.DiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert type(pipeline) is diffusers.StableDiffusionPipeline
    assert pipeline.safety_checker is None
    generator = torch.Generator().manual_seed(0)
    images = pipeline(
        "a photo of sks cat", num_inference_steps=2, height=64, width=64,
        output_type="np", generator=generator,
    ).images  # fmt: skip
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_exported_ddpm_folder_samples(tiny_ddpm_dir):
    assert read_model_index(tiny_ddpm_dir)["_class_name"] == "DDPMPipeline"
    assert sorted(p.name for p in tiny_ddpm_dir.iterdir()) == [
        "model_index.json",
        "scheduler",
        "unet",
    ]
    pipeline = diffusers.DiffusionPipeline.from_pretrained(tiny_ddpm_dir)
    assert type(pipeline) is diffusers.DDPMPipeline
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    scheduler = json.loads((tiny_ddpm_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["num_train_timesteps"], scheduler["beta_schedule"]) == (1000, "linear")


def test_round_trip_is_bit_exact(loaded, tiny_sd_dir, tmp_path):
    out = save_pipeline(tmp_path, loaded, unet=loaded.unet, text_encoder=loaded.text_encoder)
    for part, name in WEIGHTS.items():
        original = load_file(tiny_sd_dir / part / name)
        assert_same_state(getattr(loaded, part), original)
        saved = load_file(out / part / name)
        assert saved.keys() == original.keys()
        assert all(torch.equal(saved[k], original[k]) for k in saved), part
    assert not list(tmp_path.glob(".export-tmp-*"))


def test_export_keeps_the_training_scheduler_config(loaded, tmp_path):
    # StableDiffusionPipeline.__init__ "fixes" steps_offset=0 and clip_sample=True; the export
    # must keep the schedule the model was trained with, and not touch the training scheduler.
    scheduler = diffusers.DDPMScheduler.from_config(
        loaded.noise_scheduler.config, steps_offset=0, clip_sample=True
    )
    components = dataclasses.replace(loaded, noise_scheduler=scheduler)
    save_pipeline(tmp_path, components, unet=loaded.unet, text_encoder=None)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    training = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert {k: v for k, v in saved.items() if not k.startswith("_")} == json.loads(
        json.dumps(training)
    )
    assert (saved["steps_offset"], saved["clip_sample"]) == (0, True)
    assert (scheduler.config.steps_offset, scheduler.config.clip_sample) == (0, True)


def test_export_upcasts_copies_and_leaves_the_training_module(loaded, tmp_path):
    unet = diffusers.UNet2DConditionModel.from_config(loaded.unet.config)
    unet.load_state_dict(loaded.unet.state_dict())
    text_encoder = transformers.CLIPTextModel(loaded.text_encoder.config)
    text_encoder.load_state_dict(loaded.text_encoder.state_dict())
    for model, part in ((unet, "unet"), (text_encoder, "text_encoder")):
        model.to(torch.bfloat16)
        save_model_folder(model, tmp_path / part)
        assert next(model.parameters()).dtype == torch.bfloat16
        saved = load_file(tmp_path / part / WEIGHTS[part])
        assert_same_state(copy.deepcopy(model).float(), saved)
        assert_same_state(type(model).from_pretrained(tmp_path / part), saved)


def test_skip_save_text_encoder_writes_a_null_entry_and_drops_the_old_folder(loaded, sd_copy):
    (sd_copy / "checkpoint-2").mkdir()  # a run's other contents are never touched
    save_pipeline(sd_copy, loaded, unet=loaded.unet, text_encoder=None, save_text_encoder=False)
    assert read_model_index(sd_copy)["text_encoder"] == [None, None]
    assert not (sd_copy / "text_encoder").exists()
    assert (sd_copy / "checkpoint-2").is_dir() and (sd_copy / "tokenizer").is_dir()
    # As with diffusers' --skip_save_text_encoder, the text encoder is then given at load time.
    with pytest.raises(ValueError, match="text_encoder"):
        diffusers.DiffusionPipeline.from_pretrained(sd_copy)
    pipeline = diffusers.DiffusionPipeline.from_pretrained(
        sd_copy, text_encoder=loaded.text_encoder
    )
    assert pipeline.text_encoder is loaded.text_encoder


def test_pretrained_vae_replaces_the_base_vae(torch_config, loaded, sd_copy, tmp_path):
    other = diffusers.AutoencoderKL.from_pretrained(sd_copy / "vae")
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1.0)
    save_model_folder(other, tmp_path / "other-vae")
    shutil.rmtree(sd_copy / "vae")  # not needed when --pretrained_vae_name_or_path is given
    cfg = torch_config(
        "text2image",
        "--pretrained_model_name_or_path", str(sd_copy),
        "--pretrained_vae_name_or_path", str(tmp_path / "other-vae"),
        tiny=False,
    )  # fmt: skip
    assert_same_state(load_components(cfg).vae, other.state_dict())


def test_pretrained_vae_folder_of_the_base(torch_config, tiny_sd_dir):
    cfg = torch_config(
        "dreambooth",
        "--pretrained_model_name_or_path", str(tiny_sd_dir),
        "--pretrained_vae_name_or_path", str(tiny_sd_dir / "vae"),
        tiny=False,
    )  # fmt: skip
    assert_folder_weights(load_components(cfg).vae, tiny_sd_dir, "vae")


def test_prediction_type_lands_in_the_scheduler_config(torch_config, tiny_sd_dir, tmp_path):
    cfg = torch_config(
        "text2image",
        "--pretrained_model_name_or_path", str(tiny_sd_dir),
        "--prediction_type", "v_prediction",
        tiny=False,
    )  # fmt: skip
    components = load_components(cfg)
    assert components.noise_scheduler.config.prediction_type == "v_prediction"
    save_pipeline(tmp_path, components, unet=components.unet, text_encoder=None)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("missing", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_folder_names_the_flag(torch_config, sd_copy, missing):
    shutil.rmtree(sd_copy / missing)
    cfg = torch_config("text2image", "--pretrained_model_name_or_path", str(sd_copy), tiny=False)
    with pytest.raises(
        FileNotFoundError, match=rf"--pretrained_model_name_or_path .* no {missing}/"
    ):
        load_components(cfg)


@pytest.mark.parametrize("path", ["/nonexistent/tiny-sd", "./no-such-folder", "~/no-such-folder"])
def test_nonexistent_path_is_not_taken_for_a_hub_id(torch_config, path):
    cfg = torch_config("text2image", "--pretrained_model_name_or_path", path, tiny=False)
    with pytest.raises(
        FileNotFoundError, match=r"--pretrained_model_name_or_path .*no such folder"
    ):
        load_components(cfg)


def test_t5_text_encoder_is_refused(torch_config, sd_copy):
    config_path = sd_copy / "text_encoder" / "config.json"
    te_config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**te_config, "architectures": ["T5EncoderModel"]}))
    cfg = torch_config("text2image", "--pretrained_model_name_or_path", str(sd_copy), tiny=False)
    with pytest.raises(ConfigError, match=r"T5EncoderModel.*DeepFloyd IF.*not supported"):
        load_components(cfg)


def test_every_supported_text_encoder_has_a_torch_class():
    assert sorted(TEXT_ENCODERS) == sorted(SUPPORTED_TEXT_ENCODERS)
    assert TEXT_ENCODERS["CLIPTextModel"] is transformers.CLIPTextModel


def one_line_config_error(cfg) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_components(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--pretrained_model_name_or_path ")
    assert info.value.__cause__ is not None  # the loader's own error stays chained
    return info.value


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_truncated_weights_name_the_file_and_the_fix(torch_config, sd_copy, part, keep):
    weights = sd_copy / part / WEIGHTS[part]
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    cfg = torch_config("text2image", "--pretrained_model_name_or_path", str(sd_copy), tiny=False)
    error = one_line_config_error(cfg)
    assert f"{part}/{WEIGHTS[part]} is damaged" in str(error)
    assert "re-download or re-export the model" in str(error)
    # diffusers wraps safetensors' error in an OSError, transformers raises it as it is.
    chain, cause = [], error.__cause__
    while cause is not None:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    assert "SafetensorError" in chain


@pytest.mark.parametrize(
    "config_file", ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
)
def test_malformed_config_json_names_the_file(torch_config, sd_copy, config_file):
    path = sd_copy / config_file
    path.write_text(path.read_text()[:-20])  # cut mid-way, as an interrupted download
    cfg = torch_config("text2image", "--pretrained_model_name_or_path", str(sd_copy), tiny=False)
    error = one_line_config_error(cfg)
    assert f"{config_file} is damaged (it is not valid JSON" in str(error)
    assert isinstance(error.__cause__, OSError)  # diffusers' error, with the JSONDecodeError


def test_malformed_text_encoder_config_names_the_file(torch_config, sd_copy):
    path = sd_copy / "text_encoder" / "config.json"
    path.write_text("{")
    cfg = torch_config("text2image", "--pretrained_model_name_or_path", str(sd_copy), tiny=False)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))} is not valid JSON .*re-download"
    ) as info:
        load_components(cfg)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_truncated_separate_vae_names_its_flag(torch_config, sd_copy, tiny_sd_dir, tmp_path):
    vae = Path(shutil.copytree(tiny_sd_dir / "vae", tmp_path / "vae"))
    weights = vae / WEIGHTS["vae"]
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = torch_config(
        "text2image",
        "--pretrained_model_name_or_path", str(sd_copy),
        "--pretrained_vae_name_or_path", str(vae),
        tiny=False,
    )  # fmt: skip
    pattern = rf"^--pretrained_vae_name_or_path {re.escape(str(vae))}: {WEIGHTS['vae']} is damaged"
    with pytest.raises(ConfigError, match=pattern):
        load_components(cfg)


def test_other_load_errors_are_not_taken_for_damage(torch_config, sd_copy, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", offline)
    cfg = torch_config("text2image", "--pretrained_model_name_or_path", str(sd_copy), tiny=False)
    with pytest.raises(OSError, match="couldn't connect") as info:
        load_components(cfg)
    assert not isinstance(info.value, ConfigError)


def test_missing_model_configs_give_both_fixes(torch_config, tiny_tokenizer_dir):
    tiny = torch_config("text2image")
    values = {
        "train_data_dir": tiny.data.train_data_dir,
        "tokenizer_name": str(tiny_tokenizer_dir),
        "unet_config": C.thaw(tiny.model.unet_config),
        "vae_config": C.thaw(tiny.model.vae_config),
        "text_encoder_config": C.thaw(tiny.model.text_encoder_config),
    }
    cfg = C.build("text2image", "torch", values)  # no scheduler_config
    with pytest.raises(
        ValueError, match=r"--pretrained_model_name_or_path.*configs/models/tiny\.yaml"
    ):
        load_components(cfg)
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        torch_config("text2image", tiny=False)  # nothing at all: refused when the config is built


def test_random_init_is_seeded_and_leaves_the_global_rng(torch_config):
    rng = torch.random.get_rng_state()
    first = load_components(torch_config("unconditional", "--seed", "3"))
    again = load_components(torch_config("unconditional", "--seed", "3"))
    other = load_components(torch_config("unconditional", "--seed", "4"))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_same_state(again.unet, first.unet.state_dict())
    assert not torch.equal(other.unet.conv_in.weight, first.unet.conv_in.weight)
    assert (first.vae, first.text_encoder, first.tokenizer_dir) == (None, None, None)


@pytest.mark.parametrize("form", ["json file", "folder"])
def test_model_config_name_or_path_builds_the_unet(torch_config, tmp_path, form):
    unet_config = C.thaw(torch_config("unconditional").model.unet_config)
    path = tmp_path / ("unet.json" if form == "json file" else "config.json")
    path.write_text(json.dumps(unet_config))
    given = path if form == "json file" else tmp_path
    cfg = torch_config(
        "unconditional", "--model_config_name_or_path", str(given),
        "--ddpm_num_steps", "50", "--ddpm_beta_schedule", "squaredcos_cap_v2",
        "--prediction_type", "sample", tiny=False,
    )  # fmt: skip
    components = load_components(cfg)
    assert type(components.unet) is diffusers.UNet2DModel
    assert tuple(components.unet.config.block_out_channels) == (32, 64)
    scheduler = components.noise_scheduler.config
    assert (scheduler.num_train_timesteps, scheduler.beta_schedule, scheduler.prediction_type) == (
        50,
        "squaredcos_cap_v2",
        "sample",
    )


def test_builtin_ddpm_unet_of_train_unconditional(torch_config):
    cfg = torch_config("unconditional", "--resolution", "128", tiny=False)
    with torch.device("meta"):  # the 114M-parameter UNet's shapes, without its init time
        unet = load_components(cfg).unet
    assert unet.config.sample_size == 128
    for key, value in DDPM_UNET_CONFIG.items():
        built = unet.config[key]
        assert (tuple(built) if isinstance(built, list) else built) == value, key


def test_freeze_and_cast_frozen(torch_config):
    components = load_components(torch_config("dreambooth"))
    freeze(components.vae)
    assert not any(p.requires_grad for p in components.vae.parameters())
    assert not components.vae.training
    cast_frozen(components, torch.bfloat16, "cpu", train_text_encoder=False)
    assert next(components.vae.parameters()).dtype == torch.bfloat16
    assert next(components.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(components.unet.parameters()).dtype == torch.float32
    cast_frozen(components, torch.bfloat16, "cpu", train_text_encoder=True)
    assert next(components.text_encoder.parameters()).dtype == torch.float32


def test_interrupted_export_leaves_the_previous_one_loadable(loaded, sd_copy, monkeypatch):
    before = (sd_copy / "model_index.json").read_bytes()
    unet = diffusers.UNet2DConditionModel.from_config(loaded.unet.config)  # other weights

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed after the staging write")

    monkeypatch.setattr(export, "publish_pipeline", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pipeline(sd_copy, loaded, unet=unet, text_encoder=None, save_text_encoder=False)
    monkeypatch.undo()

    # Also a crash mid-publish, after the folders were swapped: they are swapped back.
    monkeypatch.setattr(fmt, "_install_model_index", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pipeline(sd_copy, loaded, unet=unet, text_encoder=None, save_text_encoder=False)
    monkeypatch.undo()

    assert (sd_copy / "model_index.json").read_bytes() == before
    assert not list(sd_copy.glob(".export-tmp-*"))
    assert check_pipeline_folder(sd_copy, required=("unet", "vae", "text_encoder")) == []
    for part in WEIGHTS:
        assert_folder_weights(getattr(loaded, part), sd_copy, part)
    assert (
        type(diffusers.DiffusionPipeline.from_pretrained(sd_copy))
        is diffusers.StableDiffusionPipeline
    )
