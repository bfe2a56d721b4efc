"""End-to-end runs of `python -m flaxdiff.unconditional` on the tiny DDPM UNet and offline digits.

In process on one device: train with EMA and checkpoints, export, load the export with diffusers
(PyTorch) and sample; resume exactly. In a subprocess with 8 virtual CPU devices: pmap and the
mesh (data x fsdp) train the same config, and fsdp sharding gives the same weights as pure data
parallelism.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from flaxdiff import unconditional
from shared import cli, demo
from shared.run import checkpoints

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return demo.write_digits_folder(tmp_path_factory.mktemp("digits"), limit=32)


def _args(digits, out, *extra) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "models" / "tiny-ddpm.yaml"),
        "--train_data_dir", str(digits), "--max_train_samples", "16", "--resolution", "32",
        "--train_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
        "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2",
        "--save_images_epochs", "100", "--save_model_epochs", "100",
        "--report_to", "none", "--output_dir", str(out), "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_trains_exports_for_diffusers_and_resumes_exactly(digits, tmp_path):
    import torch
    from diffusers import DDPMPipeline

    common = ("--use_ema", "--checkpointing_steps", "2")
    straight = tmp_path / "straight"
    assert cli.run_main(lambda: unconditional.main(_args(digits, straight, *common,
                                                          "--max_train_steps", "4"))) == 0  # fmt: skip
    assert [p.name for p in checkpoints.list_checkpoints(straight)] == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not checkpoints.verify(straight / "checkpoint-4")
    assert (straight / "validation" / "final-000004.png").is_file()
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0

    # The export is a DDPMPipeline that diffusers (PyTorch) loads and samples.
    pipeline = DDPMPipeline.from_pretrained(straight)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    # 2 updates, a stop, then a resume to 4: the same weights bit for bit.
    resumed = tmp_path / "resumed"
    assert cli.run_main(lambda: unconditional.main(_args(digits, resumed, *common,
                                                          "--max_train_steps", "2"))) == 0  # fmt: skip
    more = ("--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert cli.run_main(lambda: unconditional.main(_args(digits, resumed, *common, *more))) == 0
    a, b = load_file(straight / UNET), load_file(resumed / UNET)  # the EMA weights
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert checkpoints.read_loader_state(straight / "checkpoint-4", 0) == (
        checkpoints.read_loader_state(resumed / "checkpoint-4", 0)
    )


def test_a_diverging_flax_run_stops_with_one_line(digits, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(digits, out, "--learning_rate", "1e6", "--max_train_steps", "8",
                 "--max_nonfinite_steps", "2", "--checkpointing_steps", "1")  # fmt: skip
    assert cli.run_main(lambda: unconditional.main(args)) == 2
    err = capsys.readouterr().err
    assert "consecutive steps" in err and "Traceback" not in err
    for path in checkpoints.list_checkpoints(out):
        assert not checkpoints.verify(path)  # every checkpoint written is whole and finite
    assert not (out / "model_index.json").exists()


_EIGHT_DEVICES = """
import json, sys
from flaxdiff import unconditional
args = json.loads(sys.argv[1])
sys.exit(unconditional.main(args))
"""


def test_pmap_and_mesh_on_eight_devices(digits, tmp_path):
    """8 virtual devices: pmap trains; the mesh with fsdp 2 gives the weights of fsdp 1.

    `--adam_epsilon 1` makes AdamW's step proportional to the gradient (not its sign), so the
    weights compare the gradients: sharded reductions sum in another order, and a plain Adam step
    would turn a rounding difference of a near-zero gradient into a full +-lr step.
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    outputs = {}
    for name, flags in {
        "pmap": ("--parallelism", "pmap"),
        "mesh-fsdp1": ("--parallelism", "mesh", "--fsdp_size", "1"),
        "mesh-fsdp2": ("--parallelism", "mesh", "--fsdp_size", "2"),
    }.items():
        out = tmp_path / name
        args = _args(digits, out, "--train_batch_size", "1", "--max_train_samples", "16",
                     "--max_train_steps", "2", "--checkpointing_steps", "2",
                     "--adam_epsilon", "1.0", "--learning_rate", "1.0", *flags)  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", _EIGHT_DEVICES, json.dumps(args)],
            capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["device"] == "cpu x8" and summary["parallelism"] == name.split("-")[0]
        outputs[name] = load_file(out / UNET)
    one, two = outputs["mesh-fsdp1"], outputs["mesh-fsdp2"]
    for key in one:
        scale = max(1.0, float(np.abs(one[key]).max()))
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-5 * scale, err_msg=key)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> demo.DemoAssets:
    return demo.build_demo_assets(tmp_path_factory.mktemp("assets") / "assets")


