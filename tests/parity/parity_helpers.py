"""Comparison helpers of the Flax-vs-PyTorch parity tests (imported by name: a module called
``conftest`` would be whichever conftest.py was imported first).

float64 proves that the two implementations compute the same function (agreement to rounding,
`F64_REL`); float32 is what users see (`F32_REL`). Never widen either to make a test pass.
"""

import jax
import numpy as np

F64_REL = 1e-9
F32_REL = 1e-4


def max_error(actual, reference) -> tuple[float, float]:
    """(max |actual - reference|, the bound scale max(1, max |reference|))."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, f"shape {actual.shape} != reference {reference.shape}"
    return float(np.abs(actual - reference).max()), max(1.0, float(np.abs(reference).max()))


def assert_parity(actual, reference, *, rel: float, what: str) -> float:
    """Asserts max |actual - reference| <= rel * max(1, max |reference|); returns the error."""
    error, scale = max_error(actual, reference)
    assert error <= rel * scale, f"{what}: max abs error {error:.3e} > {rel:g} x {scale:.3g}"
    print(f"parity {what}: max abs error {error:.3e} (scale {scale:.3g})")
    return error


def nchw_to_nhwc(array):
    return np.asarray(array).transpose(0, 2, 3, 1)


def nhwc_to_nchw(array):
    return np.asarray(array).transpose(0, 3, 1, 2)


def float64_time_proj(torch_unet) -> None:
    """Makes a diffusers UNet compute its sinusoidal timestep embedding in float64.

    diffusers' ``get_timestep_embedding`` runs in float32 even inside a float64 model, and its
    float32 exp/sin differ from XLA's by an ulp: up to 6e-5 at t~1000 (an ulp of the argument).
    That noise would hide any real difference in a float64 test, so both sides compute it in
    float64 there (flaxdiff does so for float64 models); the float32 tests keep diffusers as is.
    """
    import torch
    from diffusers.models.embeddings import Timesteps

    proj = torch_unet.time_proj
    if not isinstance(proj, Timesteps):
        return  # fourier / learned embeddings run in the model dtype already

    def forward(timesteps):
        half = proj.num_channels // 2
        exponent = (
            -np.log(10000.0)
            * torch.arange(half, dtype=torch.float64)
            / (half - proj.downscale_freq_shift)
        )
        args = timesteps.to(torch.float64)[:, None] * torch.exp(exponent)[None, :] * proj.scale
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        if proj.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if proj.num_channels % 2:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb

    proj.forward = forward


def flax_grads_as_torch(model, loss_fn, *args):
    """d loss_fn(model, *args) / d params of a Flax model, keyed and laid out as PyTorch's.

    The gradients go through the same name/transpose mapping as the weights, so they compare
    one to one with ``{k: p.grad for k, p in torch_model.named_parameters()}``.
    """
    from flax import nnx

    from flaxdiff.models.layers import Buffer
    from flaxdiff.models.state_dict import torch_state_dict

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(p):
        return loss_fn(nnx.merge(graphdef, p, rest), *args)

    grads = jax.jit(jax.grad(loss_of))(params)
    as_torch = torch_state_dict(nnx.merge(graphdef, grads, rest))
    frozen = set(torch_state_dict(model, only=Buffer))  # saved but never trained
    return {k: v for k, v in as_torch.items() if k not in frozen}
