"""flaxdiff.sampling: timestep tables, closed-form coefficients, exact recovery with an oracle
denoiser, jit against eager, DDPM's documented noise order, guidance and refusals.

Parity with diffusers' schedulers step by step is in tests/parity/test_parity_samplers.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import sampling
from shared.schedules import NoiseSchedule

SHAPE = (2, 4, 4, 3)  # (B, H, W, C)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def config(name, **keys):
    return sampling.sampler_from_config({"_class_name": name, **keys})


def normal(seed, shape):
    """N(0, 1) draws from numpy: jax.random's threefry compiles slowly on a CPU, so only the test
    of the key path uses it."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def toy_denoise(x, t):
    """Linear in x and t: 0.7·x + (t / 1000)·pattern, (B, H, W, C)."""
    pattern = jnp.linspace(-1.0, 1.0, np.prod(SHAPE[1:])).reshape(SHAPE[1:])
    return 0.7 * x + (t.astype(x.dtype) / 1000)[:, None, None, None] * pattern


@pytest.mark.parametrize(
    ("name", "keys", "steps", "expected"),
    [
        (
            "DDPMScheduler",
            {"steps_offset": 1},
            10,
            [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
        ),
        ("DDPMScheduler", {"timestep_spacing": "linspace"}, 4, [999, 666, 333, 0]),
        ("DDIMScheduler", {"timestep_spacing": "trailing"}, 3, [999, 666, 332]),
        # DPM-Solver places n + 1 points over [0, 999] and drops t = 0: 999·k/5 rounded.
        ("DPMSolverMultistepScheduler", {}, 5, [999, 799, 599, 400, 200]),
        ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}, 3, [750, 500, 250]),
        ("EulerDiscreteScheduler", {}, 3, [999.0, 499.5, 0.0]),
        (
            "EulerDiscreteScheduler",
            {"timestep_spacing": "leading", "steps_offset": 1},
            4,
            [751, 501, 251, 1],
        ),
    ],
)
def test_timestep_tables(name, keys, steps, expected):
    timesteps = config(name, **keys).timesteps(steps)
    np.testing.assert_array_equal(timesteps, expected)


def test_full_ddpm_chain_has_the_posterior_coefficients():
    """With every timestep, DDPM's step is q(x_{t-1} | x_t, x0) of Ho et al. (2020), eq. (7)."""
    cfg = config("DDPMScheduler", num_train_timesteps=50)
    betas = NoiseSchedule.create(num_train_timesteps=50).betas
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    plan = cfg.plan(50)
    c = {k: v[::-1] for k, v in plan.coefficients.items()}  # index by t again
    np.testing.assert_array_equal(plan.timesteps, np.arange(50)[::-1])
    np.testing.assert_allclose(c["x0_coeff"], np.sqrt(ab_prev) * betas / (1 - ab), rtol=1e-12)
    np.testing.assert_allclose(
        c["x_coeff"], np.sqrt(1 - betas) * (1 - ab_prev) / (1 - ab), rtol=1e-12
    )
    posterior_std = np.sqrt((1 - ab_prev) / (1 - ab) * betas)
    np.testing.assert_allclose(c["noise_std"][1:], posterior_std[1:], rtol=1e-12)
    assert c["noise_std"][0] == 0.0  # no noise on the step that reaches x0


def test_init_noise_sigma():
    ab = NoiseSchedule.create(**SD).alphas_cumprod
    sigma = np.sqrt((1 - ab) / ab)
    assert config("DPMSolverMultistepScheduler", **SD).init_noise_sigma(20) == 1.0
    assert config("DDPMScheduler", **SD).init_noise_sigma(20) == 1.0
    euler = config("EulerDiscreteScheduler", **SD)
    assert euler.init_noise_sigma(20) == pytest.approx(sigma[999], rel=1e-12)  # 14.6146...
    leading = config("EulerDiscreteScheduler", **SD, timestep_spacing="leading")
    assert leading.init_noise_sigma(20) == pytest.approx(np.hypot(sigma[950], 1), rel=1e-12)


