"""flaxdiff.sampling against diffusers' schedulers, step by step, same denoiser and same noise.

diffusers runs its own loop (`set_timesteps`, then `scale_model_input`, the model and `step` per
timestep, as its pipelines do) on a toy denoiser that is linear in x and t, written once in torch
and once in JAX. float64 compares x after every step (the two compute the same function), float32
the final sample (what users see). DDPM's step noise is the same array on both sides.

To run diffusers in float64, its scheduler module sees `torch.float32` as float64: it builds its
betas in float32 and DPM-Solver / Euler cast the sample to float32 inside `step`. Their
`set_timesteps` also rounds the sigmas to float32 in numpy; those are recomputed in float64 from the
scheduler's own alphas_cumprod. The float32 tests run diffusers untouched.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import sampling

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers' schedulers call np.array on tensors, which numpy 2 warns about; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

F64_STEP_REL = 1e-10  # per step, relative to max |x| of diffusers' step
F32_FINAL_REL = 1e-5
B, H, W, C = 2, 4, 4, 3
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")

# (diffusers class, scheduler config, num_inference_steps): each prediction type of each scheduler,
# spread over timestep spacings, clipping and the solver options that change the tables.
CASES = {
    "ddpm-eps-sd": ("DDPMScheduler", dict(**SD, clip_sample=False, steps_offset=1), 10),
    "ddpm-v-trailing": (
        "DDPMScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="trailing"),
        7,
    ),
    "ddpm-sample-cosine": (
        "DDPMScheduler",
        dict(
            prediction_type="sample",
            beta_schedule="squaredcos_cap_v2",
            timestep_spacing="linspace",
            variance_type="fixed_large",
            clip_sample_range=0.8,
        ),
        6,
    ),
    "ddim-eps-sd": (
        "DDIMScheduler",
        dict(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        10,
    ),
    "ddim-v-zero-snr": ("DDIMScheduler", dict(prediction_type="v_prediction", **ZERO_SNR), 5),
    "ddim-sample-linspace": (
        "DDIMScheduler",
        dict(prediction_type="sample", timestep_spacing="linspace"),
        7,
    ),
    # DPM-Solver++ (diffusers' default algorithm_type, the only one flaxdiff implements), 2nd order.
    "dpm-eps-sd": ("DPMSolverMultistepScheduler", dict(**SD, algorithm_type="dpmsolver++"), 10),
    "dpm-eps-first-order": ("DPMSolverMultistepScheduler", dict(**SD, solver_order=1), 6),
    "dpm-v-zero-snr": (
        "DPMSolverMultistepScheduler",
        dict(prediction_type="v_prediction", **ZERO_SNR),
        7,
    ),
    "dpm-sample-leading": (
        "DPMSolverMultistepScheduler",
        dict(
            prediction_type="sample",
            timestep_spacing="leading",
            steps_offset=1,
            final_sigmas_type="sigma_min",
        ),
        8,
    ),
    # Second order up to the last step, which ends at sigma_min, not 0.
    "dpm-eps-heun-final": (
        "DPMSolverMultistepScheduler",
        dict(
            timestep_spacing="trailing",
            solver_type="heun",
            final_sigmas_type="sigma_min",
            lower_order_final=False,
        ),
        6,
    ),
    "euler-eps-sd": ("EulerDiscreteScheduler", dict(**SD), 7),  # fractional timesteps
    "euler-v-leading": (
        "EulerDiscreteScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
        6,
    ),
    "euler-sample-zero-snr": (
        "EulerDiscreteScheduler",
        dict(prediction_type="sample", final_sigmas_type="sigma_min", **ZERO_SNR),
        5,
    ),
}


def test_cases_cover_every_sampler_and_dpm_solver_plus_plus():
    """DDPM, DDIM, DPM-Solver++ and Euler each have cases; every DPM-Solver case runs dpmsolver++
    in diffusers (its default), the algorithm flaxdiff implements."""
    assert {name for name, _, _ in CASES.values()} == set(sampling.SCHEDULERS)
    dpm = [config for name, config, _ in CASES.values() if name == "DPMSolverMultistepScheduler"]
    assert {diffusers.DPMSolverMultistepScheduler(**c).config.algorithm_type for c in dpm} == {
        "dpmsolver++"
    }
    assert {diffusers.DPMSolverMultistepScheduler(**c).config.solver_order for c in dpm} == {1, 2}


_RNG = np.random.default_rng(0)
PATTERN = _RNG.standard_normal((1, H, W, C))  # the toy denoiser's t-dependent term
NOISE = _RNG.standard_normal((B, H, W, C))
STEP_NOISE = _RNG.standard_normal((16, B, H, W, C))  # DDPM's per-step draws (first S used)


def toy_denoise_jax(x, t):
    """0.7·x + (t / 1000)·PATTERN: (B, H, W, C), t (B,)."""
    scale = (t.astype(x.dtype) / 1000)[:, None, None, None]
    return 0.7 * x + scale * jnp.asarray(PATTERN, x.dtype)


def toy_denoise_torch(x, t):
    """The same function on NCHW torch tensors, t a scalar tensor."""
    pattern = torch.from_numpy(PATTERN.transpose(0, 3, 1, 2)).to(x.dtype)
    return 0.7 * x + (t.to(x.dtype) / 1000) * pattern


class _Float32IsFloat64:
    """Stands in for `torch` inside one diffusers scheduler module: `torch.float32` is float64."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _float64_sigmas(scheduler) -> None:
    """Undoes `set_timesteps`' float32 rounding of the sigmas (DPM-Solver, Euler)."""
    ab = scheduler.alphas_cumprod.numpy()
    train = ((1 - ab) / ab) ** 0.5
    times = scheduler.timesteps.numpy().astype(np.float64)
    last = train[0] if scheduler.config.final_sigmas_type == "sigma_min" else 0.0
    scheduler.sigmas = torch.from_numpy(
        np.append(np.interp(times, np.arange(len(train)), train), last)
    )


