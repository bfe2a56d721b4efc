"""`python -m torchdiff.bench`: torchdiff's half of `twindiff bench` (see `shared.bench`).

    python -m torchdiff.bench --task unconditional --results torch.json [--warmup 3] -- \
        --config configs/models/tiny-ddpm.yaml --train_data_dir DIR --max_train_steps 23 ...

Sets the trainer up for the training flags (`torchdiff.trainer.setup`, as a run does), then runs
``--max_train_steps`` updates of `torchdiff.trainer.train_step` (which reads its metrics back to
the host, so each update is finished when it returns) without checkpoints, validation or export,
and writes what `shared.bench.measure` defines. PyTorch compiles nothing ahead of time: its
warm-up cost shows in the first step. The FLOP count is `torch.utils.flop_counter`'s over the
first update (matmuls, convolutions and attention, forward and backward; elementwise work and
the optimizer are not counted).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from shared import cli
from shared.bench import measure
from shared.run import report
from torchdiff import trainer


def matmul_rate(size: int, device: torch.device) -> float:
    """The best float32 matmul FLOP/s on `device`, with PyTorch's default (no TF32) precision."""
    a = torch.ones(size, size, device=device)
    b = torch.ones(size, size, device=device)

    def product() -> None:
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return measure.matmul_flops_per_second(product, size=size)


def run_benchmark(argv: Sequence[str]) -> dict[str, Any]:
    args, training_argv = measure.parse_backend_argv(argv, prog="python -m torchdiff.bench")
    cfg = cli.parse_args(training_argv, task=args.task, backend="torch")
    started = time.perf_counter()
    run = trainer.setup(cfg, trainer.Task(args.task))
    setup_seconds = time.perf_counter() - started
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counted: list[float] = []
    losses: list[float] = []

    def next_batches() -> list[dict[str, Any]]:
        return [next(run.loader) for _ in range(cfg.training.gradient_accumulation_steps)]

    def update(batches: list[dict[str, Any]]) -> None:
        if counted:
            logs = trainer.train_step(run, batches)
        else:  # the first (warm-up) update: counting slows it, and it is never timed
            with FlopCounterMode(display=False) as counter:
                logs = trainer.train_step(run, batches)
            counted.append(float(counter.get_total_flops()) * run.accelerator.num_processes)
        losses.append(logs["train/loss"])

    with run.loader:
        times = measure.time_updates(next_batches, update, steps=run.plan.max_train_steps)
    results = {
        "backend": "torch",
        "framework": f"torch {torch.__version__}",
        "device": f"{device.type} x{run.accelerator.num_processes}",
        "parallelism": "accelerate",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "setup_seconds": setup_seconds,
        "compile_seconds": None,
        **measure.summarize(
            times,
            warmup=min(max(args.warmup, 1), len(times.total) - 1),
            images_per_update=run.plan.effective_batch_size,
            step_flops=counted[0] if counted and counted[0] > 0 else None,
        ),
        "flops_source": "torch FlopCounterMode over one update (matmul, conv, attention)",
        "matmul_flops_per_second": matmul_rate(args.matmul_size, device),
        "matmul_devices": run.accelerator.num_processes if device.type != "cpu" else 1,
        "peak_rss_bytes": report.peak_rss_bytes(),
        "peak_device_memory_bytes": (
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        ),
        "final_loss": measure.finite_or_none(losses[-1] if losses else None),
    }
    measure.write_results(args.results, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    run_benchmark(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
