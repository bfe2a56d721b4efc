"""torchdiff.diffusion: the training objective against diffusers and a float64 numpy reference."""

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import DDPMScheduler  # noqa: E402
from diffusers.training_utils import compute_dream_and_update_latents, compute_snr  # noqa: E402

from shared import schedules  # noqa: E402
from shared.config import build  # noqa: E402
from torchdiff.diffusion import Noised, Objective  # noqa: E402

SCHEDULER_KWARGS = {  # DDPM defaults, Stable Diffusion, and the cosine schedule (no betas used)
    "linear": {"beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {},
}
TIMESTEPS = (0, 1, 10, 250, 500, 998, 999, 999)
DREAMBOOTH = {
    "pretrained_model_name_or_path": "tiny/sd",
    "instance_data_dir": "instance",
    "instance_prompt": "a photo of sks dog",
}


def scheduler(beta_schedule: str, **kwargs) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        **SCHEDULER_KWARGS[beta_schedule],
        **kwargs,
    )


def batch(dtype=torch.float32, shape=(8, 4, 5, 6), seed=0) -> tuple[torch.Tensor, ...]:
    """clean, noise, timesteps: a fixed batch spanning the schedule, both ends included."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(shape, generator=g, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=dtype)
    return clean, noise, torch.tensor(TIMESTEPS[: shape[0]], dtype=torch.int64)


def reference_schedule(beta_schedule: str, **kwargs) -> schedules.NoiseSchedule:
    return schedules.NoiseSchedule.create(
        beta_schedule=beta_schedule, **SCHEDULER_KWARGS[beta_schedule], **kwargs
    )


# (a) Forward process ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", list(SCHEDULER_KWARGS))
def test_add_noise_and_velocity_equal_diffusers_bit_for_bit_in_float32(beta_schedule):
    sched = scheduler(beta_schedule)
    objective = Objective(alphas_cumprod=sched.alphas_cumprod, prediction_type="epsilon")
    clean, noise, timesteps = batch()
    noisy = objective.add_noise(clean, noise, timesteps)
    velocity = objective.velocity(clean, noise, timesteps)
    assert noisy.dtype == velocity.dtype == torch.float32
    assert torch.equal(noisy, sched.add_noise(clean, noise, timesteps))
    assert torch.equal(velocity, sched.get_velocity(clean, noise, timesteps))


@pytest.mark.parametrize("beta_schedule", list(SCHEDULER_KWARGS))
def test_add_noise_and_velocity_equal_reference_in_float64(beta_schedule):
    ref = reference_schedule(beta_schedule)
    objective = Objective(alphas_cumprod=ref.alphas_cumprod, prediction_type="epsilon")
    clean, noise, timesteps = batch(torch.float64)
    args = (ref.alphas_cumprod, clean.numpy(), noise.numpy(), timesteps.numpy())
    noisy = objective.add_noise(clean, noise, timesteps)
    velocity = objective.velocity(clean, noise, timesteps)
    assert noisy.dtype == velocity.dtype == torch.float64
    np.testing.assert_allclose(noisy.numpy(), schedules.add_noise(*args), rtol=0, atol=1e-14)
    np.testing.assert_allclose(velocity.numpy(), schedules.get_velocity(*args), rtol=0, atol=1e-14)


@pytest.mark.parametrize("beta_schedule", list(SCHEDULER_KWARGS))
def test_snr_equals_reference_and_diffusers_compute_snr(beta_schedule):
    sched = scheduler(beta_schedule)
    objective = Objective(alphas_cumprod=sched.alphas_cumprod, prediction_type="epsilon")
    timesteps = torch.tensor(TIMESTEPS)
    snr = objective.snr(timesteps)
    assert snr.dtype == torch.float64 and snr.shape == (len(TIMESTEPS),)
    expected = schedules.compute_snr(sched.alphas_cumprod.double().numpy(), timesteps.numpy())
    np.testing.assert_array_equal(snr.numpy(), expected)
    # diffusers computes (sqrt(ab) / sqrt(1 - ab))**2 in float32: a few float32 roundings apart.
    np.testing.assert_allclose(snr.numpy(), compute_snr(sched, timesteps).numpy(), rtol=3e-6)


# (b) Loss --------------------------------------------------------------------------------------


def reference_loss(pred, target, timesteps, alphas_cumprod, prediction_type, snr_gamma):
    """The loss written out in float64 numpy from the papers' formulas."""
    pred, target = pred.double().numpy(), target.double().numpy()
    per_sample = ((pred - target) ** 2).reshape(len(pred), -1).mean(axis=1)
    ab = np.asarray(alphas_cumprod, dtype=np.float64)[timesteps.numpy()]
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


