"""`python -m flaxdiff.bench`: flaxdiff's half of `twindiff bench` (see `shared.bench`).

    python -m flaxdiff.bench --task unconditional --results flax.json [--warmup 3] -- \
        --config configs/models/tiny-ddpm.yaml --train_data_dir DIR --max_train_steps 23 ...

Sets the trainer up for the training flags (the same `flaxdiff.trainer.setup` a run calls, so
the step is compiled ahead of time and its compile time recorded), then runs
``--max_train_steps`` updates as the trainer's loop does (batches from the loader, sharded onto
the devices, the step, the metrics read back) without checkpoints, validation or export, and
writes what `shared.bench.measure` defines. The FLOP count is XLA's own for the compiled step
(`Compiled.cost_analysis()`: every instruction, elementwise ones included).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import distributed, trainer
from shared import cli
from shared.bench import measure
from shared.run import report


def step_flops(compiled: Any, *, num_devices: int) -> float | None:
    """XLA's FLOP count of one update over all devices (the compiled program is per device)."""
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):  # some runtimes report one entry per device
        costs = costs[0] if costs else None
    flops = (costs or {}).get("flops")
    return float(flops) * num_devices if flops and flops > 0 else None


def matmul_rate(size: int) -> float:
    """The best float32 matmul FLOP/s of one device, at JAX's default precision."""
    a = jnp.ones((size, size), jnp.float32)
    b = jnp.ones((size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    return measure.matmul_flops_per_second(lambda: product(a, b).block_until_ready(), size=size)


def peak_device_memory() -> int | None:
    """The first local device's peak bytes in use; None where the runtime keeps no count (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    peak = (stats or {}).get("peak_bytes_in_use")
    return int(peak) if peak else None


def run_benchmark(argv: Sequence[str]) -> dict[str, Any]:
    args, training_argv = measure.parse_backend_argv(argv, prog="python -m flaxdiff.bench")
    cfg = cli.parse_args(training_argv, task=args.task, backend="flax")
    started = time.perf_counter()
    run = trainer.setup(cfg, trainer.Task(args.task))
    setup_seconds = time.perf_counter() - started - (run.compile_seconds or 0.0)
    devices = run.strategy.num_devices
    accumulation = cfg.training.gradient_accumulation_steps
    losses: list[float] = []

    def next_batches() -> list[dict[str, Any]]:
        return [next(run.loader) for _ in range(accumulation)]

    def update(batches: list[dict[str, Any]]) -> None:
        batch = trainer._shard(run, batches)
        run.state, metrics = run.step_fn(run.state, batch)
        losses.append(float(np.asarray(metrics["train/loss"]).reshape(-1)[0]))  # the sync

    with run.loader:
        times = measure.time_updates(next_batches, update, steps=run.plan.max_train_steps)
    platform = jax.local_devices()[0].platform
    results = {
        "backend": "flax",
        "framework": f"jax {jax.__version__}",
        "device": f"{platform} x{devices}",
        "parallelism": run.strategy.name,
        "threads": measure.cores_available() if platform == "cpu" else None,
        "setup_seconds": setup_seconds,
        "compile_seconds": run.compile_seconds,
        **measure.summarize(
            times,
            warmup=min(args.warmup, len(times.total) - 1),
            images_per_update=run.plan.effective_batch_size,
            step_flops=step_flops(run.step_fn, num_devices=devices),
        ),
        "flops_source": "XLA cost_analysis of the compiled step (all instructions)",
        "matmul_flops_per_second": matmul_rate(args.matmul_size),
        "matmul_devices": devices if platform != "cpu" else 1,  # CPU devices share the cores
        "peak_rss_bytes": report.peak_rss_bytes(),
        "peak_device_memory_bytes": peak_device_memory(),
        "final_loss": measure.finite_or_none(losses[-1] if losses else None),
    }
    measure.write_results(args.results, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    distributed.initialize()  # before anything asks JAX for its devices
    run_benchmark(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