def _oracle(cfg, x0):
    """The exact model output for data that is the single point x0, at integer timesteps."""
    ab = jnp.asarray(cfg.alphas_cumprod, jnp.float32)

    def denoise(x, t):
        t = t.astype(jnp.int32)  # Euler's float32 timesteps, integer-valued here
        a = jnp.sqrt(ab[t])[:, None, None, None]
        s = jnp.sqrt(1 - ab[t])[:, None, None, None]
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0 + 0 * x}[
            cfg.prediction_type
        ]

    return denoise


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("DDIMScheduler", {"clip_sample": False}),
        ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}),
        ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),  # integer timesteps
    ],
)
def test_deterministic_samplers_recover_x0_from_an_exact_denoiser(name, keys):
    cfg = config(name, **SD, **keys)
    x0 = jnp.linspace(-0.9, 0.9, np.prod(SHAPE)).reshape(SHAPE)
    noise = normal(0, SHAPE)
    out = sampling.sample(_oracle(cfg, x0), noise, scheduler=cfg, num_inference_steps=8)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=2e-5)


@pytest.mark.parametrize(
    ("name", "keys", "dtype"),
    [
        ("DDPMScheduler", {}, jnp.float32),
        ("DDIMScheduler", {"prediction_type": "v_prediction"}, jnp.bfloat16),  # runs in float32
        ("DPMSolverMultistepScheduler", SD, jnp.float32),
        ("EulerDiscreteScheduler", {"prediction_type": "sample"}, jnp.float32),
    ],
)
def test_jit_equals_eager_and_is_finite(name, keys, dtype):
    cfg = config(name, **keys)
    noise = normal(1, SHAPE).astype(dtype)
    draws = normal(2, (5, *SHAPE)) if cfg.stochastic else None
    run = functools.partial(
        sampling.sample, toy_denoise, scheduler=cfg, num_inference_steps=5, step_noise=draws
    )
    jitted = jax.jit(run)(noise)
    with jax.disable_jit():  # scan becomes a Python loop of op-by-op steps
        eager = run(noise)
    assert jitted.dtype == jnp.float32 and jitted.shape == SHAPE
    assert np.isfinite(np.asarray(jitted)).all()
    assert np.abs(np.asarray(jitted) - np.asarray(noise, np.float32)).max() > 0.1  # it moved
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


def test_ddpm_noise_follows_the_documented_key_split():
    cfg = config("DDPMScheduler")
    noise = normal(3, SHAPE)
    run = jax.jit(
        functools.partial(sampling.sample, toy_denoise, scheduler=cfg, num_inference_steps=4)
    )
    key = jax.random.key(4)
    from_key = run(noise, key=key)
    keys = jax.random.split(key, 4)
    draws = jax.vmap(lambda k: jax.random.normal(k, SHAPE))(
        keys
    )  # (S, B, H, W, C), step i: keys[i]
    np.testing.assert_allclose(
        np.asarray(run(noise, step_noise=draws)), np.asarray(from_key), atol=1e-6
    )
    other = run(noise, key=jax.random.key(5))
    assert np.abs(np.asarray(other - from_key)).max() > 1e-3


def test_learned_variance_samples_with_the_fixed_small_variance():
    noise = normal(6, SHAPE)
    draws = normal(7, (3, *SHAPE))

    def two_halves(x, t):  # (B, H, W, 2C): mean half, then a variance half that must be ignored
        return jnp.concatenate([toy_denoise(x, t), 5 + x], axis=-1)

    learned = config("DDPMScheduler", variance_type="learned_range")
    fixed = config("DDPMScheduler")
    run = functools.partial(sampling.sample, noise=noise, num_inference_steps=3, step_noise=draws)
    with jax.disable_jit():  # two tiny eager loops cost less than two compiles
        np.testing.assert_array_equal(
            np.asarray(run(two_halves, scheduler=learned)),
            np.asarray(run(toy_denoise, scheduler=fixed)),
        )


