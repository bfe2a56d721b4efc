"""flaxdiff.diffusion: the training objective against the float64 numpy math of shared.schedules.

Arrays are tiny NHWC batches; everything runs eagerly except the one jit-vs-eager test (XLA
compiles are the slow part on a CPU runner).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff.diffusion import Noised, Objective
from shared import schedules
from shared.config import build

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SCHEDULE = schedules.NoiseSchedule.create(**SD)
ZERO_SNR = schedules.NoiseSchedule.create(**SD, rescale_betas_zero_snr=True)
TIMESTEPS = np.array([0, 1, 10, 250, 500, 998, 999, 999])  # both ends of the schedule
SHAPE = (8, 5, 6, 4)  # (B, H, W, C)
DREAMBOOTH = {
    "pretrained_model_name_or_path": "tiny/sd",
    "instance_data_dir": "instance",
    "instance_prompt": "a photo of sks dog",
}


def arrays(dtype=np.float64, shape=SHAPE, seed=0) -> tuple[np.ndarray, ...]:
    """clean, noise and a stand-in model prediction, (B, H, W, C) numpy."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def objective(prediction_type="v_prediction", schedule=SCHEDULE, **kwargs) -> Objective:
    return Objective(schedule.alphas_cumprod, prediction_type, **kwargs)


# (a) Forward process ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [SCHEDULE, ZERO_SNR], ids=["scaled_linear", "zero_snr"])
def test_forward_process_equals_reference_in_float64(x64, schedule):
    clean, noise, _ = arrays()
    ab = schedule.alphas_cumprod
    noisy_ref = schedules.add_noise(ab, clean, noise, TIMESTEPS)
    for prediction_type in schedules.PREDICTION_TYPES:
        obj = objective(prediction_type, schedule)
        assert obj.alphas_cumprod.dtype == jnp.float64
        t = jnp.asarray(TIMESTEPS)
        noisy = obj.add_noise(jnp.asarray(clean), jnp.asarray(noise), t)
        target = obj.target(jnp.asarray(clean), jnp.asarray(noise), t)
        assert noisy.dtype == target.dtype == jnp.float64
        expected = schedules.training_target(
            prediction_type, sample=clean, noise=noise, alphas_cumprod=ab, timesteps=TIMESTEPS
        )
        np.testing.assert_allclose(np.asarray(noisy), noisy_ref, rtol=0, atol=1e-14)
        np.testing.assert_allclose(np.asarray(target), expected, rtol=0, atol=1e-14)
    velocity = obj.velocity(jnp.asarray(clean), jnp.asarray(noise), t)
    np.testing.assert_allclose(
        np.asarray(velocity), schedules.get_velocity(ab, clean, noise, TIMESTEPS), atol=1e-14
    )


@pytest.mark.parametrize("schedule_dtype", ["float32", "float64"])
def test_forward_process_rounds_the_schedule_to_the_sample_dtype_first(schedule_dtype, request):
    if schedule_dtype == "float64":
        request.getfixturevalue("x64")  # a float64 schedule must still give float32 arithmetic
    clean, noise, _ = arrays(np.float32)
    obj = objective()
    assert obj.alphas_cumprod.dtype == np.dtype(schedule_dtype)
    noisy = obj.add_noise(jnp.asarray(clean), jnp.asarray(noise), jnp.asarray(TIMESTEPS))
    velocity = obj.velocity(jnp.asarray(clean), jnp.asarray(noise), jnp.asarray(TIMESTEPS))
    # DDPMScheduler's float32 arithmetic, written out in numpy: equal bit for bit.
    ab = SCHEDULE.alphas_cumprod.astype(np.float32)[TIMESTEPS][:, None, None, None]
    a, s = np.sqrt(ab), np.sqrt(np.float32(1) - ab)
    np.testing.assert_array_equal(np.asarray(noisy), a * clean + s * noise)
    np.testing.assert_array_equal(np.asarray(velocity), a * noise - s * clean)
    reference = schedules.add_noise(SCHEDULE.alphas_cumprod, clean, noise, TIMESTEPS)
    np.testing.assert_allclose(np.asarray(noisy), reference, rtol=0, atol=2e-6)
    # A bfloat16 batch stays bfloat16, as diffusers' add_noise keeps the sample dtype.
    half = obj.add_noise(jnp.asarray(clean, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), 0)
    assert half.dtype == jnp.bfloat16 and half.shape == SHAPE


def test_snr_equals_reference():
    obj = objective(schedule=ZERO_SNR)
    snr = obj.snr(jnp.asarray(TIMESTEPS))
    expected = schedules.compute_snr(ZERO_SNR.alphas_cumprod, TIMESTEPS)
    assert snr.dtype == jnp.float32 and snr[-1] == 0
    np.testing.assert_allclose(np.asarray(snr), expected, rtol=1e-7, atol=0)


