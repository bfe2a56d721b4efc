"""Per-scheduler math of flaxdiff's samplers: diffusers' schedulers as host tables plus a JAX step.

Each class reads the keys of one diffusers scheduler from a `scheduler_config.json` dict, with that
class's defaults, and splits its work in two: `plan` computes, in float64 numpy on the host, the
timesteps exactly as diffusers' `set_timesteps` does and every per-step coefficient as a (S,) table;
`step` is the JAX update of one step, reading row i of those tables, so a sampling loop is a single
`lax.scan` (see `flaxdiff.sampling`). Options that change the algorithm beyond what is implemented
here (dynamic thresholding, Karras sigmas, SDE solvers, ...) are refused by name in `__post_init__`.
Arrays are NHWC: x, model_output and noise are (B, H, W, C); S is the number of sampling steps.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from jax import Array

from shared.schedules import PREDICTION_TYPES, NoiseSchedule

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
State = dict[str, Array]  # the scan carry; "x" is the current sample, (B, H, W, C)
Rows = Mapping[str, Array]  # row i of every (S,) table of a `SamplingPlan`: scalars
SCHEDULERS: dict[str, type[SamplerConfig]] = {}  # diffusers `_class_name` -> config class


def register_scheduler(cls: type[SamplerConfig]) -> type[SamplerConfig]:
    """Class decorator: makes `cls` findable by its diffusers class name."""
    SCHEDULERS[cls.class_name] = cls
    return cls


def _refuse(condition: bool, scheduler: str, what: str) -> None:
    if condition:
        raise ValueError(f"{scheduler}: {what} is not supported by flaxdiff's samplers")


def x0_and_eps(
    prediction_type: str, model_output: Array, x: Array, alpha: Array, sigma: Array
) -> tuple[Array, Array]:
    """(predicted x0, predicted noise) from a model output, with x = alpha·x0 + sigma·noise.

    Written in diffusers' operation order; the unused one of the pair costs nothing under jit.
    """
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * model_output, alpha * model_output + sigma * x
    x0 = model_output  # "sample"
    return x0, (x - alpha * x0) / sigma


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: __eq__ over arrays is ambiguous
class SamplingPlan:
    """What `SamplerConfig.plan` precomputes for one `num_inference_steps`.

    Attributes:
        timesteps: (S,) the model's timestep per step: int32, float32 for Euler (as diffusers).
        coefficients: name -> (S,) float64 table that `step` reads row by row.
        init_noise_sigma: The standard deviation the initial N(0, 1) noise is scaled to.
        input_scale: (S,) factor applied to x before the model (Euler's `scale_model_input`), or
            None where the model sees x itself.
    """

    timesteps: np.ndarray
    coefficients: Mapping[str, np.ndarray]
    init_noise_sigma: float = 1.0
    input_scale: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


@dataclasses.dataclass(frozen=True)
class SamplerConfig(abc.ABC):
    """The keys a diffusers DDPM-family scheduler shares; defaults are diffusers' own.

    Frozen and hashable, so a config can be a static argument of `jax.jit`.
    """

    class_name: ClassVar[str]
    stochastic: ClassVar[bool] = False  # whether `step` consumes noise

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.trained_betas is not None:  # a JSON list: tuple keeps the config hashable
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"{self.class_name}: prediction_type {self.prediction_type!r} is not supported; "
                f"valid: {', '.join(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"{self.class_name}: timestep_spacing {self.timestep_spacing!r} is not supported; "
                f"valid: {', '.join(TIMESTEP_SPACINGS)}"
            )
        _ = self.alphas_cumprod  # fail now on a bad beta schedule, not inside a jit

    @classmethod
    def from_scheduler_config(cls, scheduler_config: Mapping[str, Any]) -> SamplerConfig:
        """Reads this class's keys as diffusers' `from_config` does; other keys are ignored.

        Null values and the keys that diffusers recorded as defaulted (`_use_default_values`)
        take this class's defaults: a config saved by a DDPMScheduler built without
        `timestep_spacing` reads as DPM-Solver with DPM-Solver's "linspace", as in diffusers.
        """
        defaulted = set(scheduler_config.get("_use_default_values", ()))
        kwargs = {
            f.name: scheduler_config[f.name]
            for f in dataclasses.fields(cls)
            if scheduler_config.get(f.name) is not None and f.name not in defaulted
        }
        return cls(**kwargs)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """(T,) float64, as the diffusers class builds it in `__init__`."""
        return NoiseSchedule.create(
            beta_schedule=self.beta_schedule,
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            trained_betas=self.trained_betas,
            rescale_betas_zero_snr=self.rescale_betas_zero_snr,
            prediction_type=self.prediction_type,
        ).alphas_cumprod

    @property
    def learned_variance(self) -> bool:
        """Whether a (B, H, W, 2C) model output carries a variance half to drop."""
        return getattr(self, "variance_type", None) in ("learned", "learned_range")

    def init_noise_sigma(self, num_inference_steps: int) -> float:
        """The standard deviation of the initial noise (diffusers' `init_noise_sigma`)."""
        return self.plan(num_inference_steps).init_noise_sigma

    def _check_steps(self, num_inference_steps: int) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"{self.class_name}: num_inference_steps must be in [1, "
                f"{self.num_train_timesteps}], got {num_inference_steps}"
            )

    def _checked(self, timesteps: np.ndarray) -> np.ndarray:
        # "leading" + steps_offset can step past the last training timestep (diffusers then fails
        # with an IndexError inside `step`): say so here, with the cause.
        if timesteps.max() >= self.num_train_timesteps:
            raise ValueError(
                f"{self.class_name}: timestep {timesteps.max()} >= num_train_timesteps "
                f"({self.num_train_timesteps}); lower steps_offset ({self.steps_offset}) or "
                "num_inference_steps"
            )
        return timesteps

    @abc.abstractmethod
    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """(S,) timesteps, equal to diffusers' `scheduler.timesteps` after `set_timesteps`."""

    @abc.abstractmethod
    def plan(self, num_inference_steps: int) -> SamplingPlan:
        """Host-side float64 tables of one sampling run."""

    def init_state(self, x: Array) -> State:
        """The scan carry before the first step, from the scaled initial noise x."""
        return {"x": x}

    @abc.abstractmethod
    def step(self, state: State, c: Rows, model_output: Array, noise: Array | None) -> State:
        """One step: the state at x_t, the tables' row c and the model output -> next state."""


def _ddpm_timesteps(cfg: SamplerConfig, num_inference_steps: int) -> np.ndarray:
    """`DDPMScheduler.set_timesteps` / `DDIMScheduler.set_timesteps` (the same rule): (S,) int."""
    cfg._check_steps(num_inference_steps)
    T, n = cfg.num_train_timesteps, num_inference_steps
    if cfg.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1]
    elif cfg.timestep_spacing == "leading":
        timesteps = (np.arange(n) * (T // n)).round()[::-1] + cfg.steps_offset
    else:  # trailing: start at T - 1 and step back by the real-valued ratio
        timesteps = np.round(np.arange(T, 0, -T / n)) - 1
    return cfg._checked(timesteps.astype(np.int64))


def _ddpm_std(variance: np.ndarray, current_beta: np.ndarray) -> np.ndarray:
    # The posterior variance is clamped away from 0 before use, as diffusers does (it logs it).
    return np.sqrt(np.maximum(variance, 1e-20))


# variance_type -> noise std from (posterior variance, beta of the step). Learned variances sample
# with the fixed posterior variance, as diffusers' training scripts' validation does.
_DDPM_NOISE_STD: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "fixed_small": _ddpm_std,
    "fixed_small_log": lambda var, beta: np.exp(0.5 * np.log(np.maximum(var, 1e-20))),
    "fixed_large": lambda var, beta: np.sqrt(beta),
    "learned": _ddpm_std,
    "learned_range": _ddpm_std,
}


@register_scheduler
@dataclasses.dataclass(frozen=True)
class DDPMConfig(SamplerConfig):
    """diffusers' `DDPMScheduler`: ancestral sampling, x_{t-1} ~ q(x_{t-1} | x_t, x0_pred).

    The only stochastic sampler here: step i adds noise_std[i] times its own N(0, 1) draw.
    """

    class_name: ClassVar[str] = "DDPMScheduler"
    stochastic: ClassVar[bool] = True

    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse(self.thresholding, self.class_name, "thresholding (dynamic thresholding)")
        if self.variance_type not in _DDPM_NOISE_STD:
            raise ValueError(
                f"{self.class_name}: variance_type {self.variance_type!r} is not supported; "
                f"valid: {', '.join(_DDPM_NOISE_STD)}"
            )

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        return _ddpm_timesteps(self, num_inference_steps)

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        timesteps = self.timesteps(num_inference_steps)
        ab = self.alphas_cumprod
        alpha_prod = ab[timesteps]  # (S,)
        # Each step goes to the next table entry; the last one to "before 0", where ab = 1.
        alpha_prod_prev = np.append(ab[timesteps[1:]], 1.0)
        beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
        current_alpha = alpha_prod / alpha_prod_prev
        current_beta = 1 - current_alpha
        posterior_variance = beta_prod_prev / beta_prod * current_beta  # DDPM eq. (7)
        noise_std = _DDPM_NOISE_STD[self.variance_type](posterior_variance, current_beta)
        # diffusers adds noise whenever t > 0, even on a last step that ends at t = 1.
        noise_std = np.where(timesteps > 0, noise_std, 0.0)
        return SamplingPlan(
            timesteps=timesteps.astype(np.int32),
            coefficients={
                "sqrt_alpha_prod": np.sqrt(alpha_prod),
                "sqrt_beta_prod": np.sqrt(beta_prod),
                "x0_coeff": np.sqrt(alpha_prod_prev) * current_beta / beta_prod,
                "x_coeff": np.sqrt(current_alpha) * beta_prod_prev / beta_prod,
                "noise_std": noise_std,
            },
        )

    def step(self, state: State, c: Rows, model_output: Array, noise: Array | None) -> State:
        x = state["x"]
        x0, _ = x0_and_eps(
            self.prediction_type, model_output, x, c["sqrt_alpha_prod"], c["sqrt_beta_prod"]
        )
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return {"x": c["x0_coeff"] * x0 + c["x_coeff"] * x + c["noise_std"] * noise}


@register_scheduler
@dataclasses.dataclass(frozen=True)
class DDIMConfig(SamplerConfig):
    """diffusers' `DDIMScheduler` with eta = 0: the deterministic DDIM update (DDIM eq. 12)."""

    class_name: ClassVar[str] = "DDIMScheduler"

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse(self.thresholding, self.class_name, "thresholding (dynamic thresholding)")

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        return _ddpm_timesteps(self, num_inference_steps)

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        timesteps = self.timesteps(num_inference_steps)
        ab = self.alphas_cumprod
        # diffusers steps back by T // n whatever the spacing, not to the next table entry.
        prev = timesteps - self.num_train_timesteps // num_inference_steps
        final_alpha_prod = 1.0 if self.set_alpha_to_one else ab[0]
        alpha_prod = ab[timesteps]
        alpha_prod_prev = np.where(prev >= 0, ab[np.maximum(prev, 0)], final_alpha_prod)
        return SamplingPlan(
            timesteps=timesteps.astype(np.int32),
            coefficients={
                "sqrt_alpha_prod": np.sqrt(alpha_prod),
                "sqrt_beta_prod": np.sqrt(1 - alpha_prod),
                "sqrt_alpha_prod_prev": np.sqrt(alpha_prod_prev),
                "direction_coeff": np.sqrt(1 - alpha_prod_prev),  # eta = 0: no std term
            },
        )

    def step(self, state: State, c: Rows, model_output: Array, noise: Array | None) -> State:
        x = state["x"]
        x0, eps = x0_and_eps(
            self.prediction_type, model_output, x, c["sqrt_alpha_prod"], c["sqrt_beta_prod"]
        )
        if self.clip_sample:  # the noise estimate keeps the unclipped x0 (diffusers' default)
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return {"x": c["sqrt_alpha_prod_prev"] * x0 + c["direction_coeff"] * eps}


def _sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """(T,) noise-to-signal ratios sqrt((1 - ab) / ab), the sigmas of DPM-Solver and Euler."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _terminal_snr_floor(alphas_cumprod: np.ndarray) -> np.ndarray:
    # DPM-Solver and Euler lift a zero terminal ab to 2**-24 (fp16's smallest subnormal) so the
    # first sigma is finite; DDPM and DDIM keep the 0.
    floored = alphas_cumprod.copy()
    floored[-1] = 2.0**-24
    return floored


@register_scheduler
@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepConfig(SamplerConfig):
    """diffusers' `DPMSolverMultistepScheduler`, DPM-Solver++ (data prediction), order 1 or 2.

    The second-order step reuses the previous step's x0 prediction, which the scan carries.
    """

    class_name: ClassVar[str] = "DPMSolverMultistepScheduler"

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    thresholding: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.class_name
        _refuse(
            self.algorithm_type != "dpmsolver++", name, f"algorithm_type {self.algorithm_type!r}"
        )
        _refuse(self.solver_order not in (1, 2), name, f"solver_order {self.solver_order}")
        _refuse(
            self.solver_type not in ("midpoint", "heun"), name, f"solver_type {self.solver_type!r}"
        )
        _refuse(
            self.final_sigmas_type not in ("zero", "sigma_min"),
            name,
            f"final_sigmas_type {self.final_sigmas_type!r}",
        )
        _refuse(self.thresholding, name, "thresholding (dynamic thresholding)")
        for option in ("karras", "exponential", "beta", "flow"):
            _refuse(getattr(self, f"use_{option}_sigmas"), name, f"use_{option}_sigmas")
        _refuse(self.use_lu_lambdas, name, "use_lu_lambdas")

    @functools.cached_property
    def _alphas_cumprod(self) -> np.ndarray:
        ab = self.alphas_cumprod
        return _terminal_snr_floor(ab) if self.rescale_betas_zero_snr else ab

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        self._check_steps(num_inference_steps)
        ab, T, n = self._alphas_cumprod, self.num_train_timesteps, num_inference_steps
        # lambda_min_clipped drops the tail of timesteps whose log-SNR lies below it.
        log_snr = 0.5 * np.log(ab) - 0.5 * np.log(1 - ab)  # lambda_t, (T,) decreasing
        last = T - int(np.searchsorted(log_snr[::-1], self.lambda_min_clipped))
        # DPM-Solver places n + 1 points and drops the final one (t = 0) for linspace / leading.
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            timesteps = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1]
            timesteps = timesteps + self.steps_offset
        else:
            timesteps = np.arange(last, 0, -T / n).round() - 1
        return self._checked(timesteps.astype(np.int64))

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        timesteps = self.timesteps(num_inference_steps)
        sigmas_train = _sigmas(self._alphas_cumprod)
        last = sigmas_train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.append(sigmas_train[timesteps], last)  # (S + 1,)
        alpha = 1 / (sigmas**2 + 1) ** 0.5  # VP: alpha² + sigma_t² = 1
        sigma_t = sigmas * alpha
        with np.errstate(divide="ignore"):  # a zero final sigma: lambda = inf, exp(-h) = 0
            lam = np.log(alpha) - np.log(sigma_t)
        S = len(timesteps)
        h = lam[1:] - lam[:-1]  # (S,)
        # exp(-h) - 1 is finite even where h = inf; the rest is only read on second-order steps.
        expm = np.exp(-h) - 1.0
        first_order = np.zeros(S, bool)
        first_order[0] = True  # no previous x0 yet
        first_order[-1] |= (
            self.euler_at_final
            or (self.lower_order_final and S < 15)
            or self.final_sigmas_type == "zero"
        )
        if self.solver_order == 1:
            first_order[:] = True
        second = ~first_order
        inv_r0 = np.zeros(S)
        d1_coeff = np.zeros(S)
        # r0 = h_{i-1} / h_i: the previous step length relative to this one.
        inv_r0[1:][second[1:]] = (h[1:] / h[:-1])[second[1:]]
        if self.solver_type == "midpoint":
            d1_coeff[second] = -0.5 * alpha[1:][second] * expm[second]
        else:
            d1_coeff[second] = alpha[1:][second] * (expm[second] / h[second] + 1.0)
        return SamplingPlan(
            timesteps=timesteps.astype(np.int32),
            coefficients={
                "alpha": alpha[:-1],
                "sigma": sigma_t[:-1],
                "sample_coeff": sigma_t[1:] / sigma_t[:-1],
                "d0_coeff": -(alpha[1:] * expm),
                "d1_coeff": d1_coeff,
                "inv_r0": inv_r0,
            },
        )

    def init_state(self, x: Array) -> State:
        return {"x": x, "prev_x0": jnp.zeros_like(x)}

    def step(self, state: State, c: Rows, model_output: Array, noise: Array | None) -> State:
        x = state["x"]
        x0, _ = x0_and_eps(self.prediction_type, model_output, x, c["alpha"], c["sigma"])
        d1 = c["inv_r0"] * (x0 - state["prev_x0"])  # zero on first-order steps
        x = c["sample_coeff"] * x + c["d0_coeff"] * x0 + c["d1_coeff"] * d1
        return {"x": x, "prev_x0": x0}


@register_scheduler
@dataclasses.dataclass(frozen=True)
class EulerDiscreteConfig(SamplerConfig):
    """diffusers' `EulerDiscreteScheduler` without churn: Euler steps of the probability-flow ODE
    in sigma, on x scaled by sqrt(sigma² + 1) (Karras et al. 2022, Algorithm 1)."""

    class_name: ClassVar[str] = "EulerDiscreteScheduler"

    timestep_spacing: str = "linspace"
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.class_name
        _refuse(
            self.interpolation_type != "linear",
            name,
            f"interpolation_type {self.interpolation_type!r}",
        )
        for option in ("karras", "exponential", "beta"):
            _refuse(getattr(self, f"use_{option}_sigmas"), name, f"use_{option}_sigmas")
        _refuse(
            self.timestep_type == "continuous" and self.prediction_type == "v_prediction",
            name,
            "timestep_type 'continuous' with v_prediction",
        )
        _refuse(
            self.final_sigmas_type not in ("zero", "sigma_min"),
            name,
            f"final_sigmas_type {self.final_sigmas_type!r}",
        )

    @functools.cached_property
    def _alphas_cumprod(self) -> np.ndarray:
        ab = self.alphas_cumprod
        return _terminal_snr_floor(ab) if self.rescale_betas_zero_snr else ab

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """(S,) float32: "linspace" gives fractional timesteps, which the model sees as they are."""
        self._check_steps(num_inference_steps)
        T, n = self.num_train_timesteps, num_inference_steps
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
        elif self.timestep_spacing == "leading":
            timesteps = (np.arange(n) * (T // n)).round()[::-1].astype(np.float32)
            timesteps = timesteps + np.float32(self.steps_offset)
        else:
            timesteps = np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1)
        return self._checked(timesteps.astype(np.float32))

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        timesteps = self.timesteps(num_inference_steps)
        sigmas_train = _sigmas(self._alphas_cumprod)
        # Sigma at a fractional timestep: linear interpolation of the training sigmas.
        sigmas = np.interp(timesteps.astype(np.float64), np.arange(len(sigmas_train)), sigmas_train)
        last = sigmas_train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.append(sigmas, last)  # (S + 1,)
        sigma = sigmas[:-1]
        max_sigma = sigmas.max()
        # diffusers' rule, kept as it is: sqrt(max² + 1) for "leading", the max sigma otherwise.
        init = max_sigma if self.timestep_spacing != "leading" else (max_sigma**2 + 1) ** 0.5
        return SamplingPlan(
            timesteps=timesteps,
            coefficients={
                "sigma": sigma,
                "dt": sigmas[1:] - sigma,
                "v_out": -sigma / (sigma**2 + 1) ** 0.5,  # x0 = v_out·v + v_skip·x
                "v_skip": 1 / (sigma**2 + 1),
            },
            init_noise_sigma=float(init),
            input_scale=1 / (sigma**2 + 1) ** 0.5,
        )

    def step(self, state: State, c: Rows, model_output: Array, noise: Array | None) -> State:
        x = state["x"]
        if self.prediction_type == "epsilon":
            x0 = x - c["sigma"] * model_output
        elif self.prediction_type == "v_prediction":
            x0 = model_output * c["v_out"] + x * c["v_skip"]
        else:
            x0 = model_output
        derivative = (x - x0) / c["sigma"]
        return {"x": x + derivative * c["dt"]}
