"""`twindiff bench`: one config, timed on both backends, one after the other.

Each backend runs in its own process (`python -m flaxdiff.bench`, `python -m torchdiff.bench`),
never two at once, so neither shares the cores with the other and each peak RSS is that
backend's alone. This process imports neither framework: it builds the offline data, times the
shared `Loader` alone on it and a numpy float32 matmul, starts the backends, and joins their
records into one table and one JSON document (`shared.bench.table`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared import cli
from shared import config as C
from shared.api import check_backend, installed_backends
from shared.bench import measure, table
from shared.bench.presets import PRESETS, Preset, Size, training_args
from shared.config import ConfigError
from shared.data import build_loader, build_source
from shared.demo import build_demo_assets

# A GPU (NVIDIA), a TPU (v2/v3: accel, v4 and later: vfio) or an AMD GPU: the accelerator sizes.
ACCELERATOR_FILES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")
LOG_TAIL_LINES = 25


def detect_device() -> str:
    """ "accelerator" when this machine has a GPU or TPU device file, else "cpu"."""
    return "accelerator" if any(Path(f).exists() for f in ACCELERATOR_FILES) else "cpu"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="twindiff bench",
        description="Times one config on both backends; unknown flags are training flags.",
        allow_abbrev=False,  # a training flag must never be taken for a prefix of ours
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--backends", nargs="+", choices=C.BACKENDS, default=None,
                        help="default: every backend whose framework is installed")  # fmt: skip
    parser.add_argument("--steps", type=int, help="timed updates (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed updates before them")
    parser.add_argument("--batch_size", type=int, help="per device (default: the preset's)")
    parser.add_argument("--resolution", type=int, help="default: the preset's")
    parser.add_argument("--device", choices=["auto", "cpu", "accelerator"], default="auto",
                        help="which of the preset's sizes to use (auto: a GPU/TPU present?)")  # fmt: skip
    parser.add_argument("--json", action="append", default=[], metavar="PATH",
                        help="write the JSON document there; '-' prints it (the table then "
                        "goes to stderr)")  # fmt: skip
    parser.add_argument("--matmul_size", type=int, default=None,
                        help="float32 matmul size (default 2048 on a CPU, 8192 otherwise)")  # fmt: skip
    parser.add_argument("--assets", type=Path, default=None,
                        help="folder for the offline data (built once, reused)")  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="keep the runs, logs and records there (default: a temporary "
                        "folder, removed unless a backend fails)")  # fmt: skip
    return parser.parse_known_args(list(argv))


def _size(preset: Preset, device: str, args: argparse.Namespace) -> Size:
    base = preset.size(device)
    size = Size(
        resolution=args.resolution or base.resolution,
        batch_size=args.batch_size or base.batch_size,
        steps=base.steps if args.steps is None else args.steps,
        warmup=base.warmup if args.warmup is None else args.warmup,
    )
    if size.steps < 1 or size.warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {size}")
    return size


def numpy_matmul_rate(size: int) -> float:
    a = np.ones((size, size), np.float32)
    b = np.ones((size, size), np.float32)
    return measure.matmul_flops_per_second(lambda: a @ b, size=size)


def loader_rate(argv: Sequence[str], *, task: str, backend: str, batch_size: int) -> dict:
    """The shared `Loader` alone on the benchmark's data: images per second after 2 warm-up
    batches, over at least 1 s and 5 batches (decoding, transforms and collation; no step)."""
    cfg = cli.parse_args(argv, task=task, backend=backend)
    source = build_source(cfg, verify=False)  # each backend's setup checks the images
    with build_loader(cfg, source, batch_size=batch_size) as loader:
        for _ in range(2):
            next(loader)
        images, batches, started = 0, 0, time.perf_counter()
        while batches < 5 or time.perf_counter() - started < 1.0:
            images += len(next(loader)["index"])
            batches += 1
        seconds = time.perf_counter() - started
    return {
        "images_per_second": images / seconds,
        "num_workers": cfg.data.dataloader_num_workers,
        "batch_size": batch_size,
    }


def run_backend(
    backend: str, *, task: str, argv: Sequence[str], warmup: int, matmul_size: int, work: Path
) -> dict[str, Any]:
    """One backend's benchmark process; its record, or ``{"error": ...}`` when it failed."""
    results, log = work / f"{backend}.json", work / f"{backend}.log"
    command = [
        sys.executable, "-m", f"{backend}diff.bench",
        "--task", task, "--results", str(results), "--warmup", str(warmup),
        "--matmul_size", str(matmul_size), "--", *argv,
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("TWINDIFF_LOG_LEVEL", "WARNING")  # the log file keeps warnings and errors
    print(f"twindiff bench: running {backend} ({log})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not results.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(f"  {backend}| {line}" for line in tail), file=sys.stderr)
        return {"backend": backend, "error": f"exit status {done.returncode}; log: {log}"}
    record = json.loads(results.read_text(encoding="utf-8"))
    record["process_seconds"] = wall
    record["command"] = command[1:]
    return record


def bench(args: argparse.Namespace, extra: Sequence[str]) -> tuple[dict[str, Any], bool]:
    """Runs the benchmark (`parse_args`' flags, then training flags); returns the JSON document
    and whether every backend ran."""
    backends = args.backends or installed_backends()
    if not backends:
        raise ConfigError('no backend installed: pip install -e ".[flax]" and/or ".[torch]"')
    for backend in backends:
        check_backend(backend)
    preset = PRESETS[args.preset]
    device = detect_device() if args.device == "auto" else args.device
    size = _size(preset, device, args)
    matmul_size = args.matmul_size or (2048 if device == "cpu" else 8192)
    keep = args.output_dir is not None
    work = args.output_dir or Path(tempfile.mkdtemp(prefix="twindiff-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    assets = build_demo_assets(args.assets or Path(tempfile.gettempdir()) / "twindiff-bench-assets")

    def argv_for(backend: str) -> list[str]:
        return training_args(preset, size, assets=assets, output_dir=work / backend, extra=extra)

    cli.parse_args(argv_for(backends[0]), task=preset.task, backend=backends[0])  # fail early
    loader = loader_rate(
        argv_for("loader"), task=preset.task, backend=backends[0], batch_size=size.batch_size
    )
    numpy_rate = numpy_matmul_rate(matmul_size)
    records = {}
    for backend in backends:  # one after the other, never concurrently
        records[backend] = run_backend(
            backend,
            task=preset.task,
            argv=argv_for(backend),
            warmup=size.warmup,
            matmul_size=matmul_size,
            work=work,
        )
    header = {
        "preset": preset.name,
        "description": preset.description,
        "task": preset.task,
        "model_config": preset.model_config,
        "device_class": device,
        "resolution": size.resolution,
        "batch_size": size.batch_size,
        "steps": size.steps,
        "warmup": size.warmup,
        "extra_flags": list(extra),
        "machine": f"{measure.cores_available()} CPU cores available, {device} sizes",
        "output_dir": str(work) if keep else None,
    }
    document = table.combine(
        header, records, numpy_matmul=numpy_rate, matmul_size=matmul_size, loader=loader
    )
    ok = not any(r.get("error") for r in records.values())
    if ok and not keep:
        shutil.rmtree(work, ignore_errors=True)
    return document, ok


def run(argv: Sequence[str]) -> int:
    """`twindiff bench ARGV`: 0 when every backend ran, 1 when one failed, 2 for a usage error."""
    args, extra = parse_args(argv)
    try:
        document, ok = bench(args, extra)
    except ConfigError as err:
        print(f"twindiff bench: error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(document, indent=2) + "\n"
    print(table.format_table(document), file=sys.stderr if "-" in args.json else sys.stdout)
    for target in args.json:
        if target == "-":
            sys.stdout.write(text)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_text(text, encoding="utf-8")
    return 0 if ok else 1
