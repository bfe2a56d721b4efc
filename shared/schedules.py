"""Diffusion schedule math in float64 numpy: the reference both backends are checked against.

Names follow diffusers' `DDPMScheduler` (`betas`, `alphas_cumprod`, `add_noise`, `get_velocity`,
`prediction_type`) so parity tests map one onto the other. diffusers builds its schedules in torch
float32; here everything is float64, so each backend's gap to this module is its own rounding.
Noise, timestep sampling, offset noise and input perturbation need an RNG: they live in the
backends' `diffusion.py`. Shapes: T = num_train_timesteps, B = batch; "ab" is alphas_cumprod.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

BetaFn = Callable[[int, float, float], np.ndarray]  # (T, beta_start, beta_end) -> betas (T,)
BETA_SCHEDULES: dict[str, BetaFn] = {}


def _register_beta_schedule(name: str) -> Callable[[BetaFn], BetaFn]:
    def register(fn: BetaFn) -> BetaFn:
        BETA_SCHEDULES[name] = fn
        return fn

    return register


@_register_beta_schedule("linear")
def _linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


@_register_beta_schedule("scaled_linear")
def _scaled_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    # Latent diffusion (Stable Diffusion) spaces sqrt(beta) linearly, not beta itself.
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


@_register_beta_schedule("squaredcos_cap_v2")
def _squaredcos_cap_v2(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    # GLIDE / improved-DDPM cosine schedule; diffusers ignores beta_start and beta_end for it too.
    return betas_for_alpha_bar(num_train_timesteps)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta), as diffusers.

    alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2) is not 1 at t = 0 (diffusers does not normalize
    it either); only its ratios matter. The cap bites at the end, where alpha_bar(1) ≈ 0 would give
    beta = 1: a singular last step (improved DDPM, §3.2). Returns float64 betas, (T,).
    """

    def alpha_bar(t: np.ndarray) -> np.ndarray:
        # diffusers' operation order, so that both float64 evaluations agree to the last bits.
        return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_diffusion_timesteps, dtype=np.float64)  # (T,)
    ratio = alpha_bar((steps + 1) / num_diffusion_timesteps) / alpha_bar(
        steps / num_diffusion_timesteps
    )
    return np.minimum(1 - ratio, max_beta)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: np.ndarray | list[float] | None = None,
) -> np.ndarray:
    """Returns float64 betas, (T,), as `DDPMScheduler.__init__` builds them.

    Args:
        beta_schedule: A key of `BETA_SCHEDULES`; ignored when `trained_betas` is given, as in
            diffusers.
        num_train_timesteps: T.
        beta_start: First beta of "linear" and "scaled_linear" (unused by "squaredcos_cap_v2").
        beta_end: Last beta, likewise.
        trained_betas: Explicit betas, returned as float64 (`NoiseSchedule` checks their length).

    Raises:
        ValueError: Unknown `beta_schedule`; the message lists the valid ones.
    """
    if trained_betas is not None:
        return np.array(trained_betas, dtype=np.float64)
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"Unknown beta_schedule {beta_schedule!r}; valid: {', '.join(sorted(BETA_SCHEDULES))}"
        )
    return BETA_SCHEDULES[beta_schedule](num_train_timesteps, beta_start, beta_end)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so the last timestep has zero SNR (arXiv 2305.08891, Algorithm 1).

    sqrt(ab) is shifted so its last value is 0 and scaled so its first is unchanged; betas are
    recovered from the ratios, the last becoming exactly 1. Training then sees the pure noise that
    sampling starts from. Epsilon prediction is degenerate there (x_T = noise); the paper pairs
    this with v_prediction. Takes betas (T,); returns float64 rescaled betas (T,).
    """
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))  # (T,)
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo cumprod
    return 1.0 - alphas


@dataclasses.dataclass(frozen=True)
class _Parameterization:
    """What the network predicts: its training target, its inverse and its min-SNR weight.

    Coefficients a = sqrt(ab_t), s = sqrt(1 - ab_t) arrive shaped (B, 1, ...) to broadcast.
    """

    target: Callable[..., np.ndarray]  # (x0, noise, a, s) -> target
    original_sample: Callable[..., np.ndarray]  # (model_output, x_t, a, s) -> predicted x0
    min_snr_weight: Callable[[np.ndarray, float], np.ndarray]  # (snr, gamma) -> weight


# One entry per prediction_type (diffusers' names); the min-SNR weights are derived in
# `min_snr_loss_weights`' docstring.
_PREDICTION_TYPES: dict[str, _Parameterization] = {
    # gamma / max(snr, gamma) equals diffusers' min(snr, gamma) / snr bit for bit when snr > 0
    # (1.0 or gamma / snr), and is its limit 1 at snr = 0, where diffusers computes 0/0 = NaN.
    "epsilon": _Parameterization(
        target=lambda x0, noise, a, s: noise,
        original_sample=lambda out, xt, a, s: (xt - s * out) / a,
        min_snr_weight=lambda snr, gamma: gamma / np.maximum(snr, gamma),
    ),
    "v_prediction": _Parameterization(
        target=lambda x0, noise, a, s: a * noise - s * x0,
        original_sample=lambda out, xt, a, s: a * xt - s * out,
        min_snr_weight=lambda snr, gamma: np.minimum(snr, gamma) / (snr + 1),
    ),
    "sample": _Parameterization(
        target=lambda x0, noise, a, s: x0,
        original_sample=lambda out, xt, a, s: out,
        min_snr_weight=lambda snr, gamma: np.minimum(snr, gamma),
    ),
}
PREDICTION_TYPES: tuple[str, ...] = tuple(_PREDICTION_TYPES)


def _parameterization(prediction_type: str) -> _Parameterization:
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
        )
    return _PREDICTION_TYPES[prediction_type]


def _coefficients(
    alphas_cumprod: np.ndarray, timesteps: np.ndarray, ndim: int
) -> tuple[np.ndarray, np.ndarray]:
    """sqrt(ab_t), sqrt(1 - ab_t) at timesteps (B,), each shaped (B, 1, ..., 1) for samples."""
    alpha_prod = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps)].reshape(-1)
    shape = (-1,) + (1,) * (ndim - 1)
    return np.sqrt(alpha_prod).reshape(shape), np.sqrt(1.0 - alpha_prod).reshape(shape)


def add_noise(
    alphas_cumprod: np.ndarray,
    original_samples: np.ndarray,
    noise: np.ndarray,
    timesteps: np.ndarray,
) -> np.ndarray:
    """x_t = sqrt(ab_t)·x0 + sqrt(1 - ab_t)·noise, as `DDPMScheduler.add_noise`.

    Args:
        alphas_cumprod: (T,).
        original_samples: Clean x0, (B, ...).
        noise: (B, ...).
        timesteps: Integers, (B,).

    Returns:
        Noisy samples x_t, (B, ...).
    """
    a, s = _coefficients(alphas_cumprod, timesteps, np.ndim(original_samples))
    return a * original_samples + s * noise


def get_velocity(
    alphas_cumprod: np.ndarray, sample: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
) -> np.ndarray:
    """v = sqrt(ab_t)·noise - sqrt(1 - ab_t)·x0 (Imagen Video §2.4), as `DDPMScheduler.get_velocity`.

    Args:
        alphas_cumprod: (T,).
        sample: Clean x0, (B, ...) (diffusers' name).
        noise: (B, ...).
        timesteps: Integers, (B,).

    Returns:
        Velocity v, (B, ...).
    """
    coefs = _coefficients(alphas_cumprod, timesteps, np.ndim(sample))
    return _PREDICTION_TYPES["v_prediction"].target(sample, noise, *coefs)


def compute_snr(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """SNR ab_t / (1 - ab_t), as `diffusers.training_utils.compute_snr` (which returns float32).

    This is also the loss weight of diffusers' `train_unconditional.py` for prediction_type
    "sample" (`alpha_t / (1 - alpha_t)` there, with `alpha_t = alphas_cumprod[t]`). It is 0 at the
    last step of a zero-terminal-SNR schedule.

    Args:
        alphas_cumprod: (T,).
        timesteps: Integers, (B,).

    Returns:
        float64 SNR, (B,).
    """
    alpha_prod = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps)]
    return alpha_prod / (1.0 - alpha_prod)


def min_snr_loss_weights(snr: np.ndarray, snr_gamma: float, prediction_type: str) -> np.ndarray:
    """Per-sample Min-SNR-gamma loss weights (arXiv 2303.09556), as diffusers' `--snr_gamma`.

    Min-SNR weights the x0 error by min(snr, gamma): unclamped, nearly clean steps (huge snr)
    dominate the gradient. As x0 - x0_hat = (s / a)(eps_hat - eps) = s (v_hat - v), with
    a = sqrt(ab), s = sqrt(1 - ab), an epsilon loss is snr times the x0 loss and a v loss is
    (snr + 1) times it, so each loss divides min(snr, gamma) by its own factor:
    "epsilon": min(snr, gamma) / snr, and 1 at snr = 0 (diffusers: 0/0 = NaN);
    "v_prediction": min(snr, gamma) / (snr + 1); "sample": min(snr, gamma).

    Args:
        snr: (B,), from `compute_snr`.
        snr_gamma: The clamp gamma (5 in the paper).
        prediction_type: One of `PREDICTION_TYPES`.

    Returns:
        float64 weights, (B,).

    Raises:
        ValueError: Unknown `prediction_type`; the message lists the valid ones.
    """
    weight_fn = _parameterization(prediction_type).min_snr_weight
    return weight_fn(np.asarray(snr, dtype=np.float64), float(snr_gamma))


def training_target(
    prediction_type: str,
    *,
    sample: np.ndarray,
    noise: np.ndarray,
    alphas_cumprod: np.ndarray,
    timesteps: np.ndarray,
) -> np.ndarray:
    """What the network learns to output: noise ("epsilon"), velocity, or the clean sample.

    Args:
        prediction_type: One of `PREDICTION_TYPES`; unknown ones raise ValueError.
        sample: Clean x0, (B, ...).
        noise: (B, ...).
        alphas_cumprod: (T,).
        timesteps: Integers, (B,).

    Returns:
        Target, (B, ...).
    """
    param = _parameterization(prediction_type)
    return param.target(sample, noise, *_coefficients(alphas_cumprod, timesteps, np.ndim(sample)))


def predict_original_sample(
    prediction_type: str,
    *,
    model_output: np.ndarray,
    noisy_samples: np.ndarray,
    alphas_cumprod: np.ndarray,
    timesteps: np.ndarray,
) -> np.ndarray:
    """Inverts `training_target`: x0 from a model output and x_t (diffusers' `pred_original_sample`).

    Args:
        prediction_type: One of `PREDICTION_TYPES`; unknown ones raise ValueError.
        model_output: (B, ...).
        noisy_samples: x_t, (B, ...).
        alphas_cumprod: (T,).
        timesteps: Integers, (B,).

    Returns:
        Predicted x0, (B, ...); for "epsilon" infinite where ab_t = 0 (zero terminal SNR).
    """
    coefs = _coefficients(alphas_cumprod, timesteps, np.ndim(noisy_samples))
    return _parameterization(prediction_type).original_sample(model_output, noisy_samples, *coefs)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: __eq__ over arrays is ambiguous
class NoiseSchedule:
    """A DDPM noise schedule in float64, derived from betas as `DDPMScheduler.__init__` derives it.

    alphas and alphas_cumprod are computed in `__post_init__`, never passed, so they cannot disagree
    with betas; the arrays are read-only so that the frozen object really is frozen.

    Attributes:
        betas: (T,). alphas: (T,), 1 - betas. alphas_cumprod: (T,), cumprod(alphas).
        num_train_timesteps: T. prediction_type: One of `PREDICTION_TYPES`.
    """

    betas: np.ndarray
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    alphas: np.ndarray = dataclasses.field(init=False)
    alphas_cumprod: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        _parameterization(self.prediction_type)
        betas = np.array(self.betas, dtype=np.float64)  # a private copy, (T,)
        if betas.shape != (self.num_train_timesteps,):
            raise ValueError(
                f"betas (or trained_betas) have shape {betas.shape}, expected "
                f"({self.num_train_timesteps},) for num_train_timesteps={self.num_train_timesteps}"
            )
        if not np.all((betas >= 0) & (betas <= 1)):
            raise ValueError(f"betas must lie in [0, 1], got [{betas.min()}, {betas.max()}]")
        alphas = 1.0 - betas
        for name, array in (
            ("betas", betas),
            ("alphas", alphas),
            ("alphas_cumprod", np.cumprod(alphas)),
        ):
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)  # (T,)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)  # (T,)

    @classmethod
    def create(
        cls,
        *,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: np.ndarray | list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        """The schedule `DDPMScheduler(**same_kwargs)` builds, in float64; defaults are its own."""
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, num_train_timesteps, prediction_type)

    @classmethod
    def from_scheduler_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        """From a diffusers `scheduler_config.json` dict; other keys (`_class_name`, ...) are ignored.

        Missing or null keys take `create`'s defaults, which are DDPMScheduler's. The DDPM-family
        schedulers (DDPM, DDIM, PNDM, Euler, ...) all write these keys with the same meaning.
        """
        kwargs = {key: cfg[key] for key in _SCHEDULER_CONFIG_KEYS if cfg.get(key) is not None}
        return cls.create(**kwargs)

    @classmethod
    def from_pretrained_folder(cls, path: str | os.PathLike[str]) -> NoiseSchedule:
        """From `<path>/scheduler/scheduler_config.json` of a diffusers model folder."""
        config_file = Path(path) / "scheduler" / "scheduler_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"No scheduler config: {config_file} does not exist")
        return cls.from_scheduler_config(json.loads(config_file.read_text()))


# create's keyword arguments carry diffusers' config names, so they are the keys to read.
_SCHEDULER_CONFIG_KEYS: tuple[str, ...] = tuple(inspect.signature(NoiseSchedule.create).parameters)
