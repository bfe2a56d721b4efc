"""`twindiff TASK`, `twindiff TASK --help`, the digits quick start and the Python API, each on both
backends, through the real entry points."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared import cli, quality
from shared.config import ConfigError
from shared.quickstart import digits_data

pytestmark = pytest.mark.slow
BACKENDS = ["flax", "torch"]


def twindiff(*args, cwd, timeout=600):
    exe = shutil.which("twindiff")
    command = [exe] if exe else [sys.executable, "-m", "shared.launcher"]
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_data(tmp_path_factory.mktemp("digits"), size=16)


def test_task_help_lists_every_flag_with_its_backends(tmp_path):
    result = twindiff("unconditional", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: twindiff unconditional --backend flax|torch")
    flags = {line.split()[0]: line for line in lines if line.startswith("  --")}
    assert "(default: 0.0001)" in flags["--learning_rate"]
    assert flags["--learning_rate"].endswith("[flax, torch]")
    assert flags["--parallelism"].endswith("[flax]")  # flax only
    assert flags["--use_8bit_adam"].endswith("[torch]")  # torch only
    assert "--instance_prompt" not in flags  # DreamBooth's
    top = twindiff("--help", cwd=tmp_path)
    assert top.returncode == 0
    assert all(word in top.stdout for word in ("demo", "bench", "unconditional", "dreambooth"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_runs_on_the_backend_its_config_names(tmp_path, digits, backend):
    config = tmp_path / "run.yaml"
    config.write_text(f"base_config: digits.yaml\nbackend: {backend}\n")
    result = twindiff(
        "unconditional", "--config", str(config), "--train_data_dir", str(digits),
        "--max_train_steps", "2", "--output_dir", "out", "--ddpm_num_inference_steps", "2",
        "--train_batch_size", "8", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = cli.load_saved_config(tmp_path / "out" / "config.yaml")
    assert (saved.backend, saved.training.max_train_steps) == (backend, 2)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))


def test_torch_with_two_processes_runs_under_accelerate(tmp_path, digits):
    result = twindiff(
        "unconditional", "--backend", "torch", "--num_processes", "2", "--config", "digits.yaml",
        "--train_data_dir", str(digits), "--max_train_steps", "2", "--train_batch_size", "4",
        "--output_dir", "out", "--ddpm_num_inference_steps", "2", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unconditional on 2 process(es)" in result.stderr
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["steps"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_digits_demo_trains_samples_and_scores(tmp_path, backend):
    result = twindiff(
        "demo", "--backend", backend, "--max_train_steps", "20", "--ddpm_num_inference_steps",
        "10", "--output_dir", "digits-run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "digits-run"
    report = json.loads((out / "quality.json").read_text())
    assert report["backend"] == backend and report["steps"] == 20
    scores = report["scores"]
    assert set(scores) == {f"generated ({backend})", "real held-out digits", "uniform noise"}
    for score in scores.values():
        assert score["images"] == 256 and np.isfinite(score["frechet"])
    assert scores["real held-out digits"]["frechet"] < scores["uniform noise"]["frechet"]
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (8 * 18 * 4, 8 * 18 * 4)  # 64 grey digits, 1 px frames, 4x
    assert f"trained on handwritten digits with {backend}diff" in result.stdout
    assert "real held-out digits" in result.stdout
    # The training data leaves the held-out digits out.
    names = {int(p.stem) for p in (out / "data" / "train").rglob("*.png")}
    assert names == set(quality.digit_splits().generator_training.tolist())


def test_python_api_trains_one_config_on_both_backends(tmp_path, digits, monkeypatch):
    import twindiff

    monkeypatch.chdir(tmp_path)
    cfg = twindiff.config(
        "digits.yaml", train_data_dir=str(digits), max_train_steps=3, train_batch_size=8,
        ddpm_num_inference_steps=2, checkpointing_steps=100,
    )  # fmt: skip
    # The same config from a mapping (flat flags and a nested section, as in YAML) + keywords.
    flat = {k: v for k, v in cli.load_yaml("digits.yaml").items() if k != "max_train_steps"}
    same = twindiff.config(
        {**flat, "training": {"max_train_steps": 3}}, train_data_dir=str(digits),
        train_batch_size=8, ddpm_num_inference_steps=2, checkpointing_steps=100,
    )  # fmt: skip
    assert cli.to_dict(cfg) == cli.to_dict(same)
    results = {}
    for backend in BACKENDS:
        result = twindiff.train(cfg, backend=backend, output_dir=f"out-{backend}")
        assert result.output_dir == Path(f"out-{backend}")
        assert len(result.losses) == 3 and result.summary["steps"] == 3
        images = twindiff.sample(result.output_dir, backend=backend, num_images=3,
                                 num_inference_steps=2)  # fmt: skip
        assert images.shape == (3, 16, 16, 1) and 0 <= images.min() <= images.max() <= 1
        results[backend] = result
    # One config, two backends: the same data, schedule and initial loss scale.
    assert abs(results["flax"].losses[0] - results["torch"].losses[0]) < 0.5
    with pytest.raises(ConfigError, match="no task"):
        twindiff.config({"learning_rate": 1e-4})
