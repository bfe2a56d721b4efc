"""diffusers folders -> Flax -> diffusers folders: bit-exact weights, loadable by diffusers."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from parity_helpers import F32_REL, assert_parity, nchw_to_nhwc

from flaxdiff.models import convert
from flaxdiff.models.layers import ModelOptions
from shared import demo
from shared.errors import ConfigError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _model_configs(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]


def _torch_pipeline(tokenizer_dir: Path):
    """The tiny.yaml Stable Diffusion pipeline, random weights (seed 0)."""
    cfg = _model_configs("tiny")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(cfg["unet_config"])
    vae = diffusers.AutoencoderKL.from_config(cfg["vae_config"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text_encoder_config"]))
    return diffusers.StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=diffusers.DDPMScheduler.from_config(cfg["scheduler_config"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    tokenizer_dir = demo.write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    out = tmp_path_factory.mktemp("tiny-sd")
    _torch_pipeline(tokenizer_dir).save_pretrained(out)
    return out


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    """The weights of a component folder. CLIP keys lose their ``text_model.`` prefix:
    transformers 5 writes them without it, hub files (transformers 4) and flaxdiff with it, and
    both load either way."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        for key, value in safetensors_torch.load_file(f).items():
            out[key.removeprefix("text_model.")] = value.numpy()
    return out


def test_whole_pipeline_round_trip_is_bit_exact(sd_folder, tmp_path):
    pipe = convert.from_diffusers(sd_folder)
    assert set(pipe.models) == {"unet", "vae", "text_encoder"}
    out = convert.to_diffusers(pipe, tmp_path / "export")
    for name in ("unet", "vae", "text_encoder"):
        before, after = _tensors(sd_folder / name), _tensors(out / name)
        assert set(after) == set(before), name
        for key, value in before.items():
            assert after[key].dtype == value.dtype, key
            np.testing.assert_array_equal(after[key], value, err_msg=f"{name}/{key}")
    for name in ("tokenizer", "scheduler"):  # copied as files
        for f in (sd_folder / name).iterdir():
            assert (out / name / f.name).read_bytes() == f.read_bytes()
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["safety_checker"] == [None, None]


def test_export_loads_in_diffusers_and_computes_the_same(sd_folder, tmp_path):
    """A Flax model written by to_diffusers runs in diffusers exactly as the original did."""
    pipe = convert.from_diffusers(sd_folder)
    out = convert.to_diffusers(pipe, tmp_path / "export")
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(out)
    original = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 7, 32, generator=gen)
    with torch.no_grad():
        expected = original.unet(latents, 10, context).sample
        got = loaded.unet(latents, 10, context).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    ids = torch.tensor([[0, 5, 17, 2, 1, 1]])
    with torch.no_grad():
        text_expected = original.text_encoder(ids)
        text_got = loaded.text_encoder(ids)
    for field in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(text_got[field], text_expected[field], rtol=0, atol=0)
    # And the Flax UNet itself agrees with the torch one (float32).
    flax_out = pipe["unet"](
        jnp.asarray(nchw_to_nhwc(latents.numpy())), jnp.asarray([10]), jnp.asarray(context.numpy())
    )
    assert_parity(flax_out, nchw_to_nhwc(expected.numpy()), rel=F32_REL, what="loaded unet f32")


def test_one_component_by_subfolder_and_by_folder(sd_folder):
    unet = convert.from_diffusers(sd_folder, subfolder="unet")
    same = convert.from_diffusers(sd_folder / "unet")
    assert type(unet).__name__ == "UNet2DConditionModel"
    a = jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(unet)))
    b = jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(same)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    text = convert.from_diffusers(sd_folder, subfolder="text_encoder")
    assert type(text).__name__ == "CLIPTextModel"


def test_fp16_variant_loads_to_fp32_params_and_writes_back_exactly(sd_folder, tmp_path):
    half = diffusers.UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").half()
    half.save_pretrained(tmp_path / "unet", variant="fp16")
    model = convert.from_diffusers(tmp_path / "unet", variant="fp16")
    dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype("float32")}  # fp32 master weights whatever the file holds
    convert.to_diffusers(model, tmp_path / "again", dtype="float16")
    expected = {k: v.numpy() for k, v in half.state_dict().items()}
    got = _tensors(tmp_path / "again")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.float16
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_bin_weights_load_through_the_safe_loader(sd_folder, tmp_path):
    vae = diffusers.AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    model = convert.from_diffusers(tmp_path / "vae")
    exported = convert.torch_state_dict(model)
    for key, value in vae.state_dict().items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_mismatched_config_names_the_folder_and_keys(sd_folder, tmp_path):
    import shutil

    broken = Path(shutil.copytree(sd_folder / "unet", tmp_path / "unet"))
    config = json.loads((broken / "config.json").read_text())
    config["layers_per_block"] = 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weights in .*unet.*unexpected: .*down_blocks"):
        convert.from_diffusers(broken)


