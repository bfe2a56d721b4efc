"""flaxdiff's UNet2DConditionModel against diffusers', same weights and inputs, float64 and float32."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals as residuals_of  # no public counter
from parity_helpers import (
    F32_REL,
    F64_REL,
    assert_grads_parity,
    assert_parity,
    flax_grads_as_torch,
    float64_time_proj,
    nchw_to_nhwc,
)

from flaxdiff.models.convert import init_model
from flaxdiff.models.embeddings import timestep_embedding
from flaxdiff.models.layers import ModelOptions, set_options
from flaxdiff.models.state_dict import load_torch_state_dict, torch_state_dict
from flaxdiff.models.unet_2d_condition import UNet2DConditionConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CROSS_DIM = 24
CONFIGS = {
    # SD 1.x: 1x1 conv projections, one head count for all blocks.
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    # SD 2.x: linear projections, a head count per block, upcast attention; plus per-block
    # transformer depth and only-cross-attention.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2, 1),
        only_cross_attention=(True, False, False),
    ),
    # The less common switches: fourier time, timestep class embedding concatenated,
    # scale-shift resnets, an activation on the time embedding, no-attention mid block.
    "variants": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        norm_num_groups=4,
        time_embedding_type="fourier",
        class_embed_type="timestep",
        class_embeddings_concat=True,
        resnet_time_scale_shift="scale_shift",
        time_embedding_act_fn="silu",
        mid_block_type="UNetMidBlock2D",
        center_input_sample=True,
    ),
}


def _pair(name: str, *, float64: bool, attention: str = "einsum"):
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    options = ModelOptions(attention=attention)
    if float64:
        reference = reference.double()
        float64_time_proj(reference)
        options = ModelOptions(dtype="float64", param_dtype="float64", attention=attention)
    config = UNet2DConditionConfig.from_dict(dict(reference.config))
    model = init_model(config, options=options, abstract=True)  # weights come from torch
    load_torch_state_dict(model, {k: v.numpy() for k, v in reference.state_dict().items()})
    return reference, model


def _inputs(name: str, size: int, dtype):
    gen = torch.Generator().manual_seed(size)
    sample = torch.randn(2, 4, size, size, generator=gen, dtype=dtype)
    timesteps = torch.tensor([7, 981])
    context = torch.randn(2, 5, CROSS_DIM, generator=gen, dtype=dtype)
    labels = torch.tensor([3, 500]) if name == "variants" else None
    return sample, timesteps, context, labels


def _run_flax(model, sample, timesteps, context, labels):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, t, c, y):
        return nnx.merge(graphdef, state)(x, t, c, class_labels=y)

    y = None if labels is None else jnp.asarray(labels.numpy())
    return forward(
        state,
        jnp.asarray(nchw_to_nhwc(sample.numpy())),
        jnp.asarray(timesteps.numpy()),
        jnp.asarray(context.numpy()),
        y,
    )


# 10x10 latents do not halve evenly through 3 levels: the up path then upsamples to the
# skip's size, as diffusers does (forward_upsample_size).
@pytest.mark.parametrize(
    ("name", "size", "attention"),
    [
        ("sd1", 16, "einsum"),
        ("sd2", 10, "einsum"),
        ("variants", 8, "einsum"),
    ],
)
def test_forward_float64(x64, name, size, attention):
    reference, model = _pair(name, float64=True, attention=attention)
    sample, timesteps, context, labels = _inputs(name, size, torch.float64)
    with torch.no_grad():
        expected = reference(sample, timesteps, context, class_labels=labels).sample
    actual = _run_flax(model, sample, timesteps, context, labels)
    assert actual.dtype == jnp.float64
    assert_parity(
        actual, nchw_to_nhwc(expected.numpy()), rel=F64_REL, what=f"{name} f64 {attention}"
    )


# jax.nn.dot_product_attention keeps its softmax in float32 even for float64 inputs, so the
# fused path is checked here, in float32, as users run it.
@pytest.mark.parametrize(
    ("name", "attention"),
    [
        ("sd1", "dot_product"),
        ("sd1", "einsum"),
        ("sd2", "dot_product"),
        ("variants", "dot_product"),
    ],
)
def test_forward_float32(name, attention):
    reference, model = _pair(name, float64=False, attention=attention)
    sample, timesteps, context, labels = _inputs(name, 16, torch.float32)
    with torch.no_grad():
        expected = reference(sample, timesteps, context, class_labels=labels).sample
    actual = _run_flax(model, sample, timesteps, context, labels)
    assert actual.dtype == jnp.float32
    assert_parity(
        actual, nchw_to_nhwc(expected.numpy()), rel=F32_REL, what=f"{name} f32 {attention}"
    )


def _loss(model, x, t, c, weights):
    return jnp.sum(model(x, t, c) * weights)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_gradients_float64(x64, name):
    """d(sum(output * w)) w.r.t. the latents, the text embeddings and every parameter."""
    reference, model = _pair(name, float64=True)
    sample, timesteps, context, _ = _inputs(name, 8, torch.float64)
    weights = torch.randn(
        2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    sample.requires_grad_(True)
    context.requires_grad_(True)
    (reference(sample, timesteps, context).sample * weights).sum().backward()

    x, t, c = (jnp.asarray(nchw_to_nhwc(sample.detach().numpy())),
               jnp.asarray(timesteps.numpy()), jnp.asarray(context.detach().numpy()))  # fmt: skip
    w = jnp.asarray(nchw_to_nhwc(weights.numpy()))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x, c):  # one compiled backward pass for all three gradients
        return _loss(nnx.merge(graphdef, params, rest), x, t, c, w)

    grad_params, grad_x, grad_c = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, c)
    assert_parity(grad_x, nchw_to_nhwc(sample.grad.numpy()), rel=F64_REL, what=f"{name} d/dsample")
    assert_parity(grad_c, context.grad.numpy(), rel=F64_REL, what=f"{name} d/dcontext")
    grads = torch_state_dict(nnx.merge(graphdef, grad_params, rest))
    expected = {k: p.grad.numpy() for k, p in reference.named_parameters()}
    assert_grads_parity(grads, expected, rel=F64_REL, what=f"{name} f64 d/dparams")


def test_remat_gives_the_same_outputs_and_gradients(x64):
    """Rematerialization recomputes the same function: equal outputs, gradients equal to
    rounding (XLA may fuse the recomputed backward pass differently, which reorders sums)."""
    _, model = _pair("sd1", float64=True)
    sample, timesteps, context, _ = _inputs("sd1", 8, torch.float64)
    x = jnp.asarray(nchw_to_nhwc(sample.numpy()))
    t, c = jnp.asarray(timesteps.numpy()), jnp.asarray(context.numpy())
    w = jnp.ones_like(x)
    plain_out = _run_flax(model, sample, timesteps, context, None)
    plain = flax_grads_as_torch(model, _loss, x, t, c, w)
    set_options(model, remat=True)
    assert all(m.options.remat for _, m in nnx.iter_modules(model) if hasattr(m, "options"))
    remat_out = _run_flax(model, sample, timesteps, context, None)
    remat = flax_grads_as_torch(model, _loss, x, t, c, w)
    np.testing.assert_array_equal(np.asarray(remat_out), np.asarray(plain_out))
    assert_grads_parity(remat, plain, rel=F64_REL, what="remat d/dparams")


def test_remat_recomputes_in_the_backward_pass():
    """With remat the backward pass holds fewer saved residuals than without."""
    _, model = _pair("sd1", float64=False)
    x = jnp.zeros((1, 8, 8, 4))
    t, c = jnp.asarray([5]), jnp.zeros((1, 5, CROSS_DIM))

    def count(remat: bool) -> int:
        set_options(model, remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            return _loss(nnx.merge(graphdef, p, rest), x, t, c, 1.0)

        return len(residuals_of(loss, params))

    assert count(True) < count(False) / 2


def test_timestep_embedding_float32_matches_diffusers_to_an_ulp_of_the_argument():
    """diffusers' float32 sinusoid and ours differ only by float32 rounding of exp/sin/cos."""
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = torch.arange(0, 1000, 3)
    for dim, shift, flip in ((32, 0, True), (320, 1, False), (33, 0, True)):
        expected = get_timestep_embedding(
            timesteps, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
        ).numpy()
        actual = timestep_embedding(
            jnp.asarray(timesteps.numpy()), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
        )
        assert actual.dtype == jnp.float32
        # The argument t * freq reaches 999: one float32 ulp of it is 6.1e-5; sin/cos
        # amplify nothing (|derivative| <= 1). Allow two ulps of the largest argument.
        bound = 2 * np.spacing(np.float32(999.0))
        assert np.abs(np.asarray(actual) - expected).max() <= bound