# (b) Loss --------------------------------------------------------------------------------------


def reference_loss(pred, target, timesteps, alphas_cumprod, prediction_type, snr_gamma):
    """The loss written out in float64 numpy from the papers' formulas."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    per_sample = ((pred - target) ** 2).reshape(len(pred), -1).mean(axis=1)
    ab = alphas_cumprod[timesteps]
    snr = ab / (1 - ab)
    if snr_gamma is None:
        weight = snr if prediction_type == "sample" else np.ones_like(snr)
    elif prediction_type == "epsilon":
        weight = np.where(snr == 0, 1.0, np.minimum(snr, snr_gamma) / np.where(snr == 0, 1, snr))
    elif prediction_type == "v_prediction":
        weight = np.minimum(snr, snr_gamma) / (snr + 1)
    else:
        weight = np.minimum(snr, snr_gamma)
    return float(np.mean(per_sample * weight))


def noised_batch(obj: Objective, shape=SHAPE, seed=0) -> tuple[Noised, jax.Array]:
    clean, noise, pred = (jnp.asarray(a) for a in arrays(np.float32, shape, seed))
    noised = obj.noised(clean, noise, jnp.asarray(TIMESTEPS[: shape[0]]))
    return noised, noised.target + 0.3 * pred


LOSS_CASES = [(p, g) for p in schedules.PREDICTION_TYPES for g in (None, 5.0)]


@pytest.mark.parametrize(("prediction_type", "snr_gamma"), LOSS_CASES)
@pytest.mark.parametrize("schedule", [SCHEDULE, ZERO_SNR], ids=["scaled_linear", "zero_snr"])
def test_loss_equals_float64_reference(prediction_type, snr_gamma, schedule):
    obj = objective(prediction_type, schedule, snr_gamma=snr_gamma)
    noised, pred = noised_batch(obj)
    loss, metrics = obj.loss(pred, noised)
    assert loss.dtype == jnp.float32 and loss.shape == () and metrics == {}
    expected = reference_loss(
        pred, noised.target, TIMESTEPS, schedule.alphas_cumprod, prediction_type, snr_gamma
    )
    # Zero terminal SNR: snr = 0 at t = 999 gives weight 1 for epsilon (not diffusers' 0/0).
    assert np.isfinite(expected)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_loss_weights_are_the_float64_min_snr_table_rounded(prediction_type):
    t = np.arange(1000)
    snr = schedules.compute_snr(ZERO_SNR.alphas_cumprod, t)
    weighted = objective(prediction_type, ZERO_SNR, snr_gamma=5.0).loss_weights
    expected = schedules.min_snr_loss_weights(snr, 5.0, prediction_type).astype(np.float32)
    assert weighted.dtype == jnp.float32 and weighted.shape == (1000,)
    np.testing.assert_array_equal(np.asarray(weighted), expected)
    # Without gamma only "sample" is weighted, by snr itself (train_unconditional.py).
    plain = objective(prediction_type, ZERO_SNR).loss_weights
    if prediction_type == "sample":
        np.testing.assert_array_equal(np.asarray(plain), snr.astype(np.float32))
    else:
        assert plain is None


def test_loss_is_float32_for_a_bfloat16_prediction():
    obj = objective("epsilon")
    noised, pred = noised_batch(obj)
    loss, _ = obj.loss(pred.astype(jnp.bfloat16), noised)
    upcast = np.asarray(pred.astype(jnp.bfloat16).astype(jnp.float32))
    expected = np.mean((upcast.astype(np.float64) - np.asarray(noised.target)) ** 2)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_preservation_loss(snr_gamma):
    obj = objective(snr_gamma=snr_gamma, prior_loss_weight=0.5)
    noised, pred = noised_batch(obj)
    loss, metrics = obj.loss(pred, noised)
    ab, target = SCHEDULE.alphas_cumprod, np.asarray(noised.target)
    instance = reference_loss(pred[:4], target[:4], TIMESTEPS[:4], ab, "v_prediction", snr_gamma)
    prior = float(np.mean((np.asarray(pred[4:], np.float64) - target[4:]) ** 2))
    assert set(metrics) == {"loss/instance", "loss/prior"}
    np.testing.assert_allclose(float(metrics["loss/instance"]), instance, rtol=2e-6)
    np.testing.assert_allclose(float(metrics["loss/prior"]), prior, rtol=2e-6)
    np.testing.assert_allclose(float(loss), instance + 0.5 * prior, rtol=2e-6)
    # The metrics are for logging: no gradient flows through them.
    metric_grad = jax.grad(lambda p: obj.loss(p, noised)[1]["loss/prior"])(pred)
    assert not np.any(np.asarray(metric_grad))
    grad = np.asarray(jax.grad(lambda p: obj.loss(p, noised)[0])(pred))
    assert np.all(np.isfinite(grad)) and np.all(grad[4:] != 0)


def test_prior_preservation_refuses_an_odd_batch_at_trace_time():
    obj = objective("epsilon", prior_loss_weight=1.0)
    noised, pred = noised_batch(obj, shape=(7, 5, 6, 4))
    with pytest.raises(ValueError, match="odd batch of 7"):
        obj.loss(pred, noised)
    with pytest.raises(ValueError, match="odd batch of 7"):
        jax.eval_shape(obj.loss, pred, noised)  # traced: the check needs no values


def test_invalid_objectives_are_refused():
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        objective("flow")
    with pytest.raises(ValueError, match=r"\(T,\) vector"):
        Objective(np.ones((2, 3)), "epsilon")


# (c) Draws -------------------------------------------------------------------------------------


def test_draw_is_deterministic_given_the_key():
    obj = objective(noise_offset=0.1, input_perturbation=0.1)
    clean = jnp.asarray(arrays(np.float32)[0])
    first, again, other = (obj.draw(jax.random.key(seed), clean) for seed in (3, 3, 4))
    for field in ("noise", "timesteps", "noisy", "target"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
        assert not np.array_equal(getattr(first, field), getattr(other, field))
    for field in ("noise", "noisy", "target"):
        assert getattr(first, field).shape == SHAPE and getattr(first, field).dtype == jnp.float32
    assert first.timesteps.shape == (8,) and first.timesteps.dtype == jnp.int32
    assert int(first.timesteps.min()) >= 0 and int(first.timesteps.max()) < 1000
    # Draws take the batch's dtype: a bfloat16 batch gets bfloat16 noise, input and target.
    # (eval_shape traces without compiling: every new random shape or dtype costs a compile.)
    half = jax.eval_shape(obj.draw, jax.random.key(3), clean.astype(jnp.bfloat16))
    assert half.noise.dtype == half.noisy.dtype == half.target.dtype == jnp.bfloat16


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_draw_uses_the_documented_keys(prediction_type):
    obj = objective(prediction_type, noise_offset=0.1, input_perturbation=0.2)
    clean = jnp.asarray(arrays(np.float32)[0])
    key = jax.random.key(7)
    noised = obj.draw(key, clean)
    keys = jax.random.split(key, 4)
    noise = jax.random.normal(keys[0], SHAPE)
    offset = jax.random.normal(keys[1], (8, 1, 1, 4))
    perturbation = jax.random.normal(keys[2], SHAPE)
    timesteps = jax.random.randint(keys[3], (8,), 0, 1000, dtype=jnp.int32)
    noise = noise + 0.1 * offset
    assert np.array_equal(noised.timesteps, timesteps) and np.array_equal(noised.noise, noise)
    assert np.array_equal(noised.noisy, obj.add_noise(clean, noise + 0.2 * perturbation, timesteps))
    assert np.array_equal(noised.target, obj.target(clean, noise, timesteps))
    assert noised.clean is clean


def test_offset_noise_is_one_shift_per_sample_and_channel():
    clean = jnp.asarray(arrays(np.float32)[0])
    key = jax.random.key(1)
    with_offset = objective(noise_offset=0.1).draw(key, clean)
    plain = objective().draw(key, clean)  # same keys: only the offset differs
    assert np.array_equal(with_offset.timesteps, plain.timesteps)
    shift = np.asarray(with_offset.noise - plain.noise)  # (B, H, W, C)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], SHAPE), atol=1e-6)
    per_channel = shift[:, 0, 0, :]  # (B, C)
    assert np.abs(per_channel).min() > 0 and per_channel.std() > 0.05
    assert np.ptp(per_channel, axis=1).min() > 0  # channels of one sample shift differently


def test_input_perturbation_changes_the_input_but_not_the_target():
    clean = jnp.asarray(arrays(np.float32)[0])
    obj = objective(input_perturbation=0.1)
    noised = obj.draw(jax.random.key(2), clean)
    unperturbed = obj.add_noise(clean, noised.noise, noised.timesteps)
    assert np.array_equal(noised.target, obj.velocity(clean, noised.noise, noised.timesteps))
    assert np.abs(np.asarray(noised.noisy - unperturbed)).max() > 1e-3


def test_noised_needs_the_draws_of_enabled_options():
    clean, noise, _ = (jnp.asarray(a) for a in arrays(np.float32))
    t = jnp.asarray(TIMESTEPS)
    with pytest.raises(ValueError, match="needs an offset draw"):
        objective(noise_offset=0.1).noised(clean, noise, t)
    with pytest.raises(ValueError, match="needs a perturbation draw"):
        objective(input_perturbation=0.1).noised(clean, noise, t)


# (d) DREAM -------------------------------------------------------------------------------------


def linear_model(weight):
    """(noisy, timesteps) -> a channel mix of noisy plus a timestep shift: a stand-in UNet."""
    return lambda x, t: jnp.einsum("bhwc,dc->bhwd", x, weight) + t[:, None, None, None] / 1000


@pytest.mark.parametrize("detail_preservation", [1.0, 0.7])
def test_dream_equals_the_formula_and_stops_the_gradient(detail_preservation):
    obj = objective("epsilon")
    noised, _ = noised_batch(obj)
    weight = jnp.asarray(np.random.default_rng(1).standard_normal((4, 4)), jnp.float32) / 2
    dreamed = obj.dream(noised, linear_model(weight), detail_preservation=detail_preservation)
    noise, noisy = np.asarray(noised.noise, np.float64), np.asarray(noised.noisy, np.float64)
    pred = np.einsum("bhwc,dc->bhwd", noisy, np.asarray(weight, np.float64))
    pred += TIMESTEPS[:, None, None, None] / 1000
    s = np.sqrt(1 - SCHEDULE.alphas_cumprod[TIMESTEPS])[:, None, None, None]
    delta = (noise - pred) * s**detail_preservation
    np.testing.assert_allclose(np.asarray(dreamed.noisy), noisy + s * delta, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dreamed.target), noise + delta, rtol=0, atol=1e-5)
    assert dreamed.noise is noised.noise and dreamed.timesteps is noised.timesteps

    def dreamed_sum(w):
        out = obj.dream(noised, linear_model(w), detail_preservation=detail_preservation)
        return jnp.sum(out.noisy) + jnp.sum(out.target)

    assert not np.any(np.asarray(jax.grad(dreamed_sum)(weight)))


def test_dream_refuses_v_prediction():
    obj = objective("v_prediction")
    noised, _ = noised_batch(obj)
    with pytest.raises(NotImplementedError, match=r"--dream_training.*'v_prediction'"):
        obj.dream(noised, lambda x, t: x, detail_preservation=1.0)


# (e) jit ---------------------------------------------------------------------------------------


def test_jit_equals_eager():
    options = dict(snr_gamma=5.0, noise_offset=0.1, input_perturbation=0.1, prior_loss_weight=0.5)
    obj = objective("epsilon", ZERO_SNR, **options)
    weight = jnp.eye(4, dtype=jnp.float32) * 0.9

    def step(key, clean):
        noised = obj.dream(obj.draw(key, clean), linear_model(weight), detail_preservation=1.0)
        loss, metrics = obj.loss(linear_model(weight * 1.1)(noised.noisy, noised.timesteps), noised)
        return noised, loss, metrics

    clean = jnp.asarray(arrays(np.float32)[0])
    eager = step(jax.random.key(0), clean)
    jitted = jax.jit(step)(jax.random.key(0), clean)
    assert np.array_equal(eager[0].timesteps, jitted[0].timesteps)
    # XLA fuses the jitted graph (and may contract multiply-adds), so allow float32 rounding.
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert set(jitted[2]) == {"loss/instance", "loss/prior"} and float(jitted[1]) > 0


# (f) from_config -------------------------------------------------------------------------------

SD21_SCHEDULER = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (abridged)
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "trained_betas": None,
}


def test_from_config_takes_the_schedulers_prediction_type_and_the_flags(x64):
    obj = Objective.from_config(build("dreambooth", "flax", DREAMBOOTH), SD21_SCHEDULER)
    assert obj.prediction_type == "v_prediction" and obj.num_train_timesteps == 1000
    assert obj.alphas_cumprod.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(obj.alphas_cumprod), SCHEDULE.alphas_cumprod)
    assert (obj.snr_gamma, obj.noise_offset, obj.input_perturbation) == (None, 0.0, 0.0)
    assert obj.prior_loss_weight is None and obj.loss_weights is None


def test_from_config_flags_override_the_scheduler():
    values = {
        **DREAMBOOTH,
        "prediction_type": "epsilon",
        "offset_noise": True,
        "snr_gamma": 5.0,
        "input_perturbation": 0.05,
        "with_prior_preservation": True,
        "prior_loss_weight": 0.5,
        "class_data_dir": "class",
        "class_prompt": "a photo of dog",
    }
    obj = Objective.from_config(build("dreambooth", "flax", values), SD21_SCHEDULER)
    assert obj.prediction_type == "epsilon" and obj.alphas_cumprod.dtype == jnp.float32
    assert (obj.snr_gamma, obj.noise_offset, obj.input_perturbation) == (5.0, 0.1, 0.05)
    assert obj.prior_loss_weight == 0.5
    # prior_loss_weight is read only with --with_prior_preservation.
    without = build("dreambooth", "flax", {**DREAMBOOTH, "prior_loss_weight": 0.5})
    assert Objective.from_config(without, {}).prior_loss_weight is None
    assert Objective.from_config(without, {}).prediction_type == "epsilon"  # diffusers' default
