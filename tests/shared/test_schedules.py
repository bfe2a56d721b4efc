"""shared.schedules: closed-form values in float64, and agreement with diffusers' DDPMScheduler."""

import ast
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from shared import schedules
from shared.schedules import NoiseSchedule

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# (beta_start, beta_end, num_train_timesteps): DDPM defaults, Stable Diffusion, short and long.
RANGES = ((0.0001, 0.02, 1000), (0.00085, 0.012, 1000), (0.001, 0.05, 50), (0.0001, 0.02, 4000))
EPS32 = 2.0**-24  # unit roundoff of float32

SD15_SCHEDULER_CONFIG = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.fixture(scope="module")
def hf() -> SimpleNamespace:
    """torch and the diffusers reference, imported only by the tests that compare against them."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    return SimpleNamespace(
        torch=torch,
        DDPMScheduler=DDPMScheduler,
        DDIMScheduler=DDIMScheduler,
        PNDMScheduler=PNDMScheduler,
        rescale_zero_terminal_snr=rescale_zero_terminal_snr,
        compute_snr=_diffusers_training_utils_function("compute_snr", {"torch": torch}),
    )


def _diffusers_training_utils_function(name: str, namespace: dict) -> object:
    """One function of `diffusers.training_utils`, compiled from its installed source.

    Importing that module pulls in transformers, peft and bitsandbytes (~5 s, half of this file's
    budget); its `compute_snr` needs only torch, so its exact source is run on its own.
    """
    import diffusers

    path = Path(diffusers.__file__).parent / "training_utils.py"
    tree = ast.parse(path.read_text())
    (node,) = (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _diffusers_with_our_alphas_cumprod(hf: SimpleNamespace, schedule: NoiseSchedule):
    """A DDPMScheduler whose alphas_cumprod is ours, in float64.

    Its own alphas_cumprod is a float32 cumprod that drifts ~1e-6 from the float64 one even for
    identical betas, and add_noise / get_velocity / step only read alphas_cumprod (cast to the
    sample dtype). Sharing it isolates their formulas, which must then agree to float64 rounding.
    """
    scheduler = hf.DDPMScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        prediction_type=schedule.prediction_type,
        clip_sample=False,
    )
    scheduler.alphas_cumprod = hf.torch.from_numpy(schedule.alphas_cumprod.copy())
    return scheduler


def _samples(batch: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, 8, 8)), rng.standard_normal((batch, 3, 8, 8))


# ---------------------------------------------------------------- closed forms, float64


def test_linear_betas_closed_form():
    betas = schedules.make_betas("linear", 5, 0.1, 0.5)
    np.testing.assert_allclose(betas, [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-15, atol=0)
    betas = schedules.make_betas("linear", 1001, 0.0001, 0.02)
    assert betas.dtype == np.float64 and betas.shape == (1001,)
    assert betas[0] == 0.0001 and betas[-1] == 0.02
    assert betas[500] == pytest.approx((0.0001 + 0.02) / 2, rel=1e-15)


def test_scaled_linear_betas_closed_form():
    beta_start, beta_end, steps = 0.00085, 0.012, 1000
    betas = schedules.make_betas("scaled_linear", steps, beta_start, beta_end)
    k = np.arange(steps)
    expected = (
        math.sqrt(beta_start) + k / (steps - 1) * (math.sqrt(beta_end) - math.sqrt(beta_start))
    ) ** 2
    np.testing.assert_allclose(betas, expected, rtol=1e-15, atol=0)
    assert betas[0] == pytest.approx(beta_start, rel=1e-15)
    assert betas[-1] == pytest.approx(beta_end, rel=1e-15)


def test_squaredcos_cap_v2_closed_form():
    steps = 1000

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [
        min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)
    ]
    # beta_start / beta_end are ignored by the cosine schedule.
    betas = schedules.make_betas("squaredcos_cap_v2", steps, 0.5, 0.7)
    np.testing.assert_allclose(betas, expected, rtol=1e-15, atol=0)
    assert betas[-1] == 0.999  # the cap: alpha_bar(1) ~ 0 would give beta ~ 1
    assert np.all(np.diff(betas) > 0)


def test_alphas_cumprod_and_sqrt_terms_closed_form():
    schedule = NoiseSchedule.create(trained_betas=[0.1, 0.2, 0.5, 0.0], num_train_timesteps=4)
    np.testing.assert_allclose(schedule.alphas, [0.9, 0.8, 0.5, 1.0], rtol=1e-15, atol=0)
    np.testing.assert_allclose(schedule.alphas_cumprod, [0.9, 0.72, 0.36, 0.36], rtol=1e-15, atol=0)
    np.testing.assert_allclose(
        schedule.sqrt_alphas_cumprod, [math.sqrt(0.9), math.sqrt(0.72), 0.6, 0.6], rtol=1e-15
    )
    np.testing.assert_allclose(
        schedule.sqrt_one_minus_alphas_cumprod,
        [math.sqrt(0.1), math.sqrt(0.28), 0.8, 0.8],
        rtol=1e-15,
    )
    assert schedule.alphas_cumprod.dtype == np.float64


def test_add_noise_velocity_and_targets_closed_form():
    # ab = 0.64 -> (sqrt(ab), sqrt(1 - ab)) = (0.8, 0.6); ab = 0.36 -> (0.6, 0.8).
    alphas_cumprod = np.array([0.9, 0.64, 0.36])
    timesteps = np.array([2, 1])  # one per sample, broadcast over (C, H, W)
    x0, noise = _samples(batch=2)
    a = np.array([0.6, 0.8])[:, None, None, None]
    s = np.array([0.8, 0.6])[:, None, None, None]
    noisy = schedules.add_noise(alphas_cumprod, x0, noise, timesteps)
    np.testing.assert_allclose(noisy, a * x0 + s * noise, rtol=0, atol=1e-15)
    velocity = schedules.get_velocity(alphas_cumprod, x0, noise, timesteps)
    np.testing.assert_allclose(velocity, a * noise - s * x0, rtol=0, atol=1e-15)

    kwargs = {
        "sample": x0,
        "noise": noise,
        "alphas_cumprod": alphas_cumprod,
        "timesteps": timesteps,
    }
    np.testing.assert_array_equal(schedules.training_target("epsilon", **kwargs), noise)
    np.testing.assert_array_equal(schedules.training_target("sample", **kwargs), x0)
    np.testing.assert_array_equal(schedules.training_target("v_prediction", **kwargs), velocity)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_predict_original_sample_inverts_training_target(prediction_type):
    schedule = NoiseSchedule.create(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    x0, noise = _samples()
    timesteps = np.array([0, 1, 500, 999])
    noisy = schedules.add_noise(schedule.alphas_cumprod, x0, noise, timesteps)
    target = schedules.training_target(
        prediction_type,
        sample=x0,
        noise=noise,
        alphas_cumprod=schedule.alphas_cumprod,
        timesteps=timesteps,
    )
    recovered = schedules.predict_original_sample(
        prediction_type,
        model_output=target,
        noisy_samples=noisy,
        alphas_cumprod=schedule.alphas_cumprod,
        timesteps=timesteps,
    )
    # epsilon divides by sqrt(ab_999) ~ 0.03, which magnifies float64 rounding ~30x.
    np.testing.assert_allclose(recovered, x0, rtol=0, atol=1e-12)


def test_compute_snr_closed_form():
    alphas_cumprod = np.array([0.8, 0.5, 0.2, 0.0])
    snr = schedules.compute_snr(alphas_cumprod, np.array([0, 1, 2, 3, 0]))
    np.testing.assert_allclose(snr, [4.0, 1.0, 0.25, 0.0, 4.0], rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    [
        # snr:         0    0.5          5 (= gamma)  20
        ("epsilon", [1.0, 1.0, 1.0, 5 / 20]),
        ("v_prediction", [0.0, 0.5 / 1.5, 5 / 6, 5 / 21]),
        ("sample", [0.0, 0.5, 5.0, 5.0]),
    ],
)
def test_min_snr_loss_weights_closed_form(prediction_type, expected):
    weights = schedules.min_snr_loss_weights(np.array([0.0, 0.5, 5.0, 20.0]), 5.0, prediction_type)
    np.testing.assert_allclose(weights, expected, rtol=1e-15, atol=0)


# ---------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize(("beta_start", "beta_end", "steps"), RANGES)
@pytest.mark.parametrize("rescale", [False, True])
def test_schedule_matches_ddpm_scheduler(hf, beta_schedule, beta_start, beta_end, steps, rescale):
    kwargs = {
        "beta_schedule": beta_schedule,
        "num_train_timesteps": steps,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "rescale_betas_zero_snr": rescale,
    }
    ours = NoiseSchedule.create(**kwargs)
    theirs = hf.DDPMScheduler(**kwargs)
    their_betas = theirs.betas.double().numpy()
    their_alphas_cumprod = theirs.alphas_cumprod.double().numpy()
    if not rescale:
        # diffusers builds betas in float32 (float32 linspace, squared for scaled_linear; float64
        # cosine cast to float32): a few float32 roundings, far below any formula difference.
        np.testing.assert_allclose(their_betas, ours.betas, rtol=1e-6, atol=0)
    # float32 cumprod over T steps drifts by rounding (~sqrt(T) * EPS32, each step's error scaled
    # by beta / (1 - beta), large at the capped cosine end). Rescaled betas are a float32 quotient
    # of nearly equal small numbers near t = T, so they are compared in float64 in the next test;
    # here their cumprod, which is what training reads, is compared.
    np.testing.assert_allclose(
        their_alphas_cumprod, ours.alphas_cumprod, rtol=1e-6, atol=4 * math.sqrt(steps) * EPS32
    )
    if rescale:
        assert ours.alphas_cumprod[-1] == 0.0 == their_alphas_cumprod[-1]
        assert ours.betas[-1] == 1.0 == their_betas[-1]


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_rescale_zero_terminal_snr_matches_diffusers(hf, beta_schedule):
    # diffusers' function is dtype-generic: on float64 tensors it is an exact reference.
    betas = hf.DDPMScheduler(beta_schedule=beta_schedule).betas.double()
    expected = hf.rescale_zero_terminal_snr(betas.clone()).numpy()
    rescaled = schedules.rescale_zero_terminal_snr(betas.numpy())
    np.testing.assert_allclose(rescaled, expected, rtol=1e-12, atol=1e-15)
    schedule = NoiseSchedule.create(trained_betas=betas.numpy(), rescale_betas_zero_snr=True)
    assert schedule.alphas_cumprod[-1] == 0.0
    assert schedule.betas[-1] == 1.0
    np.testing.assert_allclose(schedule.betas, expected, rtol=1e-12, atol=1e-15)
    assert np.all(schedule.alphas_cumprod[:-1] > 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
    ],
)
def test_add_noise_and_get_velocity_match_ddpm_scheduler(hf, kwargs):
    torch = hf.torch
    schedule = NoiseSchedule.create(**kwargs)
    scheduler = _diffusers_with_our_alphas_cumprod(hf, schedule)
    x0, noise = _samples(batch=5)
    timesteps = np.array([0, 1, 250, 998, 999])
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps))
    np.testing.assert_allclose(
        schedules.add_noise(schedule.alphas_cumprod, x0, noise, timesteps),
        scheduler.add_noise(*args).numpy(),
        rtol=0,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        schedules.get_velocity(schedule.alphas_cumprod, x0, noise, timesteps),
        scheduler.get_velocity(*args).numpy(),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_predict_original_sample_matches_ddpm_step(hf, prediction_type):
    torch = hf.torch
    schedule = NoiseSchedule.create(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )
    scheduler = _diffusers_with_our_alphas_cumprod(hf, schedule)
    model_output, noisy = _samples(batch=2)
    for t in (0, 10, 500, 999):
        theirs = scheduler.step(
            torch.from_numpy(model_output),
            t,
            torch.from_numpy(noisy),
            generator=torch.Generator().manual_seed(0),
        ).pred_original_sample.numpy()
        ours = schedules.predict_original_sample(
            prediction_type,
            model_output=model_output,
            noisy_samples=noisy,
            alphas_cumprod=schedule.alphas_cumprod,
            timesteps=np.array([t, t]),
        )
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rescale", [False, True])
def test_compute_snr_matches_diffusers(hf, rescale):
    torch = hf.torch
    schedule = NoiseSchedule.create(beta_schedule="scaled_linear", rescale_betas_zero_snr=rescale)
    timesteps = [*range(0, 1000, 37), 999]
    theirs = hf.compute_snr(
        SimpleNamespace(alphas_cumprod=torch.from_numpy(schedule.alphas_cumprod.copy())),
        torch.tensor(timesteps),
    )
    # diffusers casts sqrt(ab) and sqrt(1 - ab) to float32 (`.float()`) before dividing, even from
    # float64 input, so a few float32 roundings separate it from the float64 SNR.
    assert theirs.dtype == torch.float32
    ours = schedules.compute_snr(schedule.alphas_cumprod, np.array(timesteps))
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6, atol=0)
    assert (ours[-1] == 0.0) == rescale


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_weights_match_diffusers_training_scripts(hf, prediction_type):
    torch = hf.torch
    snr_gamma = 5.0
    schedule = NoiseSchedule.create(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    timesteps = np.arange(1000)
    snr_np = schedules.compute_snr(schedule.alphas_cumprod, timesteps)
    # diffusers' train_text_to_image.py, verbatim, on float64 tensors.
    snr = torch.from_numpy(snr_np)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    theirs = mse_loss_weights.numpy()
    ours = schedules.min_snr_loss_weights(snr_np, snr_gamma, prediction_type)
    # Bit for bit where snr > 0; at the zero-SNR last step diffusers' epsilon weight is 0/0.
    np.testing.assert_array_equal(ours[:-1], theirs[:-1])
    if prediction_type == "epsilon":
        assert math.isnan(theirs[-1]) and ours[-1] == 1.0
    else:
        assert theirs[-1] == ours[-1] == 0.0
    assert np.any(snr_np > snr_gamma) and np.any(snr_np < snr_gamma)


# ---------------------------------------------------------------- scheduler_config.json


@pytest.mark.parametrize(
    ("config", "diffusers_class"),
    [(SD15_SCHEDULER_CONFIG, "PNDMScheduler"), (SD21_SCHEDULER_CONFIG, "DDIMScheduler")],
    ids=["sd15", "sd21"],
)
def test_from_pretrained_folder_reads_stable_diffusion_configs(
    hf, tmp_path, config, diffusers_class
):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    schedule = NoiseSchedule.from_pretrained_folder(str(tmp_path))
    assert schedule.prediction_type == config["prediction_type"]
    assert schedule.num_train_timesteps == 1000
    expected = NoiseSchedule.create(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=config["prediction_type"],
    )
    np.testing.assert_array_equal(schedule.betas, expected.betas)
    np.testing.assert_array_equal(schedule.alphas_cumprod, expected.alphas_cumprod)
    # diffusers reading the same folder builds the same (float32) betas.
    theirs = getattr(hf, diffusers_class).from_pretrained(tmp_path, subfolder="scheduler")
    np.testing.assert_allclose(theirs.betas.double().numpy(), schedule.betas, rtol=1e-6, atol=0)
    assert theirs.config.prediction_type == schedule.prediction_type


def test_from_scheduler_config_defaults_are_ddpm_schedulers(hf):
    schedule = NoiseSchedule.from_scheduler_config(
        {"_class_name": "DDPMScheduler", "trained_betas": None}
    )
    theirs = hf.DDPMScheduler()
    assert schedule.num_train_timesteps == theirs.config.num_train_timesteps == 1000
    assert schedule.prediction_type == theirs.config.prediction_type == "epsilon"
    assert schedule.betas[0] == theirs.config.beta_start == 0.0001
    assert schedule.betas[-1] == theirs.config.beta_end == 0.02
    np.testing.assert_allclose(theirs.betas.double().numpy(), schedule.betas, rtol=1e-6, atol=0)
    # An SD 1.5 config without prediction_type (as older uploads are) means epsilon.
    legacy = {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "prediction_type"}
    assert NoiseSchedule.from_scheduler_config(legacy).prediction_type == "epsilon"


def test_from_scheduler_config_trained_betas_and_rescale():
    config = {"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 3, "beta_schedule": "linear"}
    np.testing.assert_array_equal(
        NoiseSchedule.from_scheduler_config(config).betas, [0.1, 0.2, 0.3]
    )
    rescaled = NoiseSchedule.from_scheduler_config(
        {**SD21_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True}
    )
    assert rescaled.alphas_cumprod[-1] == 0.0


# ---------------------------------------------------------------- errors and invariants


def test_unknown_beta_schedule_names_valid_ones():
    with pytest.raises(ValueError, match=r"'cosine'.*linear, scaled_linear, squaredcos_cap_v2"):
        NoiseSchedule.create(beta_schedule="cosine")


@pytest.mark.parametrize(
    "call",
    [
        lambda: NoiseSchedule.create(prediction_type="x0"),
        lambda: NoiseSchedule.from_scheduler_config({"prediction_type": "x0"}),
        lambda: schedules.min_snr_loss_weights(np.ones(2), 5.0, "x0"),
        lambda: schedules.training_target(
            "x0",
            sample=np.ones((1, 2)),
            noise=np.ones((1, 2)),
            alphas_cumprod=np.ones(3) / 2,
            timesteps=np.zeros(1, int),
        ),
    ],
)
def test_unknown_prediction_type_names_valid_ones(call):
    with pytest.raises(ValueError, match=r"'x0'.*epsilon, v_prediction, sample"):
        call()


def test_missing_scheduler_config_names_the_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"No scheduler config.*scheduler[/\\]scheduler_config\.json"
    ):
        NoiseSchedule.from_pretrained_folder(tmp_path)


def test_trained_betas_must_match_num_train_timesteps_and_lie_in_unit_interval():
    with pytest.raises(ValueError, match=r"\(3,\).*\(1000,\)"):
        NoiseSchedule.create(trained_betas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NoiseSchedule.create(beta_start=0.1, beta_end=2.0, num_train_timesteps=10)


def test_noise_schedule_is_frozen_and_owns_its_arrays():
    trained_betas = np.array([0.1, 0.2, 0.3])
    schedule = NoiseSchedule.create(trained_betas=trained_betas, num_train_timesteps=3)
    direct = NoiseSchedule(trained_betas, num_train_timesteps=3)
    trained_betas[0] = 0.9  # the caller's array is neither aliased nor made read-only
    assert schedule.betas[0] == direct.betas[0] == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.prediction_type = "sample"  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        schedule.alphas_cumprod[0] = 1.0


def test_shared_schedules_imports_no_backend():
    code = (
        "import sys, shared.schedules; "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'jax', 'jaxlib', 'flax', 'optax', 'torch', 'diffusers', 'accelerate', 'transformers'})))"
    )
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
