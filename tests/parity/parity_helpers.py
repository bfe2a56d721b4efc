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
    """(max |actual - reference|, max |reference|): the error and the scale a relative bound uses."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, f"shape {actual.shape} != reference {reference.shape}"
    return float(np.abs(actual - reference).max()), float(np.abs(reference).max())


def relative_error(actual, reference, *, what: str) -> float:
    """max |actual - reference| / max |reference|, the reference being the tensor checked.

    An all-zero reference is refused: no relative bound holds or fails there, and a tensor that
    is zero in exact arithmetic is rounding noise on both sides (see `assert_grads_parity`).
    """
    error, scale = max_error(actual, reference)
    assert scale > 0, f"{what}: the reference is all zeros, a relative bound means nothing there"
    return error / scale


def assert_parity(actual, reference, *, rel: float, what: str) -> float:
    """Asserts max |actual - reference| <= rel * max |reference|; returns the relative error."""
    error = relative_error(actual, reference, what=what)
    assert error <= rel, f"{what}: relative error {error:.3e} > {rel:g}"
    print(f"parity {what}: relative error {error:.3e}")
    return error


# Gradients that are zero in exact arithmetic, each with the gradient that bounds its rounding.
# Attention adds q . b_k to every logit of a query alike and softmax ignores a shift, so
# d loss / d b_k = sum over keys of d loss / d k = 0; both sides compute only the rounding noise of
# that sum. The key weight's gradient is the same per-key d loss / d k summed, each weighted by a
# normalized input of size ~1: the scale of the sum whose rounding the noise is.
ZERO_GRADIENT_BOUNDS = {"k_proj.bias": "k_proj.weight", "to_k.bias": "to_k.weight"}


def gradient_scale(key: str, reference: dict) -> tuple[float, str]:
    """(scale, name of the tensor it comes from) that bounds the error of gradient `key`.

    The gradient's own max |.|, except for `ZERO_GRADIENT_BOUNDS`: there the companion weight's.
    """
    for suffix, companion in ZERO_GRADIENT_BOUNDS.items():
        if key.endswith(suffix):
            bound_key = key[: -len(suffix)] + companion
            return float(np.abs(np.asarray(reference[bound_key], np.float64)).max()), bound_key
    return float(np.abs(np.asarray(reference[key], np.float64)).max()), key


def assert_grads_parity(actual: dict, reference: dict, *, rel: float, what: str) -> float:
    """Every gradient within rel x its own max |reference|, each tensor on its own; returns and
    prints the worst relative error.

    A gradient that is zero in exact arithmetic (`ZERO_GRADIENT_BOUNDS`) has no scale of its own:
    its error and both sides' values are bounded by rel x its companion's scale instead, which
    also checks that it is the rounding noise it should be.
    """
    assert sorted(actual) == sorted(reference), "the two sides have different parameters"
    worst, worst_zero = (0.0, ""), (0.0, "")
    for key, ref in reference.items():
        error, _ = max_error(actual[key], ref)
        scale, bound_key = gradient_scale(key, reference)
        assert scale > 0, f"{what} d/d{bound_key}: the reference is all zeros"
        assert error <= rel * scale, (
            f"{what} d/d{key}: max abs error {error:.3e} > {rel:g} x {scale:.3g} ({bound_key})"
        )
        if bound_key != key:
            noise = max(float(np.abs(np.asarray(a, np.float64)).max()) for a in (actual[key], ref))
            assert noise <= rel * scale, f"{what} d/d{key} = {noise:.3e} is not rounding noise"
            worst_zero = max(worst_zero, (noise / scale, key))
        worst = max(worst, (error / scale, key))
    print(f"parity {what}: worst of {len(reference)} param grads: relative error "
          f"{worst[0]:.3e} ({worst[1]})")  # fmt: skip
    if worst_zero[1]:
        print(f"parity {what}: zero-in-exact-arithmetic grads: max |value| {worst_zero[0]:.3e} "
              f"x the companion's scale ({worst_zero[1]})")  # fmt: skip
    return worst[0]


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
