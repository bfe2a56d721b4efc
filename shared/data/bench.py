"""Loader throughput: decode + resize + random crop + flip, per worker count.

    python -m shared.data.bench [--resolution 512] [--num_images 64] [--workers 0 1 2]
                                [--seconds 5] [--image_dir DIR]

Writes `num_images` JPEG photos (quality 90, 1024x768 and 768x1024) once into `--image_dir`
(default: a folder in the temp dir, reused): scikit-image's sample photos (astronaut, coffee,
rocket, chelsea, hubble) upscaled, cropped at seeded offsets, with a little seeded grain so the
JPEGs cost what camera photos cost to decode. scikit-image is not imported, only its image files
read; without it the photos are seeded synthetic textures. Then, for each worker count, runs the
`Loader` for `--seconds` after a warm-up and prints images/s and images/s per busy core (CPU time
of this process and its worker processes, from /proc, over wall time). Numbers, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from shared.data.loader import Loader
from shared.data.records import ImageRef, Record
from shared.data.transforms import INTERPOLATION_MODES, ImageTransform

PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "hubble_deep_field.jpg")
LANDSCAPE = (1024, 768)  # (W, H); odd-numbered images are portrait


def _sample_photos() -> list[Image.Image]:
    spec = importlib.util.find_spec("skimage")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        folder = Path(spec.submodule_search_locations[0]) / "data"
        if all((folder / name).is_file() for name in PHOTOS):
            return [Image.open(folder / name).convert("RGB") for name in PHOTOS]
    print("scikit-image not found: using synthetic photos", file=sys.stderr)
    photos = []
    for seed in range(len(PHOTOS)):  # smooth colour fields with edges, like a photo's content
        coarse = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), np.uint8)
        photos.append(Image.fromarray(coarse).resize((640, 480), Image.Resampling.BICUBIC))
    return photos


def make_images(folder: Path, count: int) -> list[Path]:
    """The benchmark JPEGs in `folder`, written if missing. Deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{k:04d}.jpg" for k in range(count)]
    missing = [k for k, path in enumerate(paths) if not path.is_file()]
    if not missing:
        return paths
    photos = _sample_photos()
    for k in missing:
        rng = np.random.default_rng(k)
        width, height = LANDSCAPE if k % 2 == 0 else LANDSCAPE[::-1]
        photo = photos[k % len(photos)]
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.3)
        big = photo.resize(
            (int(np.ceil(photo.width * scale)), int(np.ceil(photo.height * scale))),
            Image.Resampling.LANCZOS,
        )
        left = int(rng.integers(0, big.width - width + 1))
        top = int(rng.integers(0, big.height - height + 1))
        pixels = np.asarray(big.crop((left, top, left + width, top + height)), np.float32)
        pixels += rng.normal(0.0, 3.0, pixels.shape).astype(np.float32)  # sensor grain
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        tmp = paths[k].with_suffix(".tmp")
        image.save(tmp, "JPEG", quality=90)
        tmp.replace(paths[k])  # atomic: an interrupted run leaves no half-written JPEG
    return paths


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds() -> float | None:
    """CPU time of this process and all its descendants (alive ones), or None without /proc."""
    if not Path("/proc/self/stat").exists():
        return None
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def measure(source, transform, *, workers: int, args) -> dict[str, float]:
    start = time.perf_counter()
    with Loader(
        source,
        batch_size=args.batch_size,
        transform=transform,
        seed=0,
        num_workers=workers,
        prefetch_batches=args.prefetch_batches,
        start_method=args.start_method,
    ) as loader:
        next(loader)
        first_batch = time.perf_counter() - start
        for _ in range(2):  # warm-up: every worker busy, prefetch queue full
            next(loader)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        images = 0
        while time.perf_counter() - t0 < args.seconds:
            images += len(next(loader)["index"])
        wall, cpu1 = time.perf_counter() - t0, cpu_seconds()
    cores = (cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else float("nan")
    return {
        "workers": workers,
        "images_per_s": images / wall,
        "cores": cores,
        "per_core": images / wall / cores if cores > 0 else float("nan"),
        "first_batch_s": first_batch,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed run per worker count")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--prefetch_batches", type=int, default=2)
    parser.add_argument(
        "--image_interpolation_mode", default="bilinear", choices=INTERPOLATION_MODES
    )
    parser.add_argument(
        "--start_method", default=None, choices=multiprocessing.get_all_start_methods()
    )
    parser.add_argument("--image_dir", type=Path, default=None)
    args = parser.parse_args(argv)

    folder = args.image_dir or Path(tempfile.gettempdir()) / "twindiff-loader-bench"
    paths = make_images(folder, args.num_images)
    source = [Record(ImageRef(str(p), path=str(p))) for p in paths]
    transform = ImageTransform(
        args.resolution, random_flip=True, interpolation=args.image_interpolation_mode
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{len(paths)} JPEGs {LANDSCAPE[0]}x{LANDSCAPE[1]} (q90) in {folder} -> {args.resolution}px, "
        f"{args.image_interpolation_mode}, random crop + flip; batch {args.batch_size}, "
        f"{args.start_method or 'default'} start; {cores} CPU cores available"
    )
    print(
        f"{'workers':>7} {'images/s':>9} {'cores busy':>10} {'images/s/core':>13} {'1st batch s':>11}"
    )
    for workers in args.workers:
        r = measure(source, transform, workers=workers, args=args)
        print(
            f"{r['workers']:>7} {r['images_per_s']:>9.1f} {r['cores']:>10.2f} "
            f"{r['per_core']:>13.1f} {r['first_batch_s']:>11.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
