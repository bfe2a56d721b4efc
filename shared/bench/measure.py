"""What one backend's benchmark process measures, the framework passed in as callables.

`python -m flaxdiff.bench` and `python -m torchdiff.bench` each set up their trainer for one
config and hand this module three things: how to take the data of one update from the loader,
how to run that update to completion (host-to-device copy, the step, the metrics read back, as
the trainer's loop does), and a float32 matmul. `time_updates` times the loader wait and the whole
update separately, so the fraction of each update spent waiting for data is measured, not
inferred; `summarize` turns the times into the record that `shared.bench` reads back
(`write_results`), one JSON file per backend process.

Both backends define the numbers the same way, here:

* step time: the median over the timed updates (after the warm-up ones) of the whole update,
  loader wait included, as `train_summary.json`'s step times are;
* data wait: the time inside ``next(loader)`` over that update's time (mean and worst update);
* FLOP/s: the backend's FLOP count of one update over the median step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shared.diffusers_format import atomic_write_text


@dataclasses.dataclass
class UpdateTimes:
    """Seconds per update, in order: inside ``next(loader)``, the whole update, and the CPU time
    of this process's threads during it (a figure that another process's load moves less)."""

    wait: list[float] = dataclasses.field(default_factory=list)
    total: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)


def time_updates(
    next_batches: Callable[[], Any], update: Callable[[Any], None], *, steps: int
) -> UpdateTimes:
    """Runs `steps` updates, timing each one's loader wait and its whole duration.

    Args:
      next_batches: takes one update's data from the loader (the only place the step waits
        for data).
      update: runs the update on that data and returns only when its results are on the host
        (a backend that dispatches asynchronously blocks on the metrics here, as its trainer's
        loop does when it logs them).
    """
    times = UpdateTimes()
    for _ in range(steps):
        cpu, started = time.process_time(), time.perf_counter()
        batches = next_batches()
        loaded = time.perf_counter()
        update(batches)
        done = time.perf_counter()
        times.wait.append(loaded - started)
        times.total.append(done - started)
        times.cpu.append(time.process_time() - cpu)
    return times


def summarize(
    times: UpdateTimes, *, warmup: int, images_per_update: int, step_flops: float | None
) -> dict[str, Any]:
    """The step-time figures of `times`, the first `warmup` updates left out."""
    wait, total = times.wait[warmup:], times.total[warmup:]
    if not total:
        raise ValueError(f"no timed updates: {len(times.total)} run, {warmup} of them warm-up")
    median = statistics.median(total)
    achieved = step_flops / median if step_flops else None
    return {
        "timed_steps": len(total),
        "warmup_steps": warmup,
        "first_step_seconds": times.total[0],
        "step_seconds": median,
        "step_seconds_min": min(total),
        "step_seconds_max": max(total),
        "step_seconds_all": total,
        "step_cpu_seconds": statistics.median(times.cpu[warmup:]) if times.cpu else None,
        "images_per_update": images_per_update,
        "images_per_second": images_per_update / median,
        "data_wait_fraction": sum(wait) / sum(total),
        "data_wait_fraction_max": max(w / t for w, t in zip(wait, total, strict=True)),
        "step_flops": step_flops,
        "achieved_flops_per_second": achieved,
    }


def matmul_flops_per_second(
    matmul: Callable[[], None], *, size: int, repeats: int = 5, seconds: float = 2.0
) -> float:
    """The best rate of a (size x size) @ (size x size) float32 product: 2 size^3 FLOP over
    the fastest of `repeats` runs after one warm-up (fewer when they pass `seconds`).

    Args:
      matmul: computes one product and returns when it is done (blocks on the device).
    """
    matmul()  # the warm-up: compilation, thread pools, allocator
    best, started = math.inf, time.perf_counter()
    for _ in range(repeats):
        begin = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - begin)
        if time.perf_counter() - started > seconds:
            break
    return 2.0 * size**3 / best


def cores_available() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --- the backend process's command line and results file ---------------------------------------


def parse_backend_argv(argv: Sequence[str], *, prog: str) -> tuple[argparse.Namespace, list[str]]:
    """``python -m {backend}diff.bench --task T --results FILE [--warmup N] [--matmul_size N]
    -- TRAINING FLAGS``: the benchmark's own flags, and the training flags that follow."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="One backend's half of `twindiff bench` (see shared.bench).",
        allow_abbrev=False,
    )
    parser.add_argument("--task", required=True, help="unconditional, text2image or dreambooth")
    parser.add_argument("--results", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    parser.add_argument("--matmul_size", type=int, default=2048)
    args = list(argv)
    split = args.index("--") if "--" in args else len(args)
    return parser.parse_args(args[:split]), args[split + 1 :]


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path
