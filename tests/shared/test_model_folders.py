"""shared.model_folders: the model-folder and model-config rules both backends follow (no torch)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from shared import cli, demo
from shared import model_folders as mf
from shared.config import thaw
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "models" / "tiny.yaml"
TINY_DDPM = ROOT / "configs" / "models" / "tiny-ddpm.yaml"
UNET_JSON = {"_class_name": "UNet2DModel", "block_out_channels": [32, 64], "sample_size": 16}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return demo.write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))  # vocab 1000


def text2image(tmp_path, *argv):
    return cli.parse_args(
        ["--train_data_dir", str(tmp_path), *argv], task="text2image", backend="torch"
    )


def unconditional(tmp_path, *argv):
    return cli.parse_args(
        ["--train_data_dir", str(tmp_path), *argv], task="unconditional", backend="flax"
    )


def pipeline_folder(root: Path, tokenizer: Path) -> Path:
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        (root / sub).mkdir(parents=True)
    (root / "tokenizer").symlink_to(tokenizer, target_is_directory=True)
    return root


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_name_folder_is_used_as_it_is(tmp_path, tokenizer):
    cfg = text2image(tmp_path, "--config", str(TINY), "--tokenizer_name", str(tokenizer))
    assert mf.tokenizer_dir(cfg) == str(tokenizer)


def test_tokenizer_name_of_a_pipeline_folder_reads_its_tokenizer(tmp_path, tokenizer):
    base = pipeline_folder(tmp_path / "sd", tokenizer)
    cfg = text2image(tmp_path, "--config", str(TINY), "--tokenizer_name", str(base))
    assert mf.tokenizer_dir(cfg) == str(base / "tokenizer")


def test_base_model_tokenizer_without_tokenizer_name(tmp_path, tokenizer):
    base = pipeline_folder(tmp_path / "sd", tokenizer)
    cfg = text2image(tmp_path, "--pretrained_model_name_or_path", str(base))
    assert mf.tokenizer_dir(cfg) == str(base / "tokenizer")
    (base / "tokenizer").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"--pretrained_model_name_or_path .* no tokenizer/"
    ):
        mf.tokenizer_dir(cfg)


def test_no_tokenizer_and_no_base_names_both_fixes(tmp_path, tokenizer):
    cfg = text2image(tmp_path, "--config", str(TINY), "--tokenizer_name", str(tokenizer))
    # The config's own checks refuse this combination; a caller bypassing them gets the same fix.
    model = dataclasses.replace(cfg.model, tokenizer_name=None)
    cfg = types.SimpleNamespace(task=cfg.task, model=model, data=cfg.data)
    with pytest.raises(
        ConfigError, match=r"--pretrained_model_name_or_path needs --tokenizer_name"
    ):
        mf.tokenizer_dir(cfg)


def test_check_vocab_refuses_ids_the_text_encoder_cannot_embed(tokenizer):
    mf.check_vocab(str(tokenizer), 1000)
    mf.check_vocab(str(tokenizer), 49408)
    with pytest.raises(ConfigError, match=r"has 1000 tokens .* embeds only 999.* >= 1000$"):
        mf.check_vocab(str(tokenizer), 999)


# --- model configs ------------------------------------------------------------------------------


def test_builtin_ddpm_unet_takes_the_resolution(tmp_path):
    config = mf.unconditional_unet_config(unconditional(tmp_path, "--resolution", "128"))
    assert config == {**mf.DDPM_UNET_CONFIG, "sample_size": 128}
    assert config["block_out_channels"] == (128, 128, 256, 256, 512, 512)
    assert config["down_block_types"][4] == "AttnDownBlock2D"
    with pytest.raises(TypeError):
        mf.DDPM_UNET_CONFIG["in_channels"] = 1  # a module constant no caller may change


def test_unet_config_of_the_model_yaml_comes_first(tmp_path):
    (tmp_path / "unet.json").write_text(json.dumps(UNET_JSON))
    cfg = unconditional(
        tmp_path, "--config", str(TINY_DDPM), "--model_config_name_or_path", "unet.json"
    )
    expected = {k: v for k, v in thaw(cfg.model.unet_config).items() if k != "_class_name"}
    assert mf.unconditional_unet_config(cfg) == expected
    assert expected["block_out_channels"] == [32, 64] and expected["norm_num_groups"] == 16


@pytest.mark.parametrize("form", ["file", "folder"])
def test_model_config_name_or_path_is_read_as_json(tmp_path, form):
    path = tmp_path / ("unet.json" if form == "file" else "config.json")
    path.write_text(json.dumps(UNET_JSON))
    given = path if form == "file" else tmp_path
    cfg = unconditional(tmp_path, "--model_config_name_or_path", str(given))
    assert mf.unconditional_unet_config(cfg) == {"block_out_channels": [32, 64], "sample_size": 16}


def test_model_config_hub_id_downloads_its_config_json(tmp_path, monkeypatch):
    (tmp_path / "downloaded.json").write_text(json.dumps(UNET_JSON))
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / "downloaded.json")

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download)
    )
    cfg = unconditional(
        tmp_path,
        "--model_config_name_or_path", "google/ddpm-cifar10-32",
        "--cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert mf.unconditional_unet_config(cfg)["sample_size"] == 16
    assert calls == [
        ("google/ddpm-cifar10-32", "config.json", {"cache_dir": str(tmp_path / "cache")})
    ]


def test_model_config_errors_name_the_flag_or_file(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = unconditional(tmp_path, "--model_config_name_or_path", str(tmp_path / "empty"))
    with pytest.raises(
        ConfigError, match=r"^--model_config_name_or_path .*empty has no config.json"
    ):
        mf.unconditional_unet_config(cfg)

    (tmp_path / "cond.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    cfg = unconditional(tmp_path, "--model_config_name_or_path", str(tmp_path / "cond.json"))
    with pytest.raises(
        ConfigError, match=r"describes a UNet2DConditionModel, .* needs a UNet2DModel"
    ):
        mf.unconditional_unet_config(cfg)

    (tmp_path / "cut.json").write_text(json.dumps(UNET_JSON)[:-5])
    cfg = unconditional(tmp_path, "--model_config_name_or_path", str(tmp_path / "cut.json"))
    with pytest.raises(ConfigError, match=r"cut\.json is not valid JSON .*re-download") as info:
        mf.unconditional_unet_config(cfg)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)

    cfg = unconditional(tmp_path, "--model_config_name_or_path", "./no-such.json")
    with pytest.raises(FileNotFoundError, match=r"--model_config_name_or_path \./no-such\.json"):
        mf.unconditional_unet_config(cfg)


def test_read_config_file_refuses_a_json_that_is_not_an_object(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json holds a JSON list, not a config object"):
        mf.read_config_file(tmp_path / "list.json")


def test_check_class_drops_the_class_name_and_leaves_the_input():
    config = {"_class_name": "AutoencoderKL", "latent_channels": 4}
    assert mf.check_class(config, "AutoencoderKL", "vae_config") == {"latent_channels": 4}
    assert config["_class_name"] == "AutoencoderKL"
    assert mf.check_class({"a": 1}, "AutoencoderKL", "vae_config") == {"a": 1}
    with pytest.raises(ConfigError, match=r"^vae_config describes a UNet2DModel, .*AutoencoderKL"):
        mf.check_class({"_class_name": "UNet2DModel"}, "AutoencoderKL", "vae_config")


@pytest.mark.parametrize(
    "config",
    [{"architectures": ["CLIPTextModel"]}, {"model_type": "clip_text_model"}],
    ids=["architectures", "model_type"],
)
def test_clip_text_encoders_are_supported(config):
    assert mf.text_encoder_class_name(config, "text_encoder_config") == "CLIPTextModel"


@pytest.mark.parametrize(
    ("architecture", "family"),
    [
        ("T5EncoderModel", "DeepFloyd IF"),
        ("RobertaSeriesModelWithTransformation", "AltDiffusion"),
        ("CLIPTextModelWithProjection", "SDXL's second text encoder"),
    ],
)
def test_other_text_encoders_are_refused_by_family(architecture, family):
    config = {"architectures": [architecture], "model_type": "clip_text_model"}
    with pytest.raises(ConfigError) as info:
        mf.text_encoder_class_name(config, "--pretrained_model_name_or_path m")
    message = str(info.value)
    assert message.startswith(f"--pretrained_model_name_or_path m: text encoder architecture '{architecture}' ({family}) is not supported")  # fmt: skip
    assert message.endswith("one of: CLIPTextModel") and "\n" not in message


def test_unknown_text_encoder_is_refused_without_a_family():
    with pytest.raises(ConfigError, match=r"^te: text encoder architecture None is not supported"):
        mf.text_encoder_class_name({"model_type": "bert"}, "te")


def test_prediction_type_flag_then_scheduler_then_epsilon(tmp_path):
    scheduler = {"prediction_type": "v_prediction"}
    plain = text2image(tmp_path, "--pretrained_model_name_or_path", "m")
    flagged = text2image(tmp_path, "--pretrained_model_name_or_path", "m",
                         "--prediction_type", "epsilon")  # fmt: skip
    assert mf.prediction_type(flagged, scheduler) == "epsilon"
    assert mf.prediction_type(plain, scheduler) == "v_prediction"
    assert mf.prediction_type(plain, {}) == "epsilon"
    assert mf.prediction_type(plain, {"prediction_type": None}) == "epsilon"


# --- latents ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_latents_are_shifted_then_scaled_and_back(dtype):
    z = np.array([[-1.5, 0.0, 0.25], [2.0, 3.75, -0.5]], dtype=dtype)
    latents = mf.to_latents(z, scaling_factor=0.5, shift_factor=0.25)
    assert latents.dtype == dtype  # Python floats never upcast the array
    np.testing.assert_array_equal(latents, np.array([[-0.875, -0.125, 0], [0.875, 1.75, -0.375]]))
    back = mf.from_latents(latents, scaling_factor=0.5, shift_factor=0.25)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, z)  # exact: powers of two


def test_no_shift_factor_is_a_zero_shift():
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    latents = mf.to_latents(z, scaling_factor=0.18215, shift_factor=None)
    np.testing.assert_array_equal(latents, z * np.float32(0.18215))
    np.testing.assert_array_equal(
        latents, mf.to_latents(z, scaling_factor=0.18215, shift_factor=0.0)
    )
    np.testing.assert_array_equal(
        mf.from_latents(latents, scaling_factor=0.18215, shift_factor=None),
        latents / np.float32(0.18215),
    )
    # SD3/Flux-style shift: decoding undoes encoding to float32 rounding.
    sd3 = mf.to_latents(z, scaling_factor=1.5305, shift_factor=0.0609)
    back = mf.from_latents(sd3, scaling_factor=1.5305, shift_factor=0.0609)
    np.testing.assert_allclose(back, z, rtol=0, atol=1e-6)


# --- damaged files ------------------------------------------------------------------------------


def weights_file(path: Path) -> Path:
    save_file(
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}, path
    )
    return path


def test_intact_safetensors_has_no_problem(tmp_path):
    assert mf.safetensors_problem(weights_file(tmp_path / "w.safetensors")) is None
    save_file({}, tmp_path / "empty.safetensors")
    assert mf.safetensors_problem(tmp_path / "empty.safetensors") is None


def test_truncated_safetensors_is_cut_short(tmp_path):
    path = weights_file(tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    size = len(data) - 3
    assert mf.safetensors_problem(path) == (
        f"it is {size} bytes but its tensors end at byte {len(data)}: it was cut short"
    )
    path.write_bytes(data[:20])  # inside the header
    assert mf.safetensors_problem(path) == (
        f"it is 20 bytes, shorter than its {int.from_bytes(data[:8], 'little')}-byte header: "
        "it was cut short"
    )
    path.write_bytes(data[:5])
    assert mf.safetensors_problem(path) == "it is 5 bytes, too short for a safetensors header"


def test_safetensors_with_a_bad_header_or_extra_bytes(tmp_path):
    path = weights_file(tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data + b"\0\0")
    assert mf.safetensors_problem(path) == (
        f"it is {len(data) + 2} bytes but its tensors end at byte {len(data)}"
    )
    path.write_bytes(data[:8] + b"!" + data[9:])  # the header's opening brace
    assert mf.safetensors_problem(path) == "its header is not a valid safetensors header"
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    assert mf.safetensors_problem(path) == "its header is not a valid safetensors header"


def test_damaged_file_finds_configs_and_weights_only(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(UNET_JSON))
    weights = weights_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not checked")
    (folder / "sub").mkdir()
    assert mf.damaged_file(folder) is None
    assert mf.damaged_file(tmp_path / "missing") is None
    weights.write_bytes(weights.read_bytes()[:-1])
    path, why = mf.damaged_file(folder)
    assert path == weights and why.endswith("it was cut short")
    (folder / "config.json").write_text("{")
    path, why = mf.damaged_file(folder)  # name order: config.json first
    assert path == folder / "config.json" and why.startswith("it is not valid JSON: Expecting")


def test_damaged_component_message_names_the_file_flag_and_fix(tmp_path):
    folder = tmp_path / "sd" / "unet"
    folder.mkdir(parents=True)
    weights = weights_file(folder / "diffusion_pytorch_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:30])
    flag, source = "--pretrained_model_name_or_path", str(tmp_path / "sd")
    message = mf.damaged_component_message(flag, source, "unet", local=str(folder), detail="x")
    assert message.startswith(f"{flag} {source}: unet/diffusion_pytorch_model.safetensors is damaged (it is 30 bytes")  # fmt: skip
    assert message.endswith("; re-download or re-export the model")
    weights.unlink()  # the damaged file is not found: the loader's words, on one line
    message = mf.damaged_component_message(
        flag, source, "unet", local=str(folder), detail="Error while\n deserializing header"
    )
    assert message == (
        f"{flag} {source}: a file of {folder} is damaged or incomplete (Error while deserializing "
        "header); re-download or re-export the model"
    )
    message = mf.damaged_component_message(flag, "org/model", "vae", local=None, detail="cut")
    assert message == (
        f"{flag} org/model: a file of its vae/ in the Hugging Face cache (--cache_dir) is damaged "
        "or incomplete (cut); delete that copy from the cache and load again, or re-export the model"
    )
