"""flaxdiff's objective against torchdiff's: same batch, draws and prediction; float64 and float32.

torchdiff's `Objective.sample` draws from a torch generator; the test replays the generator in its
documented order to get the raw draws and hands them, NCHW -> NHWC, to flaxdiff's `noised`. Both
backends then score the same model prediction. The model input and target are compared to
`INPUT_REL` relative to their largest magnitude; the loss, its metrics and its gradient, which both
backends compute in float32 by contract, to `LOSS_REL` in both precisions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_helpers import max_error, nchw_to_nhwc, nhwc_to_nchw

from flaxdiff.diffusion import Objective as FlaxObjective
from shared import schedules
from shared.config import build

torch = pytest.importorskip("torch")

from torchdiff.diffusion import Objective as TorchObjective  # noqa: E402

# float64 proves the two compute the same function; float32 is what users see.
INPUT_REL = {"float64": 1e-12, "float32": 1e-6}
# The loss is float32 in both backends (`.float()` in torchdiff, LOSS_DTYPE in flaxdiff) whatever
# the batch dtype, so its agreement is bounded by float32 summation order in both precisions.
LOSS_REL = 1e-6
SCHEDULE = schedules.NoiseSchedule.create(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
)
SHAPE = (4, 3, 4, 4)  # (B, C, H, W) on the torch side: two instance and two class examples
CASES = {
    "epsilon": dict(prediction_type="epsilon"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),  # weighted by snr
    "epsilon_snr_gamma": dict(prediction_type="epsilon", snr_gamma=5.0),
    "v_prediction_snr_gamma": dict(prediction_type="v_prediction", snr_gamma=5.0),
    "sample_snr_gamma": dict(prediction_type="sample", snr_gamma=5.0),
    "noise_offset": dict(prediction_type="epsilon", noise_offset=0.1),
    "input_perturbation": dict(prediction_type="v_prediction", input_perturbation=0.1),
    "prior_preservation": dict(prediction_type="epsilon", snr_gamma=5.0, prior_loss_weight=0.5),
    "dream": dict(prediction_type="epsilon", noise_offset=0.1, input_perturbation=0.1),
}
DREAM_WEIGHT = np.random.default_rng(1).standard_normal((3, 3)) / 2  # (C_out, C_in)


def check(actual, reference, *, rel: float, what: str) -> float:
    """Asserts max |actual - reference| <= rel * max |reference|; returns the relative error."""
    error, _ = max_error(actual, reference)
    scale = float(np.abs(np.asarray(reference, np.float64)).max())
    assert scale > 0, f"{what}: the reference is all zeros, a relative check means nothing"
    assert error <= rel * scale, f"{what}: max abs error {error:.3e} > {rel:g} x {scale:.3g}"
    print(f"parity {what}: relative error {error / scale:.3e}")
    return error / scale


def torch_linear_model(x, t):
    """A fixed channel mix plus a timestep shift, (B, C, H, W): the DREAM stand-in UNet."""
    weight = torch.from_numpy(DREAM_WEIGHT).to(x.dtype)
    return torch.einsum("bchw,dc->bdhw", x, weight) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000


def flax_linear_model(x, t):
    """`torch_linear_model` in NHWC."""
    weight = jnp.asarray(DREAM_WEIGHT, x.dtype)
    return jnp.einsum("bhwc,dc->bhwd", x, weight) + t.astype(x.dtype)[:, None, None, None] / 1000


def replay_draws(obj: TorchObjective, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """The raw draws of `Objective.sample` from `manual_seed(seed)`, in its documented order."""
    g = torch.Generator().manual_seed(seed)
    draws = {"noise": torch.randn(SHAPE, generator=g, dtype=dtype)}
    if obj.noise_offset:
        draws["offset"] = torch.randn(*SHAPE[:2], 1, 1, generator=g, dtype=dtype)
    if obj.input_perturbation:
        draws["perturbation"] = torch.randn(SHAPE, generator=g, dtype=dtype)
    draws["timesteps"] = torch.randint(0, obj.num_train_timesteps, (SHAPE[0],), generator=g)
    return draws


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_objective_parity(case, dtype, request):
    if dtype == "float64":
        request.getfixturevalue("x64")  # before the flax objective: its schedule is float64 then
    torch_dtype, rel = getattr(torch, dtype), INPUT_REL[dtype]
    options = CASES[case]
    torch_obj = TorchObjective(SCHEDULE.alphas_cumprod, **options)
    flax_obj = FlaxObjective(SCHEDULE.alphas_cumprod, **options)
    assert flax_obj.alphas_cumprod.dtype == np.dtype(dtype)
    rng = np.random.default_rng(0)
    clean = torch.from_numpy(rng.standard_normal(SHAPE)).to(torch_dtype)

    seed = 3
    torch_noised = torch_obj.sample(clean, torch.Generator().manual_seed(seed))
    draws = replay_draws(torch_obj, torch_dtype, seed)
    assert torch.equal(torch_noised.timesteps, draws["timesteps"])
    flax_noised = flax_obj.noised(
        jnp.asarray(nchw_to_nhwc(clean.numpy())),
        jnp.asarray(nchw_to_nhwc(draws["noise"].numpy())),
        jnp.asarray(draws["timesteps"].numpy(), jnp.int32),
        offset=jnp.asarray(nchw_to_nhwc(draws["offset"].numpy())) if "offset" in draws else None,
        perturbation=(
            jnp.asarray(nchw_to_nhwc(draws["perturbation"].numpy()))
            if "perturbation" in draws
            else None
        ),
    )
    if case == "dream":
        torch_noised = torch_obj.dream(torch_noised, torch_linear_model, detail_preservation=0.8)
        flax_noised = flax_obj.dream(flax_noised, flax_linear_model, detail_preservation=0.8)
    for field in ("noise", "noisy", "target"):
        flax_value = getattr(flax_noised, field)
        assert flax_value.dtype == np.dtype(dtype)
        check(
            nhwc_to_nchw(flax_value),
            getattr(torch_noised, field).numpy(),
            rel=rel,
            what=f"{case} {dtype} {field}",
        )

    # Both backends score one prediction: the torch target plus an error of a few percent.
    error = torch.from_numpy(rng.standard_normal(SHAPE)).to(torch_dtype)
    torch_pred = (torch_noised.target + 0.3 * error).requires_grad_(True)
    torch_loss, torch_metrics = torch_obj.loss(torch_pred, torch_noised)
    torch_loss.backward()
    flax_pred = jnp.asarray(nchw_to_nhwc(torch_pred.detach().numpy()))
    (flax_loss, flax_metrics), flax_grad = jax.value_and_grad(flax_obj.loss, has_aux=True)(
        flax_pred, flax_noised
    )
    assert flax_loss.dtype == jnp.float32 and torch_loss.dtype == torch.float32
    assert set(flax_metrics) == set(torch_metrics)
    assert bool(torch_metrics) == ("prior_loss_weight" in options)
    check(flax_loss, torch_loss.item(), rel=LOSS_REL, what=f"{case} {dtype} loss")
    for key, value in torch_metrics.items():
        check(flax_metrics[key], value.item(), rel=LOSS_REL, what=f"{case} {dtype} {key}")
    check(
        nhwc_to_nchw(flax_grad), torch_pred.grad.numpy(), rel=LOSS_REL, what=f"{case} {dtype} grad"
    )


def test_from_config_builds_the_same_objective(x64):
    values = {
        "pretrained_model_name_or_path": "tiny/sd",
        "instance_data_dir": "instance",
        "instance_prompt": "a photo of sks dog",
        "class_data_dir": "class",
        "class_prompt": "a photo of dog",
        "with_prior_preservation": True,
        "prior_loss_weight": 0.5,
        "offset_noise": True,
        "snr_gamma": 5.0,
    }
    scheduler_config = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    torch_obj = TorchObjective.from_config(build("dreambooth", "torch", values), scheduler_config)
    flax_obj = FlaxObjective.from_config(build("dreambooth", "flax", values), scheduler_config)
    names = ("prediction_type", "snr_gamma", "noise_offset", "input_perturbation")
    for name in (*names, "prior_loss_weight"):
        assert getattr(flax_obj, name) == getattr(torch_obj, name), name
    assert flax_obj.prediction_type == "v_prediction" and flax_obj.noise_offset == 0.1
    np.testing.assert_array_equal(
        np.asarray(flax_obj.alphas_cumprod), torch_obj.alphas_cumprod.numpy()
    )
