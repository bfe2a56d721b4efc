"""flaxdiff.models.flax_msgpack: the old Flax msgpack weights (diffusers <= 0.39, transformers 4.x).

The fixture (tests/fixtures/flax_msgpack, written by its make_fixture.py with the real old
libraries) holds one tiny pipeline twice: ``pytorch/`` (safetensors) and ``flax/`` (the same
weights converted by ``FlaxUNet2DConditionModel.from_pretrained(..., from_pt=True)`` and friends and
saved by ``FlaxStableDiffusionPipeline.save_pretrained``). No torch is needed here.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx, serialization

from flaxdiff.models import convert, flax_msgpack, hub_files
from flaxdiff.models.layers import ModelOptions
from flaxdiff.models.state_dict import torch_state_dict
from shared.errors import ConfigError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "flax_msgpack"
FLAX, PYTORCH = FIXTURE / "flax", FIXTURE / "pytorch"
COMPONENTS = {
    "unet": ("UNet2DConditionModel", "diffusion_flax_model.msgpack"),
    "vae": ("AutoencoderKL", "diffusion_flax_model.msgpack"),
    "text_encoder": ("CLIPTextModel", "flax_model.msgpack"),
}


def assert_same_weights(got: nnx.Module, want: nnx.Module) -> None:
    """Same class, same parameter names, every array equal bit for bit (dtype included)."""
    assert type(got) is type(want)
    got_state, want_state = torch_state_dict(got), torch_state_dict(want)
    assert sorted(got_state) == sorted(want_state)
    for key, array in want_state.items():
        assert got_state[key].dtype == array.dtype, key
        assert got_state[key].tobytes() == array.tobytes(), key


@pytest.fixture(scope="module")
def pytorch_pipeline() -> convert.FlaxPipeline:
    return convert.from_diffusers(PYTORCH)


@pytest.fixture(scope="module")
def flax_pipeline() -> convert.FlaxPipeline:
    return convert.from_diffusers(FLAX)


def test_fixture_is_the_old_flax_layout():
    """What the tests below rely on: Flax class names, msgpack weights and nothing else."""
    index = json.loads((FLAX / "model_index.json").read_text())
    assert index["_class_name"] == "FlaxStableDiffusionPipeline"
    for name, (class_name, weights) in COMPONENTS.items():
        assert index[name][1] == f"Flax{class_name}"
        files = sorted(p.name for p in (FLAX / name).iterdir())
        assert files == ["config.json", weights]


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_msgpack_component_equals_its_safetensors_twin(name, pytorch_pipeline):
    """UNet (down_blocks_0, to_out_0, time_embedding/linear_1), VAE (query/proj_attn) and CLIP
    (text_model/encoder/layers/0) load bit for bit as from the PyTorch files."""
    model = convert.from_diffusers(FLAX, subfolder=name)
    assert type(model).__name__ == COMPONENTS[name][0]
    assert_same_weights(model, pytorch_pipeline[name])


def test_whole_msgpack_pipeline_converts_in_one_call(flax_pipeline, pytorch_pipeline):
    assert sorted(flax_pipeline.models) == sorted(COMPONENTS)
    for name in COMPONENTS:
        assert_same_weights(flax_pipeline[name], pytorch_pipeline[name])


def test_options_cast_the_msgpack_weights():
    model = convert.from_diffusers(
        FLAX, subfolder="text_encoder", options=ModelOptions(param_dtype="bfloat16")
    )
    dtypes = {a.dtype.name for a in torch_state_dict(model).values()}
    assert dtypes == {"bfloat16"}


def test_old_flax_configs_give_the_pytorch_architecture():
    """Early Flax config.json files name only the Flax dataclass fields; the fields they lack
    (norm groups and eps, activation, downsample padding...) were hard-coded in the Flax classes
    to the values the PyTorch defaults have, so the trimmed configs build the same models."""
    old_fields = {
        "unet": ("sample_size", "in_channels", "out_channels", "down_block_types",
                 "up_block_types", "block_out_channels", "layers_per_block",
                 "attention_head_dim", "cross_attention_dim", "dropout", "flip_sin_to_cos",
                 "freq_shift"),
        "vae": ("in_channels", "out_channels", "down_block_types", "up_block_types",
                "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
                "norm_num_groups", "sample_size"),
    }  # fmt: skip
    for name, fields in old_fields.items():
        full = json.loads((FLAX / name / "config.json").read_text())
        trimmed = {k: v for k, v in full.items() if k in fields or k.startswith("_")}
        assert len(trimmed) < len(full)
        assert convert.build_config(trimmed) == convert.build_config(full)


def test_pytorch_weights_win_over_msgpack(tmp_path):
    """A folder with both formats reads the PyTorch file, as diffusers does."""
    folder = shutil.copytree(FLAX / "unet", tmp_path / "unet")
    state = safetensors.numpy.load_file(PYTORCH / "unet" / "diffusion_pytorch_model.safetensors")
    state["conv_in.bias"] = -state["conv_in.bias"]
    safetensors.numpy.save_file(state, folder / "diffusion_pytorch_model.safetensors")
    model = convert.from_diffusers(folder)
    np.testing.assert_array_equal(np.asarray(model.conv_in.bias[...]), state["conv_in.bias"])
    assert flax_msgpack.weights_file(folder, stem="diffusion_pytorch_model") is None


def test_msgpack_has_no_variants():
    with pytest.raises(
        FileNotFoundError, match=r"diffusion_flax_model\.msgpack\), which come in no variants"
    ):
        convert.from_diffusers(FLAX, subfolder="unet", variant="fp16")


def _write_params(path: Path, params: dict) -> None:
    path.write_bytes(serialization.msgpack_serialize(params))


def test_weights_that_do_not_fit_name_the_file_and_the_linen_path(tmp_path):
    folder = shutil.copytree(FLAX / "vae", tmp_path / "vae")
    path = folder / "diffusion_flax_model.msgpack"
    params = serialization.msgpack_restore(path.read_bytes())
    del params["decoder"]["conv_out"]["bias"]
    params["decoder"]["mid_block"]["attentions_0"]["extra"] = {"kernel": np.zeros((2, 2))}
    _write_params(path, params)
    with pytest.raises(ValueError) as err:
        convert.from_diffusers(folder)
    message = str(err.value)
    assert str(path) in message
    assert "decoder.conv_out.bias" in message  # missing, by its PyTorch name
    assert "decoder/mid_block/attentions_0/extra/kernel" in message  # unexpected, as in the file


def test_a_weight_given_twice_is_unexpected(tmp_path):
    """The VAE attention under both its old and its new Linen name: neither is dropped silently."""
    folder = shutil.copytree(FLAX / "vae", tmp_path / "vae")
    path = folder / "diffusion_flax_model.msgpack"
    params = serialization.msgpack_restore(path.read_bytes())
    attention = params["encoder"]["mid_block"]["attentions_0"]
    attention["to_q"] = dict(attention["query"])
    _write_params(path, params)
    with pytest.raises(ValueError, match="unexpected: encoder/mid_block/attentions_0/"):
        convert.from_diffusers(folder)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    damaged = {
        "cut short": data[: len(data) // 2],
        "empty": b"",
        "extra bytes": data + b"\x00\x01",
        "not msgpack": b"<html>rate limited</html>",
        "lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
        "not a tree": serialization.msgpack_serialize([1, 2, 3]),
        "no arrays": serialization.msgpack_serialize({}),
    }[how]
    path.write_bytes(damaged)


@pytest.mark.parametrize(
    "how",
    ["cut short", "empty", "extra bytes", "not msgpack", "lfs pointer", "not a tree", "no arrays"],
)
def test_damaged_msgpack_is_a_one_line_config_error_naming_the_file(tmp_path, how):
    pipeline = shutil.copytree(FLAX, tmp_path / "sd")
    path = pipeline / "text_encoder" / "flax_model.msgpack"
    _damage(path, how)
    with pytest.raises(ConfigError) as err:
        convert.from_diffusers(pipeline)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert ("git lfs pull" if how == "lfs pointer" else "re-download") in message


class _Ambiguous(nnx.Module):
    """Parameters ``linear_1.*`` and ``linear.1.*``: both are ``linear_1`` in Linen names."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(2, 2, rngs=rngs)
        self.linear = nnx.List([nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 2, rngs=rngs)])


