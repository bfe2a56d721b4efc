"""The quick start's digit score: its splits, its Fréchet distance and its ordering of image sets."""

import numpy as np
import pytest
from PIL import Image

from shared import quality

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def scorer():
    return quality.DigitScorer(size=16)


def test_splits_are_disjoint_and_cover_every_digit():
    s = quality.digit_splits()
    parts = [set(s.classifier), set(s.reference), set(s.held_out)]
    assert [len(p) for p in parts] == [1000, 541, 256]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sorted(parts[0] | parts[1] | parts[2]) == list(range(1797))
    assert set(s.generator_training).isdisjoint(parts[2])
    assert quality.digit_splits().held_out.tolist() == s.held_out.tolist()  # seeded


def test_frechet_distance_against_scipys_matrix_root():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root)
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert abs(quality.frechet_distance(a, a)) < 1e-9 * np.trace(ca)
    # Equal covariances: only the means' squared distance is left.
    assert quality.frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 6, rel=1e-9)


def test_classifier_input_undoes_the_folders_upscaling():
    images, _ = quality.load_digits()
    real = quality.real_digits(np.arange(20), 16)
    back = quality.to_classifier_input(real).reshape(20, 8, 8)
    # Bilinear 8 -> 16 then 2x2 area means: the digit within a blur of its neighbours.
    assert np.abs(back - images[:20]).mean() < 2.0  # of a 0-16 scale
    assert np.corrcoef(back.ravel(), images[:20].ravel())[0, 1] > 0.95


def test_scores_order_real_blurred_and_noise(scorer):
    assert scorer.accuracy > 0.95  # on the held-out digits
    base = scorer.baselines(256)
    real, noise = base["real held-out digits"], base["uniform noise"]
    held = quality.real_digits(scorer.splits.held_out, 16)
    blurred = np.stack(
        [
            np.asarray(
                Image.fromarray(x[..., 0].astype(np.float32), "F").resize((5, 5)).resize((16, 16))
            )
            for x in held
        ]
    )[..., None]
    soft = scorer.score(np.clip(blurred, 0, 1))
    assert real.frechet < soft.frechet < noise.frechet
    assert real.frechet < 30 and noise.frechet > 500
    assert real.confident > 0.85 and real.class_entropy > 0.97
    assert noise.class_entropy < 0.5  # noise is read as one or two digits
    assert sum(real.class_counts) == real.images == 256


def test_one_repeated_digit_has_no_class_spread(scorer):
    one = np.repeat(quality.real_digits(scorer.splits.held_out[:1], 16), 10, axis=0)
    score = scorer.score(one + np.random.default_rng(0).normal(0, 1e-3, one.shape))
    assert score.class_entropy == 0.0 and max(score.class_counts) == 10
    with pytest.raises(ValueError, match="at least two"):
        scorer.score(one[:1])