def test_timestep_embedding_float64_is_exact(x64):
    t = np.array([0.0, 1.0, 500.0, 999.0])
    dim, half = 16, 8
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
    actual = timestep_embedding(
        jnp.asarray(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0, dtype=jnp.float64
    )
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=1e-12)


def test_bfloat16_compute_keeps_fp32_params_and_tracks_fp32():
    _, model = _pair("sd1", float64=False)
    sample, timesteps, context, _ = _inputs("sd1", 8, torch.float32)
    full = _run_flax(model, sample, timesteps, context, None)
    set_options(model, dtype=jnp.bfloat16)
    half = _run_flax(model, sample, timesteps, context, None)
    assert half.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    # bf16 keeps 8 bits of mantissa: the whole UNet stays within a few percent of fp32.
    error = float(jnp.abs(half.astype(jnp.float32) - full).max())
    assert error < 0.05 * float(jnp.abs(full).max())


def test_state_dict_round_trip_is_bit_exact_and_keys_match():
    reference, model = _pair("sd2", float64=False)
    exported = torch_state_dict(model)
    expected = reference.state_dict()
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert exported[key].dtype == np.float32
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_config_round_trip_through_diffusers():
    reference, model = _pair("sd2", float64=False)
    rebuilt = diffusers.UNet2DConditionModel.from_config(model.config.to_dict())
    for key, value in reference.config.items():
        if not key.startswith("_"):
            got = rebuilt.config[key]
            assert (list(got) if isinstance(got, tuple) else got) == (
                list(value) if isinstance(value, tuple) else value
            ), key


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"dual_cross_attention": True}, "dual_cross_attention"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")}, "down_block_types"),
        ({"attention_head_dim": (2, 4, 8)}, "attention_head_dim"),
        ({"dropout": 0.1}, "dropout"),
    ],
)
def test_unsupported_config_is_refused_by_name(change, key):
    base = {k: v for k, v in CONFIGS["sd1"].items()}
    with pytest.raises(ValueError, match=key):
        UNet2DConditionConfig.from_dict({**base, **change})
