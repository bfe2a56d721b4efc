"""The diffusion training objective in torch: noise, timesteps, targets and loss weights.

The network knows nothing of schedules; `Objective` owns them, with the semantics of diffusers'
`train_text_to_image.py`, `train_dreambooth.py` and `train_unconditional.py`. Schedule math is
`shared.schedules` (float64), as on the flax backend: a schedule from `from_config` differs from
the float32 `alphas_cumprod` of diffusers by float32 rounding (relative 1e-7 to 1e-5), while the
operations on a given schedule are diffusers' own, bit for bit in float32. Shapes: B = batch,
C = channels, T = num_train_timesteps; "ab" is alphas_cumprod.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared import schedules
from shared.config import TrainConfig
from shared.run.task import objective_options

PREDICTION_TYPES: tuple[str, ...] = schedules.PREDICTION_TYPES

# The loss is float32 whatever the model's dtype, as in the reference scripts
# (`model_pred.float()`) and flaxdiff's LOSS_DTYPE; float64 parity tests raise both to float64.
LOSS_DTYPE = torch.float32


# eq=False on both dataclasses: a generated __eq__ over tensors is ambiguous.
@dataclasses.dataclass(frozen=True, eq=False)
class Noised:
    """One noised training batch, as `Objective.sample` (and `Objective.dream`) return it.

    Attributes:
        clean: x0 (latents or pixels), (B, C, H, W).
        noise: The noise the target is built from (with offset noise, without input
            perturbation), (B, C, H, W).
        timesteps: int64, (B,).
        noisy: The model input x_t, (B, C, H, W).
        target: What the model should predict, (B, C, H, W).
    """

    clean: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """The DDPM training objective: forward process, target, and (Min-SNR) weighted MSE.

    Attributes:
        alphas_cumprod: (T,) float64 on CPU; other dtypes, devices and numpy arrays are converted.
        prediction_type: "epsilon", "v_prediction" or "sample".
        snr_gamma: Min-SNR-gamma clamp (arXiv 2303.09556); None weights all timesteps equally
            (except for "sample", weighted by snr as in `train_unconditional.py`).
        noise_offset: Offset-noise scale: noise += s * N(0, 1) per sample and channel.
        input_perturbation: Input-perturbation scale (arXiv 2301.11706): the model input is noised
            with a perturbed noise while the target keeps the unperturbed one.
        prior_loss_weight: DreamBooth prior-preservation weight; None: no prior split.
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    prior_loss_weight: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Unknown prediction_type {self.prediction_type!r}; "
                f"valid: {', '.join(PREDICTION_TYPES)}"
            )
        alphas_cumprod = self.alphas_cumprod
        if not isinstance(alphas_cumprod, torch.Tensor):
            alphas_cumprod = torch.from_numpy(np.array(alphas_cumprod, dtype=np.float64))
        # A private float64 CPU copy: the caller's tensor may change, and weights need float64.
        alphas_cumprod = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64).clone()
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() == 0:
            raise ValueError(
                f"alphas_cumprod must be a non-empty (T,) vector, got {tuple(alphas_cumprod.shape)}"
            )
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)

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

    def _coefficients(
        self, sample: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(ab_t), sqrt(1 - ab_t), each (B, 1, ..., 1) in sample's dtype and device.

        The schedule is cast to the sample dtype before indexing and `** 0.5`, as `DDPMScheduler`
        does, so that with the same alphas_cumprod float32 results equal diffusers' bit for bit.
        The cast happens on the CPU: MPS has no float64.
        """
        alphas_cumprod = self.alphas_cumprod.to(dtype=sample.dtype).to(sample.device)
        alpha_prod = alphas_cumprod[timesteps.to(sample.device)].flatten()
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return (alpha_prod**0.5).reshape(shape), ((1 - alpha_prod) ** 0.5).reshape(shape)

    def add_noise(
        self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, as `DDPMScheduler.add_noise`; (B, ...)."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._coefficients(clean, timesteps)
        return sqrt_alpha_prod * clean + sqrt_one_minus_alpha_prod * noise

    def velocity(
        self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0, as `DDPMScheduler.get_velocity`; (B, ...)."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._coefficients(clean, timesteps)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * clean

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ab_t / (1 - ab_t), float64 (B,) on timesteps' device (`shared.schedules.compute_snr`)."""
        return torch.from_numpy(self._snr_table()).to(timesteps.device)[timesteps]

    def sample(self, clean: torch.Tensor, generator: torch.Generator) -> Noised:
        """Draws noise and timesteps for `clean` (B, C, H, W) and builds the model input and target.

        Every draw uses `generator` on `generator.device`, in `clean.dtype`, in this fixed order
        (a backend that reproduces it draws the same numbers from the same generator state):

        1. `noise = randn(B, C, H, W)`;
        2. if `noise_offset`: `noise += noise_offset * randn(B, C, 1, 1)`;
        3. if `input_perturbation`: `perturbed = noise + input_perturbation * randn(B, C, H, W)`;
        4. `timesteps = randint(0, T, (B,))`, int64.

        Then `noised` builds the rest: `noisy = add_noise(clean, perturbed or noise, timesteps)`,
        and the target is `noise` ("epsilon"), `velocity(clean, noise, timesteps)`
        ("v_prediction") or `clean` ("sample"). The draws are moved to `clean.device` first.

        Args:
            clean: x0, (B, C, H, W) (any rank >= 2 works; the offset is per sample and channel).
            generator: The RNG; its state advances.

        Returns:
            The `Noised` batch, in `clean.dtype` on `clean.device`.
        """

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(
                shape, generator=generator, device=generator.device, dtype=clean.dtype
            ).to(clean.device)

        batch = clean.shape[0]
        noise = draw(*clean.shape)
        offset = perturbation = None
        if self.noise_offset:
            offset = draw(*clean.shape[:2], *(1,) * (clean.ndim - 2))
        if self.input_perturbation:
            perturbation = draw(*clean.shape)
        timesteps = torch.randint(
            0, self.num_train_timesteps, (batch,), generator=generator, device=generator.device
        ).to(clean.device)
        return self.noised(clean, noise, timesteps, offset=offset, perturbation=perturbation)

    def noised(
        self,
        clean: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        offset: torch.Tensor | None = None,
        perturbation: torch.Tensor | None = None,
    ) -> Noised:
        """The model input and target from given draws (what `sample` does after drawing).

        flaxdiff's `Objective.noised` in NCHW: with the standard-normal draws passed in, both
        backends can be fed the same numbers (the parity tests do).

        Args:
            clean: x0, (B, C, H, W).
            noise: Standard-normal noise, (B, C, H, W).
            timesteps: Integers in [0, T), (B,).
            offset: Standard-normal offset draw, (B, C, 1, 1); required if `noise_offset`,
                ignored otherwise.
            perturbation: Standard-normal draw, (B, C, H, W); required if `input_perturbation`,
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
        noisy = self.add_noise(clean, model_noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.velocity(clean, noise, timesteps)
        else:
            target = clean
        return Noised(clean=clean, noise=noise, timesteps=timesteps, noisy=noisy, target=target)

    def dream(
        self,
        noised: Noised,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        detail_preservation: float,
    ) -> Noised:
        """DREAM (arXiv 2312.00210): moves input and target towards what the model predicts.

        As `diffusers.training_utils.compute_dream_and_update_latents`: with s = sqrt(1 - ab_t) and
        pred = predict(noisy, timesteps) (no gradient), delta = (noise - pred) * s**p,
        noisy += s * delta and target += delta. Coefficients are computed in the sample dtype
        (diffusers uses the scheduler's float32; identical for float32 samples).

        Args:
            noised: A batch from `sample`.
            predict: (noisy, timesteps) -> model output; conditioning is bound by the caller.
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
        with torch.no_grad():
            pred = predict(noised.noisy, noised.timesteps)
        delta = (noised.noise - pred).detach() * sqrt_one_minus_alpha_prod**detail_preservation
        return dataclasses.replace(
            noised,
            noisy=noised.noisy + sqrt_one_minus_alpha_prod * delta,
            target=noised.target + delta,
        )

    def loss(
        self, model_pred: torch.Tensor, noised: Noised
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss, in float32 whatever the model's dtype (as the reference scripts).

        Without prior preservation it is the (weighted) MSE of the whole batch and the metrics are
        `{}` (the trainer logs the loss itself). With `prior_loss_weight`, the batch is
        [instance; class] halves (diffusers' `torch.chunk(..., 2)`): the loss is the weighted
        instance MSE plus `prior_loss_weight` times the plain MSE of the class half, and the
        metrics are the detached `loss/instance` and `loss/prior`. Min-SNR weights of the instance
        half use its own timesteps (diffusers' script would broadcast all 2B against B and fail).

        Args:
            model_pred: The model output, (B, C, H, W).
            noised: The batch the prediction was made from.

        Returns:
            (scalar float32 loss, metrics).

        Raises:
            ValueError: An odd batch with prior preservation.
        """
        pred, target = model_pred.to(LOSS_DTYPE), noised.target.to(LOSS_DTYPE)
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
        prior_loss = F.mse_loss(pred[half:], target[half:], reduction="mean")
        loss = instance_loss + self.prior_loss_weight * prior_loss
        return loss, {"loss/instance": instance_loss.detach(), "loss/prior": prior_loss.detach()}

    def _weighted_mse(
        self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Mean over the batch of per-sample MSE times the per-timestep weight (if any)."""
        weights = self._loss_weights()
        if weights is None:
            return F.mse_loss(pred, target, reduction="mean")
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        # The (T,) table is built in float64 on the CPU and indexed on the device: no host sync,
        # and no float64 on devices that lack it.
        weights = weights.to(LOSS_DTYPE).to(pred.device)[timesteps.to(pred.device)]
        return (per_sample * weights).mean()

    def _loss_weights(self) -> torch.Tensor | None:
        """float64 (T,) loss weight of each timestep; None for the unweighted mean."""
        if self.snr_gamma is None and self.prediction_type != "sample":
            return None
        # Without gamma, train_unconditional.py weights the x0 ("sample") loss by snr itself.
        weights = self._snr_table()
        if self.snr_gamma is not None:
            weights = schedules.min_snr_loss_weights(weights, self.snr_gamma, self.prediction_type)
        return torch.from_numpy(weights)

    def _snr_table(self) -> np.ndarray:
        """float64 SNR of every timestep, (T,), by the reference's own formula."""
        return schedules.compute_snr(
            self.alphas_cumprod.numpy(), np.arange(self.alphas_cumprod.shape[0])
        )