def noised_batch(seed=0, shape=(8, 4, 5, 6)) -> tuple[Noised, torch.Tensor]:
    clean, noise, timesteps = batch(shape=shape, seed=seed)
    target = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    pred = target + 0.3 * noise
    return Noised(clean=clean, noise=noise, timesteps=timesteps, noisy=clean, target=target), pred


LOSS_CASES = [
    ("epsilon", None),
    ("epsilon", 5.0),
    ("v_prediction", None),
    ("v_prediction", 5.0),
    ("sample", None),
    ("sample", 5.0),
]


@pytest.mark.parametrize(("prediction_type", "snr_gamma"), LOSS_CASES)
@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
def test_loss_equals_float64_reference(prediction_type, snr_gamma, rescale_betas_zero_snr):
    ref = reference_schedule("scaled_linear", rescale_betas_zero_snr=rescale_betas_zero_snr)
    objective = Objective(ref.alphas_cumprod, prediction_type, snr_gamma=snr_gamma)
    noised, pred = noised_batch()
    loss, metrics = objective.loss(pred, noised)
    assert loss.dtype == torch.float32 and loss.shape == () and metrics == {}
    expected = reference_loss(
        pred, noised.target, noised.timesteps, ref.alphas_cumprod, prediction_type, snr_gamma
    )
    # Zero terminal SNR: snr = 0 at t = 999 gives weight 1 for epsilon (not diffusers' 0/0).
    assert np.isfinite(expected)
    np.testing.assert_allclose(loss.item(), expected, rtol=2e-6)


def test_unweighted_loss_is_the_scripts_mse_bit_for_bit():
    objective = Objective(reference_schedule("linear").alphas_cumprod, "epsilon")
    noised, pred = noised_batch()
    loss, _ = objective.loss(pred.half(), noised)
    expected = torch.nn.functional.mse_loss(pred.half().float(), noised.target.float())
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_train_text_to_image(prediction_type):
    sched = scheduler("scaled_linear", prediction_type=prediction_type)
    objective = Objective(sched.alphas_cumprod, prediction_type, snr_gamma=5.0)
    noised, pred = noised_batch()
    # train_text_to_image.py's formula, float32 throughout.
    snr = compute_snr(sched, noised.timesteps)
    weights = torch.stack([snr, 5.0 * torch.ones_like(noised.timesteps)], dim=1).min(dim=1)[0]
    weights = weights / (snr if prediction_type == "epsilon" else snr + 1)
    per_sample = torch.nn.functional.mse_loss(pred, noised.target, reduction="none").mean((1, 2, 3))
    expected = (per_sample * weights).mean()
    loss, _ = objective.loss(pred, noised)
    torch.testing.assert_close(loss, expected, rtol=3e-6, atol=0)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_preservation_loss(snr_gamma):
    ref = reference_schedule("scaled_linear")
    objective = Objective(
        ref.alphas_cumprod, "v_prediction", snr_gamma=snr_gamma, prior_loss_weight=0.5
    )
    noised, pred = noised_batch()
    pred.requires_grad_(True)
    loss, metrics = objective.loss(pred, noised)
    t = noised.timesteps
    instance = reference_loss(
        pred[:4].detach(), noised.target[:4], t[:4], ref.alphas_cumprod, "v_prediction", snr_gamma
    )
    prior = float(np.mean((pred[4:].double().detach().numpy() - noised.target[4:].numpy()) ** 2))
    assert set(metrics) == {"loss/instance", "loss/prior"}
    assert not any(m.requires_grad for m in metrics.values())
    np.testing.assert_allclose(metrics["loss/instance"].item(), instance, rtol=2e-6)
    np.testing.assert_allclose(metrics["loss/prior"].item(), prior, rtol=2e-6)
    np.testing.assert_allclose(loss.item(), instance + 0.5 * prior, rtol=2e-6)
    loss.backward()
    assert pred.grad is not None and torch.all(torch.isfinite(pred.grad))


