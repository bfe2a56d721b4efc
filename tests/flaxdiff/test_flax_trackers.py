"""`flaxdiff.trackers`: TensorBoard events read back with tensorboard's reader (no TensorFlow),
wandb calls on a stand-in module, and the processes and flags that write nothing."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from flaxdiff.trackers import Trackers
from shared import cli
from shared.config import TrainConfig
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LOSSES = {1: 0.5, 2: 0.25, 3: 0.125}


def _config(out: Path, report_to: str, *extra: str) -> TrainConfig:
    return cli.parse_args(
        [
            "--config", str(REPO / "configs" / "models" / "tiny-ddpm.yaml"),
            "--train_data_dir", str(out / "data"), "--output_dir", str(out),
            "--report_to", report_to, *extra,
        ],
        task="unconditional",
        backend="flax",
    )  # fmt: skip


def _images() -> np.ndarray:
    return np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)  # (N, H, W, C)


def _log_run(trackers: Trackers) -> None:
    with trackers:
        for step, loss in LOSSES.items():
            trackers.log({"train/loss": loss, "train/lr": np.float32(1e-3)}, step)
        trackers.log_images("validation", _images(), 3)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_tensorboard_events_round_trip(tmp_path):
    cfg = _config(tmp_path, "tensorboard", "--logging_dir", "tb", "--tracker_project_name", "run")
    _log_run(Trackers.from_config(cfg, is_main=True))

    logdir = tmp_path / "tb" / "run"  # where Accelerate's TensorBoard tracker writes
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    events = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0}
    )
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == LOSSES
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)
    images = events.Images("validation")
    assert len(images) == 1 and images[0].step == 3
    assert (images[0].width, images[0].height) == (16, 8)  # the batch of 2 tiled side by side
    assert images[0].encoded_image_string.startswith(b"\x89PNG")
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| train_batch_size |" in config and "hub_token" not in config


def test_non_main_process_and_report_to_none_write_nothing(tmp_path):
    for report_to, is_main in (("tensorboard", False), ("all", False), ("none", True)):
        out = tmp_path / f"{report_to}-{is_main}"
        trackers = Trackers.from_config(_config(out, report_to), is_main=is_main)
        assert trackers.writer is None and trackers.wandb_run is None
        _log_run(trackers)
        assert not out.exists() or not _files(out)


def test_wandb_missing_is_a_config_error_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    for is_main in (True, False):  # every process fails, before training starts
        with pytest.raises(ConfigError, match=r"--report_to wandb.*pip install wandb"):
            Trackers.from_config(_config(tmp_path, "wandb"), is_main=is_main)
    # "all" means every tracker installed, as in Accelerate: TensorBoard alone here.
    trackers = Trackers.from_config(_config(tmp_path, "all"), is_main=True)
    with trackers:
        assert trackers.writer is not None and trackers.wandb_run is None


def test_comet_ml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--report_to comet_ml"):
        Trackers.from_config(_config(tmp_path, "comet_ml"), is_main=True)


class _FakeRun:
    def __init__(self, **init) -> None:
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, *, step) -> None:
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished = True


def test_wandb_gets_config_scalars_and_images(tmp_path, monkeypatch):
    wandb = types.ModuleType("wandb")
    runs: list[_FakeRun] = []
    wandb.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
    wandb.Image = lambda image: ("image", image.shape)
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    _log_run(Trackers.from_config(_config(tmp_path, "wandb"), is_main=True))

    (run,) = runs
    assert run.init["project"] == "train_unconditional" and run.init["dir"] == str(tmp_path)
    assert run.init["config"]["train_batch_size"] > 0 and "hub_token" not in run.init["config"]
    assert run.logged[:3] == [({"train/loss": v, "train/lr": pytest.approx(1e-3)}, s)
                              for s, v in LOSSES.items()]  # fmt: skip
    assert run.logged[3] == ({"validation": [("image", (8, 8, 3))] * 2}, 3)
    assert run.finished
    assert not (tmp_path / "logs").exists()  # no TensorBoard folder for --report_to wandb
