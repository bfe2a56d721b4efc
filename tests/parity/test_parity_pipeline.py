"""An image sampled by flaxdiff equals the image diffusers' PyTorch pipeline samples from flaxdiff's
export, from the same initial noise.

flaxdiff builds the tiny random models of `configs/models/tiny-ddpm.yaml` (UNet2DModel) and
`configs/models/tiny.yaml` (UNet, VAE, CLIP) at 32px, samples as its validation does, and writes
the folder `flaxdiff.components.export` writes at the end of a run; diffusers loads that folder
with `DiffusionPipeline.from_pretrained` and samples with its own loop.

- Unconditional, DDIM (eta = 0), 10 steps: `DDPMPipeline` draws its noise from a seeded torch
  generator; the same generator, replayed, gives flaxdiff the same array.
- Unconditional, DDPM (the exported scheduler, the one validation samples with), 10 steps:
  `DDPMScheduler.step` draws its step noise from the same generator, after the initial noise; the
  replayed draws go to flaxdiff as `step_noise`, so both add identical noise.
- Text-conditioned, DPM-Solver++ (2nd order, the validation default) with classifier-free guidance
  7.5, 10 steps: `components.TextSampler` draws the latents from JAX keys; the same latents go to
  `StableDiffusionPipeline(latents=...)`.

Tolerance, float32 (max abs error on the [0, 1] image): `IMAGE_ATOL` = 1e-3, a quarter of one
8-bit level (1/255), so a saved PNG differs by at most one level. The models agree to ~1e-6
relative per call (tests/parity/test_parity_unet*.py); the sampler then carries that difference.
An untrained epsilon model does not denoise, so each DDIM/DDPM step of the linear schedule
magnifies a difference in x_t by sqrt(alphas_cumprod[t_prev] / alphas_cumprod[t]), about 2.3 at
t = 900 and 59 over the whole chain: the unconditional images differ by ~1e-4, every step's
difference staying ~1e-6 relative to what the models compute. Float64 (unconditional DDIM) proves
the same function, to `F64_REL` relative to the image.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity_helpers import F64_REL, assert_parity, float64_time_proj

from flaxdiff import generate, sampling
from flaxdiff.components import GUIDANCE_SCALE, Prompts, TextSampler, export, load_components
from flaxdiff.models import convert
from flaxdiff.models.layers import ModelOptions
from shared import cli, demo
from shared.config import build

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers' schedulers call np.array on tensors, which numpy 2 warns about; not ours to fix.
pytestmark = [
    pytest.mark.slow,  # end to end: four sampling loops jit-compiled, four pipelines loaded
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
IMAGE_ATOL = 1e-3  # float32, on the [0, 1] image (see the module docstring)
STEPS, BATCH, SIZE, SEED = 10, 2, 32, 0
PROMPT = "a photo of sks dog"


def _config(task: str, model_yaml: str, **values):
    flags = cli.load_yaml(MODELS / model_yaml)
    return build(task, "flax", {**flags, "train_data_dir": "unused", "resolution": SIZE, **values})


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    """(components, export folder) of the tiny UNet2DModel with its DDPM schedule."""
    components = load_components(_config("unconditional", "tiny-ddpm.yaml"), ModelOptions())
    folder = export(components, components.unet, tmp_path_factory.mktemp("ddpm") / "export")
    return components, folder


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """(cfg, components, export folder) of the tiny Stable Diffusion model."""
    tokenizer = demo.write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    cfg = _config("text2image", "tiny.yaml", tokenizer_name=str(tokenizer))
    components = load_components(cfg, ModelOptions())
    folder = export(components, components.unet, tmp_path_factory.mktemp("sd") / "export")
    return cfg, components, folder


def check_image(actual, reference, *, what: str) -> float:
    """max |actual - reference| <= IMAGE_ATOL on (B, H, W, 3) [0, 1] images; returns it.

    Most pixels must lie strictly inside (0, 1): a clipped pixel agrees whatever came before.
    """
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape == (BATCH, SIZE, SIZE, 3)
    assert ((reference > 0) & (reference < 1)).mean() > 0.5 and reference.std() > 0.05
    error = float(np.abs(actual - reference).max())
    print(f"parity pipeline {what}: max abs error {error:.3e} on the [0, 1] image")
    assert error <= IMAGE_ATOL, f"{what}: max abs error {error:.3e} > {IMAGE_ATOL:g}"
    return error


def replayed_draws(shape, timesteps, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The draws `DDPMPipeline` takes from `torch.Generator().manual_seed(SEED)`: the initial
    noise, then one per step with t > 0 (DDPMScheduler's step noise), NHWC; zeros where t = 0."""
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    steps = [
        torch.randn(shape, generator=generator, dtype=dtype)
        if t > 0
        else torch.zeros(shape, dtype=dtype)
        for t in timesteps
    ]
    nhwc = (0, 2, 3, 1)
    return noise.numpy().transpose(nhwc), np.stack([s.numpy().transpose(nhwc) for s in steps])


