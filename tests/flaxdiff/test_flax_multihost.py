"""Multi-host flax runs: `python -m flaxdiff.unconditional` as two JAX processes on this machine.

Two processes of 2 virtual CPU devices each (4 global, a data=2 x fsdp=2 mesh, each fsdp pair on
one process) joined by `flaxdiff.distributed` from the JAX_COORDINATOR_ADDRESS environment: one
run, one export, collective checkpoints, disjoint data shards; a SIGTERM on one process stops
both at the same step with one checkpoint, and that checkpoint resumes to the straight run's
weights bit for bit (the stopped run doubles as the short run of the resume check). Then one
process: a checkpoint written on 8 devices resumes on 4 with the same global batch, and the
resume rule that allows it, in process.

Every launch compiles the train step (~20 s on 2 CPU cores), so the runs are 4 steps of a global
batch of 4 or 8, the straight two-process run is a module fixture, and the launches share a
persistent compilation cache: 6 launches (9 processes), under 3 minutes here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from shared import cli, demo
from shared.data import build_loader, build_source
from shared.run import checkpoints

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
UNET = "unet/diffusion_pytorch_model.safetensors"
TIMEOUT = 300  # seconds per launch; one takes 30-50 s here
SAMPLES = 16  # --max_train_samples: one epoch is 4 updates of a global batch of 4


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return demo.write_digits_folder(tmp_path_factory.mktemp("digits"), limit=32)


def _args(digits: Path, out: Path, *extra: str, samples: int = SAMPLES) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "models" / "tiny-ddpm.yaml"),
        "--train_data_dir", str(digits), "--max_train_samples", str(samples),
        "--resolution", "32", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
        "--eval_batch_size", "0",  # no validation images: no sampler to compile
        "--save_images_epochs", "100", "--save_model_epochs", "100",
        "--report_to", "none", "--output_dir", str(out), "--seed", "0",
        "--parallelism", "mesh", "--fsdp_size", "2", "--checkpointing_steps", "2",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for the module's launches: a launch that compiles the
    program of an earlier one (same mesh, same shapes) loads it instead (25 s -> 10 s here).
    The executable is the same either way, so no comparison below depends on it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax-cache")))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


_COORDINATION = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _COORDINATION}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A SIGTERM to rank 1 while it prepares update `at` (rank 0 gets none), as a preempted host would.
_SIGTERM_ON_RANK_1 = """
import os, signal, sys
from flaxdiff import trainer, unconditional
from shared import cli

at, argv = int(sys.argv[1]), sys.argv[2:]
real_shard, calls = trainer._shard, []

def shard(run, batches):
    calls.append(1)
    if os.environ["JAX_PROCESS_ID"] == "1" and len(calls) == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_shard(run, batches)

trainer._shard = shard
sys.exit(cli.run_main(lambda: unconditional.main(argv)))
"""


def _two_processes(args: list[str], logs: Path, *, sigterm_at: int | None = None) -> list[str]:
    """Runs ranks 0 and 1 of one run; returns their logs (stdout + stderr) after both exit 0.

    Logs go to files (a full pipe would block a process). When one process fails, the other is
    given a few seconds and then killed: it would wait in a collective for its peer otherwise.
    """
    port = _free_port()
    if sigterm_at is None:
        command = [sys.executable, "-m", "flaxdiff.unconditional", *args]
    else:
        command = [sys.executable, "-c", _SIGTERM_ON_RANK_1, str(sigterm_at), *args]
    logs.mkdir(parents=True, exist_ok=True)
    files = [logs / f"rank{rank}.log" for rank in range(2)]
    procs = []
    try:
        for rank, file in enumerate(files):
            env = _env(
                2,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(rank),
            )
            with file.open("w") as log:
                procs.append(
                    subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
                    )
                )
        deadline = time.monotonic() + TIMEOUT
        failed_at = None
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() > failed_at + 10:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    texts = [file.read_text(errors="replace") for file in files]
    for rank, (proc, text) in enumerate(zip(procs, texts, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{text[-4000:]}"
    return texts


def _one_process(args: list[str], devices: int) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "flaxdiff.unconditional", *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(devices), cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _weights(out: Path) -> dict[str, np.ndarray]:
    return load_file(out / UNET)


def _bit_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- two processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory) -> Path:
    """4 updates of 2 processes x 2 devices x 1 example, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("two") / "straight"
    logs = _two_processes(
        _args(digits, out, "--train_batch_size", "1", "--max_train_steps", "4"), out.parent / "log"
    )
    assert "MeshStrategy(data=2 x fsdp=2, 2 process(es))" in logs[0]
    return out