def test_prior_preservation_refuses_an_odd_batch():
    objective = Objective(
        reference_schedule("linear").alphas_cumprod, "epsilon", prior_loss_weight=1
    )
    noised, pred = noised_batch(shape=(7, 4, 5, 6))
    with pytest.raises(ValueError, match="odd batch of 7"):
        objective.loss(pred, noised)


def test_unknown_prediction_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        Objective(reference_schedule("linear").alphas_cumprod, "flow")


# (c) Sampling ----------------------------------------------------------------------------------


def objective(prediction_type="v_prediction", **kwargs) -> Objective:
    return Objective(reference_schedule("scaled_linear").alphas_cumprod, prediction_type, **kwargs)


def test_sample_is_deterministic_given_the_seed():
    obj = objective(noise_offset=0.1, input_perturbation=0.1)
    clean = batch()[0]
    first = obj.sample(clean, torch.Generator().manual_seed(3))
    again = obj.sample(clean, torch.Generator().manual_seed(3))
    other = obj.sample(clean, torch.Generator().manual_seed(4))
    for field in ("noise", "timesteps", "noisy", "target"):
        assert torch.equal(getattr(first, field), getattr(again, field))
        assert not torch.equal(getattr(first, field), getattr(other, field))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sample_draws_in_the_documented_order(prediction_type):
    obj = objective(prediction_type, noise_offset=0.1, input_perturbation=0.2)
    clean = batch()[0]
    noised = obj.sample(clean, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(clean.shape, generator=g)
    offset = torch.randn(8, 4, 1, 1, generator=g)
    perturbation = torch.randn(clean.shape, generator=g)
    timesteps = torch.randint(0, 1000, (8,), generator=g)
    noise = noise + 0.1 * offset
    target = {"epsilon": noise, "sample": clean}.get(prediction_type)
    if target is None:
        target = obj.velocity(clean, noise, timesteps)
    assert noised.timesteps.dtype == torch.int64 and torch.equal(noised.timesteps, timesteps)
    assert noised.clean is clean and torch.equal(noised.noise, noise)
    assert torch.equal(noised.noisy, obj.add_noise(clean, noise + 0.2 * perturbation, timesteps))
    assert torch.equal(noised.target, target)


def test_offset_noise_is_one_shift_per_sample_and_channel():
    clean = batch()[0]
    noised = objective(noise_offset=0.1).sample(clean, torch.Generator().manual_seed(1))
    plain = objective().sample(clean, torch.Generator().manual_seed(1))
    shift = noised.noise - plain.noise  # (B, C, H, W)
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    assert shift[:, :, 0, 0].abs().min() > 0 and shift[:, :, 0, 0].std() > 0.05


def test_input_perturbation_changes_the_input_but_not_the_target():
    clean = batch()[0]
    obj = objective(input_perturbation=0.1)
    noised = obj.sample(clean, torch.Generator().manual_seed(2))
    unperturbed = obj.add_noise(clean, noised.noise, noised.timesteps)
    assert torch.equal(noised.target, obj.velocity(clean, noised.noise, noised.timesteps))
    assert (noised.noisy - unperturbed).abs().max() > 1e-3


def test_float64_end_to_end():
    ref = reference_schedule("squaredcos_cap_v2")
    obj = Objective(ref.alphas_cumprod, "v_prediction", noise_offset=0.1, input_perturbation=0.1)
    clean = batch(torch.float64)[0]
    noised = obj.sample(clean, torch.Generator().manual_seed(0))
    assert noised.noise.dtype == noised.noisy.dtype == noised.target.dtype == torch.float64
    t = noised.timesteps.numpy()
    expected = schedules.training_target(
        "v_prediction",
        sample=clean.numpy(),
        noise=noised.noise.numpy(),
        alphas_cumprod=ref.alphas_cumprod,
        timesteps=t,
    )
    np.testing.assert_allclose(noised.target.numpy(), expected, rtol=0, atol=1e-14)


# (d) DREAM -------------------------------------------------------------------------------------


class TinyUNet:
    """Stands in for a UNet2DConditionModel: any callable whose output has `.sample`."""

    def __init__(self):
        self.grad_enabled = None

    def __call__(self, noisy, timesteps, encoder_hidden_states):
        self.grad_enabled = torch.is_grad_enabled()
        shift = encoder_hidden_states.mean() + timesteps.float().view(-1, 1, 1, 1) / 1000
        return SimpleNamespace(sample=0.5 * torch.tanh(noisy) + shift)


@pytest.mark.parametrize("detail_preservation", [1.0, 0.7])
def test_dream_equals_diffusers(detail_preservation):
    sched = scheduler("scaled_linear")
    obj = Objective(sched.alphas_cumprod, "epsilon", noise_offset=0.1)
    noised = obj.sample(batch()[0], torch.Generator().manual_seed(5))
    unet, states = TinyUNet(), torch.randn(8, 7, 16, generator=torch.Generator().manual_seed(9))
    dreamed = obj.dream(
        noised, lambda x, t: unet(x, t, states).sample, detail_preservation=detail_preservation
    )
    assert unet.grad_enabled is False
    noisy, target = compute_dream_and_update_latents(
        unet,
        sched,
        noised.timesteps,
        noised.noise,
        noised.noisy,
        noised.target,
        states,
        detail_preservation,
    )
    assert torch.equal(dreamed.noisy, noisy) and torch.equal(dreamed.target, target)
    assert not torch.equal(dreamed.noisy, noised.noisy)
    assert dreamed.noise is noised.noise and dreamed.timesteps is noised.timesteps


def test_dream_refuses_v_prediction():
    obj = objective("v_prediction")
    noised = obj.sample(batch()[0], torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match=r"--dream_training.*'v_prediction'"):
        obj.dream(noised, lambda x, t: x, detail_preservation=1.0)


# (e) from_config -------------------------------------------------------------------------------

SD21_SCHEDULER = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (abridged)
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "trained_betas": None,
}