def diffusers_trajectory(monkeypatch, name, config, steps, dtype):
    """x after each of diffusers' steps, NHWC numpy, (S, B, H, W, C)."""
    cls = getattr(diffusers, name)
    module = inspect.getmodule(cls)
    if dtype == torch.float64:
        monkeypatch.setattr(module, "torch", _Float32IsFloat64())
    step_index = [0]

    def replayed_noise(shape, generator=None, device=None, dtype=None):
        draw = STEP_NOISE[step_index[0]].transpose(0, 3, 1, 2)  # (B, C, H, W)
        assert tuple(shape) == draw.shape
        return torch.from_numpy(np.ascontiguousarray(draw)).to(dtype)

    monkeypatch.setattr(module, "randn_tensor", replayed_noise)
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64 and hasattr(scheduler, "sigmas"):
        _float64_sigmas(scheduler)
    x = torch.from_numpy(NOISE.transpose(0, 3, 1, 2)).to(dtype) * scheduler.init_noise_sigma
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        step_index[0] = i
        model_output = toy_denoise_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x).prev_sample
        assert x.dtype == dtype
        trajectory.append(x.numpy().transpose(0, 2, 3, 1))
    return np.stack(trajectory), scheduler.timesteps.numpy()


def flax_trajectory(name, config, steps, dtype):
    scheduler = sampling.sampler_from_config({"_class_name": name, **config})
    plan = scheduler.plan(steps)
    step_noise = STEP_NOISE[: plan.num_steps] if scheduler.stochastic else None
    trajectory = sampling.sample_trajectory(
        toy_denoise_jax,
        jnp.asarray(NOISE, dtype),
        scheduler=scheduler,
        num_inference_steps=steps,
        step_noise=step_noise,
    )
    assert trajectory.dtype == dtype
    return np.asarray(trajectory), plan.timesteps