def _sample_sd(folder: Path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(
        "a photo of sks cat", num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert out.images[0].shape == (64, 64, 3) and np.isfinite(out.images[0]).all()


def test_text2image_from_configs_then_from_its_export(assets, tmp_path):
    """text2image on the tiny SD model (random init, EMA, min-SNR, v-prediction, validation), whose
    export diffusers loads; then a run that starts from that folder (DREAM training, bf16 compute
    with the frozen VAE and text encoder held in bf16)."""
    from flaxdiff import text2image

    first = tmp_path / "first"
    args = [
        "--config", str(REPO / "configs" / "models" / "tiny.yaml"),
        "--tokenizer_name", str(assets.tokenizer_dir),
        "--train_data_dir", str(assets.captioned_dir), "--resolution", "64",
        "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--use_ema", "--snr_gamma", "5.0",
        "--prediction_type", "v_prediction", "--validation_prompts", "a cat",
        "--validation_epochs", "1", "--report_to", "none", "--output_dir", str(first),
    ]  # fmt: skip
    assert cli.run_main(lambda: text2image.main(args)) == 0
    scheduler = json.loads((first / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert (first / "validation" / "final-000002.png").is_file()
    _sample_sd(first)

    second = tmp_path / "second"
    args = [
        "--pretrained_model_name_or_path", str(first),
        "--train_data_dir", str(assets.captioned_dir), "--resolution", "64",
        "--train_batch_size", "2", "--max_train_steps", "1", "--dream_training",
        "--prediction_type", "epsilon", "--mixed_precision", "bf16",
        "--report_to", "none", "--output_dir", str(second),
    ]  # fmt: skip
    assert cli.run_main(lambda: text2image.main(args)) == 0
    _sample_sd(second)
    before, after = load_file(first / UNET), load_file(second / UNET)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_dreambooth_generates_class_images_and_skips_the_text_encoder(assets, tmp_path):
    import shutil

    from flaxdiff import dreambooth
    from shared.data import count_images

    class_dir = tmp_path / "class"
    shutil.copytree(assets.class_dir, class_dir)
    out = tmp_path / "out"
    args = [
        "--config", str(REPO / "configs" / "models" / "tiny.yaml"),
        "--tokenizer_name", str(assets.tokenizer_dir),
        "--instance_data_dir", str(assets.instance_dir), "--instance_prompt", assets.instance_prompt,
        "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", assets.class_prompt, "--num_class_images", "9",
        "--pre_compute_text_embeddings", "--skip_save_text_encoder", "--offset_noise",
        "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "1",
        "--report_to", "none", "--output_dir", str(out),
    ]  # fmt: skip
    assert cli.run_main(lambda: dreambooth.main(args)) == 0
    assert count_images(class_dir) == 9  # one generated by the flax sampler
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and not (out / "text_encoder").exists()


_WITHOUT_TORCH = """
import importlib.abc, sys
BLOCKED = {"torch", "diffusers", "transformers", "accelerate"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this TPU VM")
        return None

sys.meta_path.insert(0, Block())
from shared import launcher
sys.exit(launcher.main(sys.argv[1:]))
"""


def test_dreambooth_runs_where_torch_cannot_be_imported(tmp_path):
    """A TPU VM installs .[flax,tpu,data]: class images, training and the export need none of
    torch, diffusers, transformers or accelerate."""
    args = ["demo", "dreambooth", "--backend", "flax", "--max_train_steps", "2",
            "--num_class_images", "9"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *args],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "twindiff-demo"
    assert (out / "model_index.json").is_file() and (out / UNET).is_file()
    assert len(list((out / "assets" / "class").glob("*.jpg"))) == 9


def test_digits_quick_start_runs_where_torch_cannot_be_imported(tmp_path):
    """`twindiff demo` on flax: training, sampling the export and the score need no torch."""
    args = ["demo", "--backend", "flax", "--max_train_steps", "3", "--train_batch_size", "8",
            "--ddpm_num_inference_steps", "2", "--output_dir", "digits"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *args],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "digits" / "quality.json").read_text())
    assert report["backend"] == "flax" and report["scores"]["generated (flax)"]["images"] == 256


def test_sigterm_checkpoints_and_the_run_resumes(digits, tmp_path, monkeypatch):
    import signal

    from flaxdiff import trainer

    out = tmp_path / "out"
    args = _args(digits, out, "--max_train_steps", "4", "--checkpointing_steps", "10")
    real_shard, calls = trainer._shard, []

    def shard_then_sigterm(run, batches):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_shard(run, batches)

    monkeypatch.setattr(trainer, "_shard", shard_then_sigterm)
    assert cli.run_main(lambda: unconditional.main(args)) == 0
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    monkeypatch.setattr(trainer, "_shard", real_shard)
    resumed = [*args, "--resume_from_checkpoint", "latest"]
    assert cli.run_main(lambda: unconditional.main(resumed)) == 0
    assert (out / "model_index.json").is_file()


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(folder.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_dreambooth_trains_the_text_encoder_with_class_labels_and_resumes_exactly(assets, tmp_path):
    """--train_text_encoder (its weights in the optimizer, the checkpoint and the export),
    --class_labels_conditioning timesteps on a UNet with a timestep class embedding, validation
    with the trained encoder, TensorBoard events; k steps + resume == N steps, bit for bit."""
    import yaml

    from flaxdiff import dreambooth
    from flaxdiff.models import convert

    model = yaml.safe_load((REPO / "configs" / "models" / "tiny.yaml").read_text())
    model["model"]["unet_config"]["class_embed_type"] = "timestep"
    config = tmp_path / "tiny-class-labels.yaml"
    config.write_text(yaml.safe_dump(model))

    def args(out, steps, *extra):
        return [
            "--config", str(config), "--tokenizer_name", str(assets.tokenizer_dir),
            "--instance_data_dir", str(assets.instance_dir),
            "--instance_prompt", assets.instance_prompt, "--train_text_encoder",
            "--class_labels_conditioning", "timesteps", "--resolution", "64",
            "--train_batch_size", "1", "--learning_rate", "1e-3", "--max_train_steps", str(steps),
            "--checkpointing_steps", "1", "--output_dir", str(out), "--seed", "3", *extra,
        ]  # fmt: skip

    straight = tmp_path / "straight"
    extra = ("--validation_prompt", "a photo of sks cat", "--validation_steps", "2",
             "--num_validation_images", "1", "--report_to", "tensorboard")  # fmt: skip
    assert cli.run_main(lambda: dreambooth.main(args(straight, 2, *extra))) == 0
    assert (straight / "validation").is_dir() and list((straight / "validation").glob("*.png"))
    scalars = _events(straight / "logs")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert all(np.isfinite(value) for _, value in scalars["train/loss"])
    assert [step for step, _ in scalars["train/lr"]] == [1, 2]

    # The exported text encoder is the trained one, not the random init it started from.
    text_config = model["model"]["text_encoder_config"]
    start = convert.init_model(text_config, seed=3)
    trained = convert.from_diffusers(straight / "text_encoder")
    before, after = nnx.state(start, nnx.Param), nnx.state(trained, nnx.Param)
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    ]
    assert any(changed)
    unet = load_file(straight / UNET)
    assert "class_embedding.linear_1.weight" in unet

    resumed = tmp_path / "resumed"
    assert cli.run_main(lambda: dreambooth.main(args(resumed, 1, "--report_to", "none"))) == 0
    again = args(resumed, 2, "--report_to", "none", "--resume_from_checkpoint", "latest")
    assert cli.run_main(lambda: dreambooth.main(again)) == 0
    for name in (UNET, "text_encoder/model.safetensors"):
        want, got = load_file(straight / name), load_file(resumed / name)
        assert want.keys() == got.keys()
        for key in want:
            assert np.array_equal(want[key], got[key]), (name, key)
