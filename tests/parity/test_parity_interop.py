"""The output folder of one backend is where the other one starts: torchdiff -> flaxdiff and
flaxdiff -> torchdiff, through the real entry points (`<backend>.<task>.main(argv)`) on tiny
offline models and data.

DreamBooth: a short torchdiff run exports a diffusers folder; flaxdiff trains on from it
(`--pretrained_model_name_or_path`): the weights its trainer starts from are the torch export's
bit for bit, its losses are finite, its export changed the UNet, and torchdiff trains on from
that export in turn. Unconditional training starts from a random init on both backends (as
diffusers' `train_unconditional.py`: the task has no `--pretrained_model_name_or_path`), so there
the export of one backend is read by the other's model loader (weights bit for bit) and its
architecture (`--model_config_name_or_path <export>/unet`) trains on the other backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import training_pair as pair  # noqa: E402

from shared import cli, demo  # noqa: E402

pytestmark = pytest.mark.slow

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> demo.DemoAssets:
    return demo.build_demo_assets(tmp_path_factory.mktemp("assets") / "assets", digits_limit=16)


def run_main(main, argv: list[str], out: Path) -> list[float]:
    """Runs an entry point; returns its losses (train_summary.json), checked finite."""
    assert cli.run_main(lambda: main(argv)) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    losses = summary["losses"]
    assert summary["skipped_steps"] == 0 and len(losses) == summary["steps"]
    assert all(math.isfinite(x) for x in losses), losses
    return losses


def assert_same_weights(flax_model, folder: Path, subfolder: str) -> None:
    """The flax model's weights, in torch layout, equal the folder's safetensors bit for bit."""
    from flaxdiff.models.state_dict import torch_state_dict

    stem = "model" if subfolder == "text_encoder" else "diffusion_pytorch_model"
    # CLIP's files name its weights with or without the "text_model." prefix (transformers 4
    # or 5); flaxdiff's names keep it.
    saved = {
        k.removeprefix("text_model."): v
        for k, v in load_file(folder / subfolder / f"{stem}.safetensors").items()
    }
    loaded = {k.removeprefix("text_model."): v for k, v in torch_state_dict(flax_model).items()}
    missing = set(saved) - set(loaded)
    assert not missing, sorted(missing)[:8]
    for key, value in saved.items():
        assert np.array_equal(loaded[key], value), f"{subfolder} {key} differs from {folder}"


def dreambooth_argv(assets, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base),
        "--instance_data_dir", str(assets.instance_dir),
        "--instance_prompt", assets.instance_prompt,
        "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "2",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--train_text_encoder",
        "--report_to", "none", "--output_dir", str(out), "--seed", "0", *extra,
    ]  # fmt: skip


def test_dreambooth_torch_to_flax_to_torch(assets, tmp_path):
    from flaxdiff import dreambooth as flax_dreambooth
    from flaxdiff.components import load_components as flax_components
    from flaxdiff.models.layers import ModelOptions
    from torchdiff import dreambooth as torch_dreambooth
    from torchdiff.models import load_components as torch_components

    base = pair.write_tiny_sd(tmp_path / "base", assets.tokenizer_dir)
    torch_out, flax_out, back = tmp_path / "torch", tmp_path / "flax", tmp_path / "back"
    run_main(torch_dreambooth.main, dreambooth_argv(assets, base, torch_out), torch_out)

    # flaxdiff starts from the torch export: the trainer's loader reads it bit for bit.
    argv = dreambooth_argv(assets, torch_out, flax_out)
    cfg = cli.parse_args(argv, task="dreambooth", backend="flax")
    components = flax_components(cfg, ModelOptions.from_config(cfg))
    assert_same_weights(components.unet, torch_out, "unet")
    assert_same_weights(components.text_encoder, torch_out, "text_encoder")
    run_main(flax_dreambooth.main, argv, flax_out)
    trained = load_file(flax_out / UNET)
    before = load_file(torch_out / UNET)
    assert any(not np.array_equal(trained[k], before[k]) for k in before), "flax did not train"
    assert all(np.isfinite(v).all() for v in trained.values())

    # ... and torchdiff starts from the flax export.
    argv = dreambooth_argv(assets, flax_out, back)
    loaded = torch_components(cli.parse_args(argv, task="dreambooth", backend="torch"))
    for name, model, path in (("unet", loaded.unet, UNET),
                              ("text_encoder", loaded.text_encoder, TEXT_ENCODER)):  # fmt: skip
        saved = {k.removeprefix("text_model."): v for k, v in load_file(flax_out / path).items()}
        state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        assert set(saved) <= set(state), sorted(set(saved) - set(state))[:8]
        for key, value in saved.items():
            assert np.array_equal(state[key].numpy(), value), f"{name} {key}"
    run_main(torch_dreambooth.main, argv, back)
    again = load_file(back / UNET)
    assert any(not np.array_equal(again[k], trained[k]) for k in trained), "torch did not train"


def unconditional_argv(assets, out: Path, *extra: str) -> list[str]:
    return [
        "--train_data_dir", str(assets.digits_dir), "--resolution", "16",
        "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--save_images_epochs", "100", "--save_model_epochs", "100",
        "--ddpm_num_inference_steps", "2", "--eval_batch_size", "1",
        "--report_to", "none", "--output_dir", str(out), "--seed", "0", *extra,
    ]  # fmt: skip


def architecture(unet) -> dict:
    """A diffusers model's config without the folder it was read from."""
    return {k: v for k, v in unet.config.items() if k != "_name_or_path"}


def test_unconditional_exports_cross_over(assets, tmp_path):
    from diffusers import UNet2DModel

    from flaxdiff import unconditional as flax_unconditional
    from flaxdiff.models import convert
    from torchdiff import unconditional as torch_unconditional

    torch_out, flax_out, back = tmp_path / "torch", tmp_path / "flax", tmp_path / "back"
    tiny = ("--config", str(pair.TINY_DDPM))
    run_main(torch_unconditional.main, unconditional_argv(assets, torch_out, *tiny), torch_out)
    pipeline = convert.from_diffusers(torch_out)  # the DDPMPipeline folder, as flaxdiff reads it
    assert_same_weights(pipeline["unet"], torch_out, "unet")

    # The torch export's architecture trains on flaxdiff; diffusers loads the flax export.
    config = ("--model_config_name_or_path", str(torch_out / "unet"))
    run_main(flax_unconditional.main, unconditional_argv(assets, flax_out, *config), flax_out)
    flax_unet = UNet2DModel.from_pretrained(flax_out / "unet")
    torch_unet = UNet2DModel.from_pretrained(torch_out / "unet")
    assert architecture(flax_unet) == architecture(torch_unet)
    shapes = {k: v.shape for k, v in torch_unet.state_dict().items()}
    assert {k: v.shape for k, v in flax_unet.state_dict().items()} == shapes

    # ... and the flax export's architecture trains on torchdiff.
    config = ("--model_config_name_or_path", str(flax_out / "unet"))
    run_main(torch_unconditional.main, unconditional_argv(assets, back, *config), back)
    assert_same_weights(convert.from_diffusers(back)["unet"], back, "unet")