def test_two_processes_train_one_run(straight):
    # One export, written by process 0, with finite weights; the summary counts 4 global devices.
    assert (straight / "model_index.json").is_file()
    weights = _weights(straight)
    assert weights and all(np.isfinite(w).all() for w in weights.values())
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["device"] == "cpu x4"
    assert summary["parallelism"] == "mesh"
    # Every checkpoint is one folder both processes committed, each with its loader position.
    # (Each fsdp pair lies on one process, so the state's shards all have a copy on process 0,
    # which writes them once.)
    assert [p.name for p in checkpoints.list_checkpoints(straight)] == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    for step in (2, 4):
        folder = straight / f"checkpoint-{step}"
        assert checkpoints.verify(folder) == []
        assert checkpoints.read_trainer_state(folder)["global_step"] == step
        assert (folder / "data_0.json").is_file() and (folder / "data_1.json").is_file()
        # Each process loaded only its half of every global batch: 2 examples per update, an
        # epoch of 8 per process (16 examples / 2 processes), so step 4 ends epoch 0.
        epoch, position = divmod(2 * step, SAMPLES // 2)
        for rank in range(2):
            saved = checkpoints.read_loader_state(folder, rank)
            assert saved == {"epoch": epoch, "position": position}


def test_the_processes_read_disjoint_shards_of_each_epoch(straight):
    """Replays each process's loader from the run's own saved config: its batches lead to the
    positions saved in data_<rank>.json, and the two processes' examples are disjoint and cover
    the epoch (4 updates x 4 examples = the 16 examples) once."""
    cfg = cli.load_saved_config(straight / "checkpoint-4" / "config.yaml")
    source = build_source(cfg, verify=False)
    assert len(source) == SAMPLES
    read = {}
    for rank in range(2):
        loader = build_loader(cfg, source, batch_size=2, process_index=rank, process_count=2)
        with loader:
            indices = []
            for step in range(1, 5):
                indices += next(loader)["index"].tolist()
                if step in (2, 4):
                    saved = checkpoints.read_loader_state(straight / f"checkpoint-{step}", rank)
                    assert loader.state() == saved, (rank, step)
        read[rank] = indices
    assert len(set(read[0])) == len(read[0]) == 8
    assert not set(read[0]) & set(read[1])
    assert set(read[0]) | set(read[1]) == set(range(SAMPLES))


def test_sigterm_on_one_process_stops_both_then_resumes_exactly(digits, straight, tmp_path):
    """Rank 1 gets SIGTERM during update 3 (no checkpoint due): both processes finish update 3,
    write one checkpoint-3 together and exit 0. The relaunch resumes it to step 4 with the
    straight run's weights and loader positions, bit for bit."""
    out = tmp_path / "stopped"
    args = _args(digits, out, "--train_batch_size", "1", "--max_train_steps", "4")
    logs = _two_processes(args, tmp_path / "log-stop", sigterm_at=3)
    assert "stopped by SIGTERM at step 3" in logs[1]
    assert "stopped by a signal on another process at step 3" in logs[0]
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    stop = out / "checkpoint-3"
    assert checkpoints.verify(stop) == []
    assert checkpoints.read_trainer_state(stop)["global_step"] == 3
    for rank in range(2):
        assert checkpoints.read_loader_state(stop, rank) == {"epoch": 0, "position": 6}
    assert not (out / "model_index.json").exists() and not (out / "train_summary.json").exists()

    logs = _two_processes([*args, "--resume_from_checkpoint", "latest"], tmp_path / "log-resume")
    assert f"resumed from {stop} at step 3" in logs[0]
    assert _bit_equal(_weights(out), _weights(straight))
    for rank in range(2):
        assert checkpoints.read_loader_state(out / "checkpoint-4", rank) == (
            checkpoints.read_loader_state(straight / "checkpoint-4", rank)
        )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 1


# --- one process, another mesh on resume ----------------------------------------------------------


def test_a_checkpoint_of_8_devices_resumes_on_4_with_the_same_global_batch(digits, tmp_path):
    """data=4 x fsdp=2 with 1 example per device, then data=2 x fsdp=2 with 2 per device: the
    global batch (8), the loader's batches and the noise (one key for the global batch, drawn
    the same whatever the sharding) are the same, so only the order of the gradient reductions
    differs from a straight 8-device run.

    `--adam_epsilon 1 --learning_rate 1` makes AdamW's step proportional to the gradient, so
    the weights compare the gradients: with the default epsilon, a parameter whose gradient is
    rounding noise (a bias before a GroupNorm) takes a full +-lr sign step that a reduction in
    another order can flip. The tolerance is then float32 rounding relative to each tensor:
    max|a - b| <= 1e-5 * max|a| (float32 has 2**-24 ~ 6e-8 relative precision; a sum of a
    few hundred terms in another order moves the result by at most a few hundred of those).
    """

    def args(out, *extra):  # 32 examples: an epoch is 4 updates of the global batch of 8
        return _args(digits, out, "--adam_epsilon", "1.0", "--learning_rate", "1.0", *extra,
                     samples=32)  # fmt: skip

    straight = tmp_path / "straight8"
    _one_process(args(straight, "--train_batch_size", "1", "--max_train_steps", "4"), devices=8)
    assert json.loads((straight / "train_summary.json").read_text())["device"] == "cpu x8"

    out = tmp_path / "resumed"
    _one_process(args(out, "--train_batch_size", "1", "--max_train_steps", "2"), devices=8)
    at_two = _weights(out)
    more = ("--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    log = _one_process(args(out, "--train_batch_size", "2", *more), devices=4)
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in log
    assert "--train_batch_size 1 -> 2: takes effect from step 3" in log
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["device"] == "cpu x4" and summary["steps_this_run"] == 2
    # The data order continued: the same positions as the straight run, past checkpoint-2's.
    assert checkpoints.read_loader_state(out / "checkpoint-2", 0) == {"epoch": 0, "position": 16}
    assert checkpoints.read_loader_state(out / "checkpoint-4", 0) == (
        checkpoints.read_loader_state(straight / "checkpoint-4", 0)
    )
    assert checkpoints.verify(out / "checkpoint-4") == []

    want, got = _weights(straight), _weights(out)
    assert want.keys() == got.keys()
    moved = 0.0
    for key in want:
        scale = float(np.abs(want[key]).max())
        assert np.abs(got[key] - want[key]).max() <= 1e-5 * scale, key
        moved = max(moved, float(np.abs(want[key] - at_two[key]).max()) / max(scale, 1e-30))
    # Updates 3 and 4 moved the weights by far more than the tolerance: it can tell them apart.
    assert moved > 1e-2


def test_a_new_batch_size_resumes_only_with_the_saved_global_batch(digits, tmp_path):
    """The rule the 8 -> 4 device resume relies on (`shared.run.resume`), both ways, in process."""
    from shared.config import ConfigError
    from shared.run import resume

    def cfg(batch):
        args = _args(digits, tmp_path / "out", "--train_batch_size", str(batch))
        return cli.parse_args(args, task="unconditional", backend="flax")

    folder = tmp_path / "checkpoint-2"
    cli.save_config(cfg(1), folder / "config.yaml")
    plan = {"global_batch_size": 8, "num_processes": 1}  # saved on 8 devices x 1
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "plan": plan}))

    def check(batch, **where):
        return resume.check_resume_config(folder, cfg(batch), step=2, **where)

    applied = check(2, num_devices=4, num_processes=1)
    assert [(c.name, c.saved, c.new) for c in applied] == [("train_batch_size", 1, 2)]
    refused = [
        dict(num_devices=8, num_processes=1),  # a global batch of 16
        dict(num_devices=4, num_processes=2),  # each process would load another share
        {},  # a caller that does not say (torch): as before, refused
    ]
    for where in refused:
        with pytest.raises(ConfigError, match=r"--train_batch_size 1 -> 2 \(the checkpoint"):
            check(2, **where)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))  # no plan saved
    with pytest.raises(ConfigError, match="--train_batch_size 1 -> 2"):
        check(2, num_devices=4, num_processes=1)