def test_from_config_takes_the_schedulers_prediction_type_and_the_flags():
    obj = Objective.from_config(build("dreambooth", "torch", DREAMBOOTH), SD21_SCHEDULER)
    assert obj.prediction_type == "v_prediction" and obj.num_train_timesteps == 1000
    assert obj.alphas_cumprod.dtype == torch.float64 and obj.alphas_cumprod.device.type == "cpu"
    np.testing.assert_array_equal(
        obj.alphas_cumprod.numpy(),
        schedules.NoiseSchedule.from_scheduler_config(SD21_SCHEDULER).alphas_cumprod,
    )
    assert (obj.snr_gamma, obj.noise_offset, obj.input_perturbation) == (None, 0.0, 0.0)
    assert obj.prior_loss_weight is None
    # float64 schedule vs diffusers' float32 cumprod: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(
        obj.alphas_cumprod.numpy(), scheduler("scaled_linear").alphas_cumprod.numpy(), rtol=2e-6
    )


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
    obj = Objective.from_config(build("dreambooth", "torch", values), SD21_SCHEDULER)
    assert obj.prediction_type == "epsilon"
    assert (obj.snr_gamma, obj.noise_offset, obj.input_perturbation) == (5.0, 0.1, 0.05)
    assert obj.prior_loss_weight == 0.5
    # prior_loss_weight is read only with --with_prior_preservation.
    without = build("dreambooth", "torch", {**DREAMBOOTH, "prior_loss_weight": 0.5})
    assert Objective.from_config(without, {}).prior_loss_weight is None
    assert Objective.from_config(without, {}).prediction_type == "epsilon"  # diffusers' default