def test_unknown_model_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ValueError, match=r"UNet3DConditionModel.*torch backend"):
        convert.from_diffusers(tmp_path)


def test_unsupported_text_encoder_is_refused_by_the_shared_rule(tmp_path):
    # Neither backend trains T5: the message names the family, not "use the torch backend".
    config = {"architectures": ["T5EncoderModel"], "model_type": "t5"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'T5EncoderModel' \(DeepFloyd IF\) is not supported"):
        convert.from_diffusers(tmp_path)
    assert convert.class_name_of({"model_type": "clip_text_model"}) == "CLIPTextModel"


def test_export_replaces_a_model_and_keeps_the_rest(sd_folder, tmp_path):
    pipe = convert.from_diffusers(sd_folder)
    new_unet = convert.init_model(pipe["unet"].config, seed=7)
    out = convert.to_diffusers(pipe, tmp_path / "out", models={"unet": new_unet})
    written = _tensors(out / "unet")
    assert not np.array_equal(
        written["conv_in.weight"], _tensors(sd_folder / "unet")["conv_in.weight"]
    )
    for key, value in _tensors(sd_folder / "vae").items():
        np.testing.assert_array_equal(_tensors(out / "vae")[key], value)


def test_random_init_is_seeded_and_shaped_like_diffusers():
    cfg = _model_configs("tiny")["unet_config"]
    a = convert.init_model(cfg, seed=0)
    b = convert.init_model(cfg, seed=0)
    c = convert.init_model(cfg, seed=1)
    sa, sb, sc = (convert.torch_state_dict(m) for m in (a, b, c))
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["conv_in.weight"], sc["conv_in.weight"])
    reference = diffusers.UNet2DConditionModel.from_config(cfg).state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a conv weight.
    bound = 1 / np.sqrt(4 * 3 * 3)
    assert np.abs(sa["conv_in.weight"]).max() <= bound
    assert np.abs(sa["conv_in.weight"]).max() > 0.9 * bound


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        ("unet_config", 859_520_964),
        ("vae_config", 83_653_863),
        ("text_encoder_config", 123_060_480),
    ],
)
def test_sd15_parameter_counts_equal_diffusers(component, expected):
    """configs/models/sd15.yaml builds the SD 1.5 architecture (shapes only: no memory)."""
    cfg = _model_configs("sd15")[component]
    model = convert.init_model(cfg, options=ModelOptions(), abstract=True)
    assert convert.parameter_count(model) == expected
    with torch.device("meta"):
        if component == "text_encoder_config":
            reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))
        elif component == "vae_config":
            reference = diffusers.AutoencoderKL.from_config(cfg)
        else:
            reference = diffusers.UNet2DConditionModel.from_config(cfg)
    assert sum(p.numel() for p in reference.parameters()) == expected


def test_hub_ids_download_only_what_a_flax_load_reads(sd_folder, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_list(repo_id, revision=None):
        calls["list"] = (repo_id, revision)
        return [str(p.relative_to(sd_folder)) for p in sd_folder.rglob("*") if p.is_file()]

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls["snapshot"] = (repo_id, revision, sorted(allow_patterns))
        return str(sd_folder)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake_list)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = convert.from_diffusers("someone/tiny-sd", subfolder="vae", revision="main")
    assert type(model).__name__ == "AutoencoderKL"
    assert calls["list"] == ("someone/tiny-sd", "main")
    assert calls["snapshot"] == (
        "someone/tiny-sd",
        "main",
        ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
    )


def test_hub_file_selection_skips_checkpoints_variants_and_unused_models():
    """What a whole-pipeline download fetches from a repo laid out like SD 1.5's."""
    from flaxdiff.models import hub_files

    repo = [
        "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "README.md",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
        "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "safety_checker/config.json", "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    ]  # fmt: skip
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
    }

    def fetch(variant):
        return sorted(hub_files.files_to_fetch(
            repo, None, variant=variant, read_index=lambda: index,
            is_model=convert.MODEL_CLASSES.__contains__,
        ))  # fmt: skip

    assert fetch(None) == sorted([
        "model_index.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin",  # no safetensors there
        "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
    ])  # fmt: skip
    fp16 = fetch("fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "vae/diffusion_pytorch_model.fp16.bin" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16


def test_a_typo_in_a_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        convert.from_diffusers(str(tmp_path / "missing" / "model"))