def test_guided_runs_one_batch_uncond_first():
    cond = jnp.full((2, 5, 8), 2.0)
    uncond = jnp.zeros((2, 5, 8))
    batches = []

    def unet(x, t, context):
        batches.append((x.shape[0], t.shape[0]))
        return x + context.mean(axis=(1, 2))[:, None, None, None]  # uncond: x, cond: x + 2

    x = jnp.ones(SHAPE)
    out = sampling.guided(unet, cond, uncond, 7.5)(x, jnp.full((2,), 10))
    assert batches == [(4, 4)]
    np.testing.assert_allclose(np.asarray(out), 1 + 7.5 * 2)  # uncond + 7.5 (cond - uncond)
    out = sampling.guided(unet, cond, uncond, 1.0)(x, jnp.full((2,), 10))
    assert batches[-1] == (2, 2)  # scale <= 1: the conditional batch alone, as the pipeline
    np.testing.assert_allclose(np.asarray(out), 3.0)


def test_config_reading():
    cfg = config(
        "DDPMScheduler",
        trained_betas=[0.1, 0.2],
        num_train_timesteps=2,
        timestep_spacing="trailing",
        _use_default_values=["timestep_spacing"],
        skip_prk_steps=True,  # another class's key: ignored, as diffusers does
    )
    assert cfg.timestep_spacing == "leading"  # the class default, not the recorded one
    assert cfg.trained_betas == (0.1, 0.2)
    assert hash(cfg) == hash(
        config("DDPMScheduler", trained_betas=(0.1, 0.2), num_train_timesteps=2)
    )
    np.testing.assert_allclose(cfg.alphas_cumprod, [0.9, 0.72])
    read_as = sampling.sampler_from_config({"_class_name": "PNDMScheduler"}, "DDIMScheduler")
    assert isinstance(read_as, sampling.DDIMConfig)


@pytest.mark.parametrize(
    ("name", "keys", "match"),
    [
        ("PNDMScheduler", {}, "No flaxdiff sampler for scheduler 'PNDMScheduler'"),
        ("DDPMScheduler", {"thresholding": True}, "thresholding"),
        ("DDIMScheduler", {"thresholding": True}, "thresholding"),
        ("DDPMScheduler", {"variance_type": "fixed_large_log"}, "fixed_large_log"),
        ("DDPMScheduler", {"prediction_type": "flow_prediction"}, "flow_prediction"),
        ("DDIMScheduler", {"timestep_spacing": "karras"}, "timestep_spacing 'karras'"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "sde-dpmsolver"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "'dpmsolver'"),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order 3"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "log_linear"),
        ("DDPMScheduler", {"beta_schedule": "sigmoid"}, "sigmoid"),
    ],
)
def test_refusals_name_the_option(name, keys, match):
    with pytest.raises(ValueError, match=match):
        config(name, **keys)


def test_bad_calls_are_refused():
    noise = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="steps_offset"):
        config("DDPMScheduler", steps_offset=1).timesteps(1000)  # would reach t = 1000
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        config("DDIMScheduler").plan(0)
    ddpm = functools.partial(
        sampling.sample,
        toy_denoise,
        noise,
        scheduler=config("DDPMScheduler"),
        num_inference_steps=2,
    )
    with pytest.raises(ValueError, match="exactly one of key and step_noise"):
        ddpm()
    with pytest.raises(ValueError, match=r"expected \(2, 2, 4, 4, 3\)"):
        ddpm(step_noise=jnp.zeros((3, *SHAPE)))
    with pytest.raises(ValueError, match="deterministic"):
        sampling.sample(
            toy_denoise,
            noise,
            scheduler=config("DDIMScheduler"),
            num_inference_steps=2,
            step_noise=jnp.zeros((2, *SHAPE)),
        )
