"""configs/: every file documents itself, builds, and holds the real architecture it names."""

from pathlib import Path

import pytest

from shared import cli
from shared import config as C

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


def test_expected_files_exist():
    for name in ["base.yaml", "demo.yaml", "models/sd15.yaml", "models/sd21.yaml",
                 "models/ddpm-128.yaml", "models/tiny.yaml", "tasks/dreambooth.yaml",
                 "tasks/text2image.yaml", "tasks/unconditional.yaml"]:  # fmt: skip
        assert name in ALL


@pytest.mark.parametrize("name", ALL)
def test_header_comment_says_how_to_run(name):
    text = (CONFIGS / name).read_text()
    header = text[: text.index("\n\n")] if "\n\n" in text else text
    assert text.startswith("# ")
    assert "Run:" in header and "Hardware:" in header and "Time:" in header


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("tasks/")])
def test_task_recipes_build_on_both_backends(name):
    values = cli.load_yaml(name)
    task = values.pop("task")
    for backend in C.BACKENDS:
        if backend == "flax" and values.get("mixed_precision") == "fp16":
            values = {**values, "mixed_precision": "bf16"}
        assert C.build(task, backend, values).task == task


# Public parameter counts of the diffusers/transformers models these files describe.
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "ddpm-128": {"unet": 113_673_219},
}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_architectures_match_published_parameter_counts(name):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    model = cli.load_yaml(f"models/{name}.yaml")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    counts = {}
    with init_empty_weights():  # shapes only: no memory, no init time
        unet = model["unet_config"]
        cls = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel}
        counts["unet"] = count(cls[unet["_class_name"]].from_config(unet))
        if "vae_config" in model:
            counts["vae"] = count(AutoencoderKL.from_config(model["vae_config"]))
        if "text_encoder_config" in model:
            te = {k: v for k, v in model["text_encoder_config"].items() if k != "architectures"}
            counts["text_encoder"] = count(CLIPTextModel(CLIPTextConfig(**te)))
    assert counts == PARAMETERS[name]