def flax_unconditional(unet, scheduler_config, scheduler_name, noise, step_noise=None):
    """Samples as flaxdiff's validation and `twindiff.sample` do (`flaxdiff.generate.denoise`),
    from given noise: (B, H, W, C) in [0, 1]."""
    sampler = sampling.sampler_from_config(scheduler_config, scheduler_name)
    return generate.denoise(
        unet,
        jnp.asarray(noise),
        jax.random.key(0),
        sampler,
        STEPS,
        step_noise=None if step_noise is None else jnp.asarray(step_noise),
    )


def diffusers_unconditional(folder, scheduler_name, dtype=torch.float32):
    pipe = diffusers.DDPMPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config)
    if dtype == torch.float64:
        float64_time_proj(pipe.unet)
    generator = torch.Generator().manual_seed(SEED)
    return pipe(
        batch_size=BATCH, generator=generator, num_inference_steps=STEPS, output_type="np"
    ).images


def _timesteps(scheduler_config, scheduler_name) -> np.ndarray:
    return sampling.sampler_from_config(scheduler_config, scheduler_name).timesteps(STEPS)


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "DDPMScheduler"])
def test_unconditional_image_matches_ddpm_pipeline(unconditional, scheduler_name):
    components, folder = unconditional
    timesteps = _timesteps(components.scheduler_config, scheduler_name)
    noise, step_noise = replayed_draws((BATCH, 3, SIZE, SIZE), timesteps, torch.float32)
    expected = diffusers_unconditional(folder, scheduler_name)
    actual = flax_unconditional(
        components.unet, components.scheduler_config, scheduler_name, noise, step_noise
    )
    check_image(actual, expected, what=f"unconditional {scheduler_name} f32")


class _Float32IsFloat64:
    """Stands in for `torch` inside one diffusers scheduler module: `torch.float32` is float64
    (DDIMScheduler builds its betas and alphas_cumprod in float32 whatever the model dtype)."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def test_unconditional_ddim_image_matches_in_float64(x64, monkeypatch, unconditional):
    components, folder = unconditional
    monkeypatch.setattr(inspect.getmodule(diffusers.DDIMScheduler), "torch", _Float32IsFloat64())
    timesteps = _timesteps(components.scheduler_config, "DDIMScheduler")
    noise, _ = replayed_draws((BATCH, 3, SIZE, SIZE), timesteps, torch.float64)
    expected = diffusers_unconditional(folder, "DDIMScheduler", torch.float64)
    options = ModelOptions(dtype=jnp.float64, param_dtype=jnp.float64, attention="einsum")
    unet = convert.from_diffusers(folder / "unet", options=options)
    actual = flax_unconditional(unet, components.scheduler_config, "DDIMScheduler", noise)
    assert actual.dtype == expected.dtype == np.float64
    assert_parity(actual, expected, rel=F64_REL, what="pipeline unconditional DDIMScheduler f64")


def test_guided_text_image_matches_stable_diffusion_pipeline(text_model):
    cfg, components, folder = text_model
    scheduler_name = cfg.validation.validation_scheduler
    assert scheduler_name == "DPMSolverMultistepScheduler"
    sampler = TextSampler(components, cfg, scheduler_name=scheduler_name, steps=STEPS)
    states = sampler.encode(
        nnx.state(components.text_encoder), Prompts(cfg, components.tokenizer_dir)(["", PROMPT])
    )  # (2, L, D): the empty prompt, then PROMPT
    keys = jax.random.split(jax.random.key(SEED), BATCH)
    actual = sampler.draw(nnx.state(components.unet), states, keys)
    # The latents TextSampler.draw draws from `keys`, (B, h, w, 4) with h = SIZE / 2 (2-level VAE).
    latent_shape = (SIZE // 2, SIZE // 2, components.unet.config.in_channels)
    latents = np.asarray(jax.vmap(lambda k: jax.random.normal(k, latent_shape))(keys))

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    expected = pipe(
        PROMPT,  # negative_prompt None: the empty prompt, as TextSampler's unconditional half
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE_SCALE,
        num_images_per_prompt=BATCH,
        latents=torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))),
        output_type="np",
    ).images
    assert GUIDANCE_SCALE == 7.5
    check_image(actual, expected, what=f"text guided {scheduler_name} f32")