def _relative_error(actual, reference) -> float:
    return float(np.abs(actual - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("case", list(CASES))
def test_every_step_matches_in_float64(x64, monkeypatch, case):
    name, config, steps = CASES[case]
    reference, ref_timesteps = diffusers_trajectory(monkeypatch, name, config, steps, torch.float64)
    actual, timesteps = flax_trajectory(name, config, steps, jnp.float64)
    np.testing.assert_array_equal(timesteps, ref_timesteps)
    errors = [_relative_error(a, r) for a, r in zip(actual, reference, strict=True)]
    print(f"parity {case} float64: worst step relative error {max(errors):.2e}")
    assert max(errors) <= F64_STEP_REL, f"{case}: per-step relative errors {errors}"


# diffusers computes sigma_min = sqrt((1 - ab[0]) / ab[0]) in float32, where 1 - ab[0] = 1e-4
# keeps only ~4 digits: its float32 sample of this case lies 6e-5 from the float64 one. flaxdiff
# builds its tables in float64, so here float32 is checked against diffusers' float64 instead.
FLOAT32_REFERENCE_IN_FLOAT64 = {"dpm-eps-heun-final"}


@pytest.mark.parametrize("case", sorted(set(CASES) - FLOAT32_REFERENCE_IN_FLOAT64))
def test_final_sample_matches_in_float32(monkeypatch, case):
    name, config, steps = CASES[case]
    reference, _ = diffusers_trajectory(monkeypatch, name, config, steps, torch.float32)
    actual, _ = flax_trajectory(name, config, steps, jnp.float32)
    error = _relative_error(actual[-1], reference[-1])
    print(f"parity {case} float32: final relative error {error:.2e}")
    assert error <= F32_FINAL_REL


@pytest.mark.parametrize("case", sorted(FLOAT32_REFERENCE_IN_FLOAT64))
def test_final_float32_sample_matches_float64_reference(x64, monkeypatch, case):
    name, config, steps = CASES[case]
    reference, _ = diffusers_trajectory(monkeypatch, name, config, steps, torch.float64)
    actual, _ = flax_trajectory(name, config, steps, jnp.float32)
    error = _relative_error(actual[-1], reference[-1])
    print(f"parity {case} float32 vs diffusers float64: final relative error {error:.2e}")
    assert error <= F32_FINAL_REL


# SD 1.5's scheduler config: a PNDM config that pipelines read with another scheduler class.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    **SD,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "_use_default_values": ["timestep_spacing"],
}


@pytest.mark.parametrize("name", sorted(sampling.SCHEDULERS))
def test_reading_another_class_config_matches_from_config(name):
    ours = sampling.sampler_from_config(SD15_SCHEDULER, name)
    theirs = getattr(diffusers, name).from_config(SD15_SCHEDULER)
    theirs.set_timesteps(20)
    np.testing.assert_array_equal(ours.timesteps(20), theirs.timesteps.numpy())
    for field in ("timestep_spacing", "steps_offset", "beta_schedule", "prediction_type"):
        assert getattr(ours, field) == theirs.config[field], field
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "config", "steps"),
    [
        ("DDPMScheduler", {}, 1000),
        ("DDPMScheduler", dict(timestep_spacing="trailing"), 3),  # T / n not an integer
        ("DDIMScheduler", dict(timestep_spacing="linspace"), 7),
        ("DPMSolverMultistepScheduler", dict(SD, timestep_spacing="trailing"), 25),
        # lambda_min_clipped, as recommended for the cosine schedule, drops the last timesteps.
        (
            "DPMSolverMultistepScheduler",
            dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
            20,
        ),
        ("EulerDiscreteScheduler", dict(SD), 25),
        ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1), 50),
    ],
)
def test_timesteps_and_init_noise_sigma_match_set_timesteps(name, config, steps):
    ours = sampling.sampler_from_config({"_class_name": name, **config})
    theirs = getattr(diffusers, name)(**config)
    theirs.set_timesteps(steps)
    plan = ours.plan(steps)
    np.testing.assert_array_equal(plan.timesteps, theirs.timesteps.numpy())
    assert plan.timesteps.dtype == (np.float32 if name.startswith("Euler") else np.int32)
    # diffusers' sigmas are float32 from a float32 alphas_cumprod: agreement to its rounding.
    assert plan.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)
