"""`twindiff demo`: an unconditional DDPM learns handwritten digits on a CPU, then is judged.

The steps, all offline: write scikit-learn's digits (all but the held-out ones, see
`shared.quality`) as 16x16 grey PNGs; train ``configs/digits.yaml`` on the chosen backend; sample
256 digits from the exported pipeline on the same backend; save them as a PNG grid; score them
against real digits and print the score next to those of real held-out digits and of noise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared import api, cli, grids, quality
from shared.demo import write_digits_folder

CONFIG = "digits.yaml"
SAMPLES = 256  # scored; the grid shows the first 64
# The samples are drawn as the run's validation images are: DDPM with --ddpm_num_inference_steps
# (50 in digits.yaml). On these small models DDPM's 50 steps score as well as its 1000 (Fréchet
# distance 14-21 against 19) in 1/20 of the time, and better than the deterministic samplers
# (DPM-Solver++: 33 at 50 steps; DDIM: 238 at 250), whose sampling leaves noise in some digits.
DATA_MARKER = ".twindiff-digits.json"


def digits_data(root: Path, *, size: int) -> Path:
    """The training digits as PNGs under `root` (written once; reused when complete)."""
    marker = {"split_seed": quality.SPLIT_SEED, "size": size}
    marker_path = root / DATA_MARKER
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return root / "train"
    splits = quality.digit_splits()
    train = write_digits_folder(root, size=size, indices=splits.generator_training)
    marker_path.write_text(json.dumps(marker))
    return train


def save_samples(images: np.ndarray, path: Path, *, shown: int = 64, zoom: int = 4) -> Path:
    """The first `shown` images as a square grid with grey gaps, enlarged `zoom` times."""
    rows = int(np.sqrt(shown))
    framed = np.pad(images[: rows * rows], ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=0.3)
    grid = grids.make_grid(grids.to_uint8(framed), rows=rows)
    big = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    big = big.resize((big.width * zoom, big.height * zoom), Image.Resampling.NEAREST)
    big.save(path, format="PNG")
    return path


def run(backend: str, flags: Sequence[str]) -> dict[str, Any]:
    """Trains, samples and scores; returns the report (also written to ``quality.json``)."""
    started = time.perf_counter()
    configs, values = cli.parse_cli(flags)
    source: dict[str, Any] = {}
    for path in [CONFIG, *configs]:
        source.update(cli.load_yaml(path))
    source.update(values)
    out, size = Path(source["output_dir"]), source["resolution"]
    source["train_data_dir"] = str(digits_data(out / "data", size=size))
    cfg = api.config(source, backend=backend)
    result = api.train(cfg)
    trained = time.perf_counter()
    images = api.sample(
        result.output_dir,
        backend=backend,
        num_images=SAMPLES,
        num_inference_steps=cfg.validation.ddpm_num_inference_steps,
        seed=cfg.seed,
    )
    sampled = time.perf_counter()
    grid = save_samples(images, result.output_dir / "samples.png")
    scorer = quality.DigitScorer(size=size)
    scores = {f"generated ({backend})": scorer.score(images), **scorer.baselines(SAMPLES)}
    report = {
        "backend": backend,
        "output_dir": str(result.output_dir),
        "samples": str(grid),
        "steps": result.summary.get("steps"),
        "mean_step_seconds": result.summary.get("mean_step_seconds"),
        "final_loss": float(np.mean(result.losses[-20:])) if result.losses else None,
        "train_seconds": trained - started,
        "sample_seconds": sampled - trained,
        "total_seconds": time.perf_counter() - started,
        "classifier_accuracy": scorer.accuracy,
        "sampling_steps": cfg.validation.ddpm_num_inference_steps,
    }
    quality.write_report(result.output_dir / "quality.json", scores, report)
    _print(report, scores)
    return {**report, "scores": scores}


def _print(report: dict[str, Any], scores: dict[str, quality.DigitScore]) -> None:
    step = report["mean_step_seconds"]
    lines = [
        f"twindiff demo: a DDPM trained on handwritten digits with {report['backend']}diff",
        f"  model     {report['output_dir']} (diffusers format: DDPMPipeline.from_pretrained)",
        f"  samples   {report['samples']} (64 of the {SAMPLES} scored; "
        f"{report['sampling_steps']} DDPM steps)",
        f"  time      {report['total_seconds']:.0f} s: training {report['train_seconds']:.0f} s"
        + (f" ({report['steps']} steps, {step:.2f} s/step)" if step else "")
        + f", sampling {report['sample_seconds']:.0f} s",
        f"  quality   {SAMPLES} images each; Fréchet distance in a digit classifier's features "
        "(lower is better), share the classifier labels with >= 90% confidence, class spread "
        "(1 = all ten digits equally often):",
        *(f"    {name:<22} {score.line()}" for name, score in scores.items()),
    ]
    print("\n".join(lines))
