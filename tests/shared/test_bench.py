"""`twindiff bench` (shared.bench): the tiny preset on both backends, and the report's parts.

The end-to-end test checks that every figure the JSON document promises is there and positive
and finite, never how large it is: timings depend on the machine and its load.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from shared.bench import measure, table
from shared.bench.presets import PRESETS, training_args
from shared.demo import DemoAssets

ROOT = Path(__file__).resolve().parents[2]
INSTALLED = [b for b, m in (("flax", "jax"), ("torch", "torch")) if importlib.util.find_spec(m)]
POSITIVE = (
    "setup_seconds", "first_step_seconds", "step_seconds", "images_per_second", "step_flops",
    "achieved_flops_per_second", "flops_utilization", "matmul_flops_per_second",
    "peak_rss_bytes", "loader_headroom", "process_seconds", "step_cpu_seconds",
)  # fmt: skip


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason="neither jax nor torch is installed")
def test_tiny_preset_on_every_installed_backend(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "shared.bench", "--preset", "tiny", "--steps", "2",
        "--warmup", "1", "--batch_size", "4", "--device", "cpu", "--matmul_size", "256",
        "--assets", str(tmp_path / "assets"), "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "images/s" in done.stdout  # the table
    document = json.loads(out.read_text())
    assert document["preset"] == "tiny" and document["steps"] == 2
    assert _positive(document["matmul"]["best"]) and _positive(
        document["loader"]["images_per_second"]
    )
    assert list(document["backends"]) == INSTALLED
    for name, record in document["backends"].items():
        assert not record.get("error"), record
        for key in POSITIVE:
            assert _positive(record[key]), (name, key, record[key])
        assert record["timed_steps"] == 2 and len(record["step_seconds_all"]) == 2
        assert 0 <= record["data_wait_fraction"] <= record["data_wait_fraction_max"] <= 1
        assert record["images_per_update"] == 4
        assert math.isfinite(record["final_loss"])
    if INSTALLED == ["flax", "torch"]:
        assert _positive(document["backends"]["flax"]["compile_seconds"])
        assert _positive(document["flax_over_torch_step_time"])


def test_time_updates_splits_the_wait_from_the_update():
    clock = iter(range(100))
    times = measure.UpdateTimes()
    times.wait, times.total = [1.0, 0.1, 0.3], [5.0, 1.0, 3.0]
    summary = measure.summarize(times, warmup=1, images_per_update=8, step_flops=4e9)
    assert summary["step_seconds"] == 2.0 and summary["images_per_second"] == 4.0
    assert summary["data_wait_fraction"] == pytest.approx(0.4 / 4.0)
    assert summary["data_wait_fraction_max"] == pytest.approx(0.1)
    assert summary["achieved_flops_per_second"] == 2e9
    counted = measure.time_updates(lambda: next(clock), lambda batch: None, steps=3)
    assert len(counted.wait) == len(counted.total) == 3
    assert all(0 <= w <= t for w, t in zip(counted.wait, counted.total, strict=True))
    with pytest.raises(ValueError, match="no timed updates"):
        measure.summarize(times, warmup=3, images_per_update=8, step_flops=None)


def test_combine_takes_the_best_matmul_and_the_step_ratio():
    header = dict(preset="tiny", description="d", task="unconditional", model_config="m",
                  resolution=32, batch_size=16, steps=2, warmup=1, machine="2 cores")  # fmt: skip
    flax = {"step_seconds": 0.6, "achieved_flops_per_second": 30e9, "images_per_second": 20.0,
            "matmul_flops_per_second": 90e9}  # fmt: skip
    torch = {"step_seconds": 0.3, "achieved_flops_per_second": 60e9, "images_per_second": 40.0,
             "matmul_flops_per_second": 120e9}  # fmt: skip
    failed = {"backend": "torch", "error": "exit status 1; log: x"}
    loader = {"images_per_second": 2000.0, "num_workers": 0, "batch_size": 16}
    document = table.combine(
        header, {"flax": flax, "torch": torch}, numpy_matmul=100e9, matmul_size=64, loader=loader
    )
    assert document["matmul"]["best_source"] == "torch" and document["matmul"]["best"] == 120e9
    assert document["backends"]["flax"]["flops_utilization"] == pytest.approx(0.25)
    assert document["backends"]["torch"]["loader_headroom"] == pytest.approx(50.0)
    assert document["flax_over_torch_step_time"] == pytest.approx(2.0)
    text = table.format_table(document)
    assert "flax/torch step time: 2.00x" in text and "best matmul: 120.0 GFLOP/s (torch" in text
    partial = table.combine(header, {"flax": flax, "torch": failed}, numpy_matmul=None,
                            matmul_size=64, loader=None)  # fmt: skip
    assert partial["flax_over_torch_step_time"] is None
    assert "torch: FAILED: exit status 1" in table.format_table(partial)


def test_presets_are_training_commands(tmp_path):
    from shared import cli

    assets = DemoAssets(*(tmp_path / name for name in
                          ("root", "tok", "inst", "cls", "captioned", "digits")))  # fmt: skip
    for preset in PRESETS.values():
        for device in ("cpu", "accelerator"):
            size = preset.size(device)
            argv = training_args(preset, size, assets=assets, output_dir=tmp_path / "out",
                                 extra=["--learning_rate", "2e-4"])  # fmt: skip
            cfg = cli.parse_args(argv, task=preset.task, backend="torch")
            assert cfg.data.resolution == size.resolution
            assert cfg.training.max_train_steps == size.steps + size.warmup
            assert cfg.optim.learning_rate == 2e-4