def test_names_linen_cannot_tell_apart_are_refused():
    with pytest.raises(ValueError, match="cannot tell apart") as err:
        flax_msgpack.linen_to_torch({}, _Ambiguous(nnx.Rngs(0)))
    assert "linear_1." in str(err.value) and "linear.1." in str(err.value)


def test_linen_layouts_become_pytorch_layouts():
    """Dense (in, out) -> (out, in), conv HWIO -> OIHW, norm scales and biases as they are."""
    unet = convert.init_model(
        json.loads((FLAX / "unet" / "config.json").read_text()), abstract=True
    )
    dense = np.arange(32 * 128, dtype=np.float32).reshape(32, 128)
    conv = np.arange(3 * 3 * 4 * 32, dtype=np.float32).reshape(3, 3, 4, 32)
    scale = np.arange(32, dtype=np.float32)
    state = flax_msgpack.linen_to_torch(
        {
            "time_embedding/linear_1/kernel": dense,
            "conv_in/kernel": conv,
            "conv_norm_out/scale": scale,
        },
        unet,
    )
    np.testing.assert_array_equal(state["time_embedding.linear_1.weight"], dense.T)
    np.testing.assert_array_equal(state["conv_in.weight"], conv.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state["conv_norm_out.weight"], scale)


def test_export_of_a_msgpack_pipeline_has_pytorch_class_names(tmp_path, flax_pipeline):
    """What the old Flax scripts' users continue from: exported, it is a PyTorch pipeline folder
    (diffusers >= 0.40 knows no Flax classes); a Flax-only safety checker is left out."""
    source = shutil.copytree(FLAX, tmp_path / "flax")
    checker = source / "safety_checker"
    checker.mkdir()
    (checker / "config.json").write_text("{}")
    (checker / "flax_model.msgpack").write_bytes(b"")
    index = json.loads((source / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "FlaxStableDiffusionSafetyChecker"]
    (source / "model_index.json").write_text(json.dumps(index))
    pipeline = convert.FlaxPipeline(models=flax_pipeline.models, folder=source, model_index=index)

    out = convert.to_diffusers(pipeline, tmp_path / "out")
    written = json.loads((out / "model_index.json").read_text())
    assert written["_class_name"] == "StableDiffusionPipeline"
    assert written["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert written["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert written["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert written["safety_checker"] == [None, None] and not (out / "safety_checker").exists()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    again = convert.from_diffusers(out)
    for name in COMPONENTS:
        assert_same_weights(again[name], flax_pipeline[name])


# A repo laid out like duongna/stable-diffusion-v1-4-flax: Flax weights only.
FLAX_REPO = [
    ".gitattributes", "README.md", "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/flax_model.msgpack",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_flax_model.msgpack",
    "vae/config.json", "vae/diffusion_flax_model.msgpack",
]  # fmt: skip
FLAX_INDEX = {
    "_class_name": "FlaxStableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
    "safety_checker": ["stable_diffusion", "FlaxStableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "FlaxPNDMScheduler"],
    "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"],
}


def _fetch(files, subfolder=None, variant=None):
    return sorted(hub_files.files_to_fetch(
        files, subfolder, variant=variant, read_index=lambda: FLAX_INDEX,
        is_model=convert.is_model_class,
    ))  # fmt: skip


def test_hub_selection_fetches_the_msgpack_weights_of_a_flax_only_repo():
    assert _fetch(FLAX_REPO) == sorted([
        "model_index.json",
        "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/flax_model.msgpack",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_flax_model.msgpack",
        "vae/config.json", "vae/diffusion_flax_model.msgpack",
    ])  # fmt: skip
    assert _fetch(FLAX_REPO, "unet") == ["unet/config.json", "unet/diffusion_flax_model.msgpack"]


def test_hub_selection_prefers_pytorch_weights_and_gives_msgpack_no_variant():
    both = [*FLAX_REPO, "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin"]
    assert _fetch(both, "unet") == ["unet/config.json", "unet/diffusion_pytorch_model.bin"]
    assert _fetch(FLAX_REPO, "vae", variant="fp16") == ["vae/config.json"]
