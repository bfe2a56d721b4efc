"""How good are generated digits? The quick start's score, computed the same way for both backends.

A small classifier (scikit-learn's `MLPClassifier`, one hidden layer of 64 ReLU units) is trained
on real 8x8 digits. Every image, real or generated, is brought to that classifier's input the same
way: grey, area-averaged to 8x8, scaled to [0, 16]. Three numbers then describe a set of images:

- ``frechet``: the Fréchet distance between the Gaussians fitted to the classifier's hidden
  features of the images and of real reference digits (FID's formula in a 64-dim feature space
  that knows digits; 0 for identical statistics, lower is better);
- ``confident``: the fraction of images the classifier labels with probability >= 0.9
  (recognizable digits);
- ``class_entropy``: the entropy of the predicted labels' histogram over log(10): 1 when the ten
  digits are equally frequent, 0 when every image is the same digit (mode collapse).

The 1797 digits are split once, by a seeded permutation, into the classifier's training digits,
the reference digits and a held-out set that neither the classifier nor the diffusion model sees:
scoring the held-out digits gives the best score to expect, scoring uniform noise the worst.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.demo import load_digits, upscale_digits

SPLIT_SEED = 0
CLASSIFIER_DIGITS = 1000  # the classifier learns from these
HELD_OUT_DIGITS = 256  # never trained on; the rest (541) are the reference statistics
CONFIDENT = 0.9


@dataclasses.dataclass(frozen=True)
class DigitSplits:
    """Indices into scikit-learn's digits: classifier, reference and held-out (disjoint)."""

    classifier: np.ndarray
    reference: np.ndarray
    held_out: np.ndarray

    @property
    def generator_training(self) -> np.ndarray:
        """The digits a generative model may train on: all but the held-out ones."""
        return np.sort(np.concatenate([self.classifier, self.reference]))


def digit_splits() -> DigitSplits:
    _, labels = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    held = HELD_OUT_DIGITS
    return DigitSplits(
        classifier=np.sort(order[held : held + CLASSIFIER_DIGITS]),
        reference=np.sort(order[held + CLASSIFIER_DIGITS :]),
        held_out=np.sort(order[:held]),
    )


def real_digits(indices: np.ndarray, size: int) -> np.ndarray:
    """The digits at `indices` as the training folder holds them: float (N, size, size, 1) in
    [0, 1], so real and generated images reach the classifier through the same resizing."""
    images, _ = load_digits()
    return upscale_digits(images[indices], size)[..., None].astype(np.float64) / 255.0


def to_classifier_input(images: np.ndarray) -> np.ndarray:
    """Images (N, H, W, C) in [0, 1] -> (N, 64) in [0, 16]: grey (channel mean), 8x8 by area."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    grey = np.clip(images.mean(axis=-1), 0.0, 1.0).astype(np.float32)
    small = [
        np.asarray(Image.fromarray(g, mode="F").resize((8, 8), Image.Resampling.BOX)) for g in grey
    ]
    return np.stack(small).reshape(len(grey), 64).astype(np.float64) * 16.0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    cross = np.sqrt(np.clip(middle, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


@dataclasses.dataclass(frozen=True)
class DigitScore:
    """The score of one set of images (see the module docstring)."""

    frechet: float
    confident: float
    class_entropy: float
    class_counts: tuple[int, ...]
    images: int

    def line(self) -> str:
        return (
            f"Fréchet distance {self.frechet:7.2f}   confident {self.confident:6.1%}   "
            f"class spread {self.class_entropy:.2f}"
        )


class DigitScorer:
    """Scores image sets against real digits; builds (and trains) its classifier on creation."""

    def __init__(self, splits: DigitSplits | None = None, *, size: int = 16):
        from sklearn.neural_network import MLPClassifier  # scikit-learn: the data extra

        self.splits = splits or digit_splits()
        self.size = size
        _, labels = load_digits()
        x = to_classifier_input(real_digits(self.splits.classifier, size))
        self.classifier = MLPClassifier(
            hidden_layer_sizes=(64,), alpha=1e-3, max_iter=600, random_state=SPLIT_SEED
        )
        self.classifier.fit(x, labels[self.splits.classifier])
        held = self.splits.held_out
        self.accuracy = float(
            self.classifier.score(to_classifier_input(real_digits(held, size)), labels[held])
        )
        self._reference = self.features(real_digits(self.splits.reference, size))

    def features(self, images: np.ndarray) -> np.ndarray:
        """The hidden layer's ReLU activations, (N, 64)."""
        x = to_classifier_input(images)
        hidden = x @ self.classifier.coefs_[0] + self.classifier.intercepts_[0]
        return np.maximum(hidden, 0.0)

    def score(self, images: np.ndarray) -> DigitScore:
        """The score of `images`, (N, H, W, C) floats in [0, 1] (N >= 2)."""
        if len(images) < 2:
            raise ValueError("scoring needs at least two images (a covariance)")
        probabilities = self.classifier.predict_proba(to_classifier_input(images))
        counts = np.bincount(probabilities.argmax(axis=1), minlength=10)
        frequencies = counts[counts > 0] / counts.sum()
        entropy = float(-(frequencies * np.log(frequencies)).sum() / math.log(10))
        return DigitScore(
            frechet=frechet_distance(self.features(images), self._reference),
            confident=float((probabilities.max(axis=1) >= CONFIDENT).mean()),
            class_entropy=entropy,
            class_counts=tuple(int(c) for c in counts),
            images=len(images),
        )

    def baselines(self, count: int, *, seed: int = 0) -> dict[str, DigitScore]:
        """The scale: held-out real digits (the best to expect) and uniform noise (the worst),
        `count` images each (the held-out set holds 256)."""
        held = self.splits.held_out[:count]
        noise = np.random.default_rng(seed).random((count, self.size, self.size, 1))
        return {
            "real held-out digits": self.score(real_digits(held, self.size)),
            "uniform noise": self.score(noise),
        }


def write_report(path: str | Path, scores: dict[str, DigitScore], extra: dict[str, Any]) -> Path:
    """Writes the scores (and e.g. the backend, steps, wall time) as JSON."""
    path = Path(path)
    body = {**extra, "scores": {name: dataclasses.asdict(s) for name, s in scores.items()}}
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path
