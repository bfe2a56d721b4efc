"""The diffusion training objective in JAX: noise, timesteps, targets and loss weights.

The counterpart of `torchdiff.diffusion`, term for term: the forward process and targets of
diffusers' `DDPMScheduler`, the losses of `train_text_to_image.py`, `train_dreambooth.py` and
`train_unconditional.py`. The network knows nothing of schedules; `Objective` owns them. Every
method is a pure function of its arguments and of the objective's constants, so a jitted train step
closes over the objective (or passes it as a static argument: it hashes by identity). Schedule math
is `shared.schedules` (float64 numpy); the tables are built once, at construction.

Samples are NHWC. Shapes: B = batch, H, W = spatial, C = channels, T = num_train_timesteps;
"ab" is alphas_cumprod.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from shared import schedules
from shared.config import TrainConfig
from shared.run.task import objective_options

PREDICTION_TYPES: tuple[str, ...] = schedules.PREDICTION_TYPES

# The loss is float32 whatever the model's dtype, as in the reference scripts and torchdiff
# (`model_pred.float()`): a bfloat16 mean over a batch of latents loses most of its digits.
LOSS_DTYPE = jnp.float32


@struct.dataclass
class Noised:
    """One noised training batch, as `Objective.draw`, `Objective.noised` and `Objective.dream`
    return it; a pytree, so it passes in and out of jitted functions.

    Attributes:
        clean: x0 (latents or pixels), (B, H, W, C).
        noise: The noise the target is built from (with offset noise, without input
            perturbation), (B, H, W, C).
        timesteps: int32, (B,).
        noisy: The model input x_t, (B, H, W, C).
        target: What the model should predict, (B, H, W, C).
    """

    clean: jax.Array
    noise: jax.Array
    timesteps: jax.Array
    noisy: jax.Array
    target: jax.Array


# eq=False: a generated __eq__ over arrays is ambiguous, and identity hashing lets the objective be
# a static argument of jax.jit.
@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """The DDPM training objective: forward process, target, and (Min-SNR) weighted MSE.

    Attributes:
        alphas_cumprod: (T,); any array-like is accepted and stored as a jnp array of the default
            float dtype at construction: float32, or float64 when jax_enable_x64 is on (build the
            objective under x64 for float64 parity tests).
        prediction_type: "epsilon", "v_prediction" or "sample".
        snr_gamma: Min-SNR-gamma clamp (arXiv 2303.09556); None weights all timesteps equally
            (except for "sample", weighted by snr as in `train_unconditional.py`).
        noise_offset: Offset-noise scale: noise += s * N(0, 1) per sample and channel.
        input_perturbation: Input-perturbation scale (arXiv 2301.11706): the model input is noised
            with a perturbed noise while the target keeps the unperturbed one.
        prior_loss_weight: DreamBooth prior-preservation weight; None: no prior split.
    """

    alphas_cumprod: jax.Array
    prediction_type: str
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    prior_loss_weight: float | None = None
    # Derived in __post_init__, never passed: float64 SNR (T,) and float32 loss weights (T,).
    _snr_table: np.ndarray = dataclasses.field(init=False, repr=False)
    _loss_weights: jax.Array | None = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Unknown prediction_type {self.prediction_type!r}; "
                f"valid: {', '.join(PREDICTION_TYPES)}"
            )
        # A private float64 host copy: the tables below are float64 math whatever jax's mode.
        alphas_cumprod = np.array(self.alphas_cumprod, dtype=np.float64)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.size == 0:
            raise ValueError(
                f"alphas_cumprod must be a non-empty (T,) vector, got {alphas_cumprod.shape}"
            )
        snr = schedules.compute_snr(alphas_cumprod, np.arange(alphas_cumprod.shape[0]))  # (T,)
        weights = None
        if self.snr_gamma is not None:
            weights = schedules.min_snr_loss_weights(snr, self.snr_gamma, self.prediction_type)
        elif self.prediction_type == "sample":
            weights = snr  # train_unconditional.py weights the x0 loss by snr itself
        # canonicalize_dtype(float64) is float32 unless x64 is on; the cast rounds to nearest,
        # as torchdiff's `.to(sample.dtype)` does.
        default_float = jax.dtypes.canonicalize_dtype(jnp.float64)
        object.__setattr__(self, "alphas_cumprod", jnp.asarray(alphas_cumprod, default_float))
        object.__setattr__(self, "_snr_table", snr)
        object.__setattr__(
            self,
            "_loss_weights",
            None if weights is None else jnp.asarray(weights, LOSS_DTYPE),
        )

    @classmethod
    def from_config(cls, cfg: TrainConfig, scheduler_config: Mapping[str, Any]) -> Objective:
        """The objective of a run.

        Args:
            cfg: The run's config (`cfg.diffusion.*` and `cfg.noise_offset_scale` are read).
            scheduler_config: A diffusers scheduler config dict (`scheduler_config.json`).

        Returns:
            An `Objective` whose prediction type is `--prediction_type`, else the scheduler's,
            else "epsilon" (the order of the reference scripts).
        """
        return cls(**objective_options(cfg, scheduler_config))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def loss_weights(self) -> jax.Array | None:
        """float32 (T,) loss weight of each timestep; None for the unweighted mean."""
        return self._loss_weights

    # --- forward process --------------------------------------------------------------------------

    def _coefficients(self, sample: jax.Array, timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """sqrt(ab_t), sqrt(1 - ab_t), each (B, 1, ..., 1) in sample's dtype.

        The schedule is cast to the sample dtype before indexing and the square roots, as
        `DDPMScheduler` and torchdiff do, so that a float32 (or bfloat16) batch sees the same
        rounded coefficients on both backends. jnp.sqrt is what torch's `** 0.5` computes.
        Out-of-range timesteps are clamped by jnp indexing (torch would raise).
        """
        alpha_prod = self.alphas_cumprod.astype(sample.dtype)[timesteps].reshape(-1)  # (B,)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return jnp.sqrt(alpha_prod).reshape(shape), jnp.sqrt(1 - alpha_prod).reshape(shape)

    def add_noise(self, clean: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, as `DDPMScheduler.add_noise`; (B, ...)."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._coefficients(clean, timesteps)
        return sqrt_alpha_prod * clean + sqrt_one_minus_alpha_prod * noise

    def velocity(self, clean: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0, as `DDPMScheduler.get_velocity`; (B, ...)."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._coefficients(clean, timesteps)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * clean

    def target(self, clean: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """What the model learns to output: noise, velocity or x0 by `prediction_type`; (B, ...)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(clean, noise, timesteps)
        return clean

    def snr(self, timesteps: jax.Array) -> jax.Array:
        """ab_t / (1 - ab_t) (`shared.schedules.compute_snr`), (B,), in the default float dtype."""
        return jnp.asarray(self._snr_table, self.alphas_cumprod.dtype)[timesteps]

    # --- draws ------------------------------------------------------------------------------------

    def draw(self, key: jax.Array, clean: jax.Array) -> Noised:
        """Draws noise and timesteps for `clean` (B, H, W, C) and builds the model input and target.

        `key` is split into four keys, in this order, one per draw; each is used whether or not
        its option is on, so turning an option on changes no other draw:

        1. `noise`: standard normal, clean's shape and dtype;
        2. `offset`: standard normal (B, 1, ..., 1, C), drawn only if `noise_offset`;
        3. `perturbation`: standard normal, clean's shape, drawn only if `input_perturbation`;
        4. `timesteps`: uniform integers in [0, T), int32 (B,).

        Then everything else is `noised(clean, noise, timesteps, offset=..., perturbation=...)`.

        Args:
            key: A JAX PRNG key (typed or raw); use a fresh one per step (`fold_in(key, step)`).
            clean: x0, (B, H, W, C) (any rank >= 2; the offset is per sample and last axis).

        Returns:
            The `Noised` batch, in clean's dtype.
        """
        noise_key, offset_key, perturbation_key, timestep_key = jax.random.split(key, 4)
        batch = clean.shape[0]
        noise = jax.random.normal(noise_key, clean.shape, clean.dtype)
        offset = None
        if self.noise_offset:
            offset_shape = (batch,) + (1,) * (clean.ndim - 2) + (clean.shape[-1],)
            offset = jax.random.normal(offset_key, offset_shape, clean.dtype)
        perturbation = None
        if self.input_perturbation:
            perturbation = jax.random.normal(perturbation_key, clean.shape, clean.dtype)
        timesteps = jax.random.randint(
            timestep_key, (batch,), 0, self.num_train_timesteps, dtype=jnp.int32
        )
        return self.noised(clean, noise, timesteps, offset=offset, perturbation=perturbation)

    def noised(
        self,
        clean: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
        *,
        offset: jax.Array | None = None,
        perturbation: jax.Array | None = None,
    ) -> Noised:
        """The model input and target from given draws (what `draw` does after drawing).

        With the standard-normal draws passed in, both backends can be fed the same numbers:
        `noise += noise_offset * offset`; the model input is
        `add_noise(clean, noise + input_perturbation * perturbation, timesteps)`; the target is
        built from `noise` (with offset, without perturbation), as torchdiff's `sample`.

        Args:
            clean: x0, (B, H, W, C).
            noise: Standard-normal noise, (B, H, W, C).
            timesteps: Integers in [0, T), (B,).
            offset: Standard-normal offset draw, (B, 1, 1, C); required if `noise_offset`,
                ignored otherwise.
            perturbation: Standard-normal draw, (B, H, W, C); required if `input_perturbation`,
                ignored otherwise.

        Returns:
            The `Noised` batch.

        Raises:
            ValueError: A draw that an enabled option needs is missing.
        """
        if self.noise_offset:
            if offset is None:
                raise ValueError(f"noise_offset={self.noise_offset} needs an offset draw")
            # One shift per (sample, channel): the model learns to change mean brightness.
            noise = noise + self.noise_offset * offset
        model_noise = noise
        if self.input_perturbation:
            if perturbation is None:
                raise ValueError(
                    f"input_perturbation={self.input_perturbation} needs a perturbation draw"
                )
            model_noise = noise + self.input_perturbation * perturbation
        return Noised(
            clean=clean,
            noise=noise,
            timesteps=timesteps,
            noisy=self.add_noise(clean, model_noise, timesteps),
            target=self.target(clean, noise, timesteps),
        )

    def dream(
        self,
        noised: Noised,
        predict_fn: Callable[[jax.Array, jax.Array], jax.Array],
        *,
        detail_preservation: float,
    ) -> Noised:
        """DREAM (arXiv 2312.00210): moves input and target towards what the model predicts.

        As `diffusers.training_utils.compute_dream_and_update_latents` and torchdiff's `dream`:
        with s = sqrt(1 - ab_t) and pred = predict_fn(noisy, timesteps) under stop_gradient,
        delta = (noise - pred) * s**p, noisy += s * delta and target += delta. Coefficients are in
        the sample dtype.

        Args:
            noised: A batch from `draw` or `noised`.
            predict_fn: (noisy (B, H, W, C), timesteps (B,)) -> model output (B, H, W, C);
                parameters and conditioning are bound by the caller.
            detail_preservation: The exponent p (1 in the paper).

        Returns:
            `noised` with `noisy` and `target` updated; `noise` is unchanged.

        Raises:
            NotImplementedError: prediction_type other than "epsilon" (as in diffusers).
        """
        if self.prediction_type != "epsilon":
            raise NotImplementedError(
                f"--dream_training is implemented for prediction_type 'epsilon' only, "
                f"not {self.prediction_type!r}"
            )
        _, sqrt_one_minus_alpha_prod = self._coefficients(noised.noise, noised.timesteps)
        # The extra forward pass only steers the batch; no gradient flows through it.
        pred = jax.lax.stop_gradient(predict_fn(noised.noisy, noised.timesteps))
        delta = (noised.noise - pred) * sqrt_one_minus_alpha_prod**detail_preservation
        return noised.replace(
            noisy=noised.noisy + sqrt_one_minus_alpha_prod * delta,
            target=noised.target + delta,
        )

    # --- loss -------------------------------------------------------------------------------------

    def loss(self, model_pred: jax.Array, noised: Noised) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss, in float32 whatever the model's dtype (as the reference scripts).

        Without prior preservation it is the (weighted) MSE of the whole batch and the metrics are
        `{}` (the trainer logs the loss itself). With `prior_loss_weight`, the batch is
        [instance; class] halves: the loss is the weighted instance MSE plus `prior_loss_weight`
        times the plain MSE of the class half, and the metrics are `loss/instance` and
        `loss/prior` (gradient stopped), the keys torchdiff logs.

        Args:
            model_pred: The model output, (B, H, W, C).
            noised: The batch the prediction was made from.

        Returns:
            (scalar float32 loss, metrics).

        Raises:
            ValueError: An odd batch with prior preservation (at trace time: shapes are static).
        """
        pred = model_pred.astype(LOSS_DTYPE)
        target = noised.target.astype(LOSS_DTYPE)
        timesteps = noised.timesteps
        if self.prior_loss_weight is None:
            return self._weighted_mse(pred, target, timesteps), {}
        batch = pred.shape[0]
        if batch % 2:
            raise ValueError(
                f"prior preservation needs a batch of instance and class examples in equal halves; "
                f"got an odd batch of {batch}"
            )
        half = batch // 2
        instance_loss = self._weighted_mse(pred[:half], target[:half], timesteps[:half])
        prior_loss = jnp.mean(jnp.square(pred[half:] - target[half:]))
        loss = instance_loss + self.prior_loss_weight * prior_loss
        metrics = {
            "loss/instance": jax.lax.stop_gradient(instance_loss),
            "loss/prior": jax.lax.stop_gradient(prior_loss),
        }
        return loss, metrics

    def _weighted_mse(self, pred: jax.Array, target: jax.Array, timesteps: jax.Array) -> jax.Array:
        """Mean over the batch of per-sample MSE times the per-timestep weight (if any)."""
        squared = jnp.square(pred - target)  # (B, H, W, C), float32
        if self._loss_weights is None:
            return jnp.mean(squared)
        per_sample = jnp.mean(squared, axis=tuple(range(1, squared.ndim)))  # (B,)
        return jnp.mean(per_sample * self._loss_weights[timesteps])
