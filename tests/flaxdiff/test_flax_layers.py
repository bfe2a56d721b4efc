"""flaxdiff.models.layers: attention paths, precision rules, init, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxdiff.models import attention, layers, resnet
from flaxdiff.models.layers import Init, ModelOptions


def _qkv(lq=50, lk=77, heads=2, dim=16, seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k1, (2, lq, heads, dim), dtype),
        jax.random.normal(k2, (2, lk, heads, dim), dtype),
        jax.random.normal(k3, (2, lk, heads, dim), dtype),
    )


def _naive(q, k, v, mask=None):
    """Softmax attention written out in float64 numpy: the reference of all three paths."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("implementation", ["einsum", "dot_product"])
def test_attention_paths_match_the_definition(implementation):
    q, k, v = _qkv()
    out = attention.attention(q, k, v, implementation=implementation)
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v), rtol=0, atol=2e-6)


def test_attention_paths_agree_with_a_causal_mask():
    q, k, v = _qkv(lq=12, lk=12)
    mask = jnp.tril(jnp.ones((12, 12), bool))[None, None]
    expected = _naive(q, k, v, np.asarray(mask))
    for implementation in ("einsum", "dot_product"):
        out = attention.attention(q, k, v, implementation=implementation, mask=mask)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    ("lq", "lk", "dim"), [(50, 77, 8), (128, 128, 8), (130, 9, 8), (9, 7, 160)]
)
def test_flash_attention_kernel_matches_in_tpu_interpret_mode(lq, lk, dim):
    """The Pallas TPU kernel, run by Pallas' TPU interpreter on CPU; lengths that are not
    multiples of its 128 block are padded and masked by segment ids, head dims over 128 (SD 1.5's
    160) padded with zero features."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = _qkv(lq=lq, lk=lk, heads=1, dim=dim)
    with pltpu.force_tpu_interpret_mode():
        out = attention.attention(q, k, v, implementation="flash")
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v), rtol=0, atol=2e-6)


def test_flash_attention_under_a_mesh_runs_per_device_by_shard_map():
    """A jit over a mesh cannot partition a Pallas kernel: the strategies trace the step with the
    mesh set, and the kernel then runs under shard_map on each device's batch rows."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import Mesh

    q, k, v = _qkv(lq=50, lk=77, heads=2, dim=8)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))

    @jax.jit
    def run(q, k, v):
        with attention.target_platform("tpu", mesh=mesh, batch_axes=("data", "fsdp")):
            return attention.attention(q, k, v, implementation="flash")

    with pltpu.force_tpu_interpret_mode():
        out = run(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v), rtol=0, atol=2e-6)


def test_flash_attention_outside_tpu_names_the_alternative():
    q, k, v = _qkv(lq=4, lk=4)
    with pytest.raises(ValueError, match=r"needs a TPU.*--attention dot_product"):
        attention.attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="takes no mask"):
        attention.attention(q, k, v, implementation="flash", mask=jnp.ones((4, 4), bool))


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="einsum"):
        ModelOptions(attention="xformers")


def test_bfloat16_attention_keeps_float32_logits():
    """Large logits lose the softmax in bfloat16; every path computes them in float32."""
    q, k, v = _qkv(lq=8, lk=8, dim=64)
    q = q * 4.0
    reference = _naive(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    for implementation in ("einsum", "dot_product"):
        out = attention.attention(
            q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
            implementation=implementation,
        )  # fmt: skip
        assert out.dtype == jnp.bfloat16
        # bf16 rounding of probabilities and output only: ~3 significant digits.
        np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=0, atol=3e-2)


def test_group_norm_in_bfloat16_computes_statistics_in_float32():
    """A bf16 map with a large mean: bf16 statistics would wipe out the signal."""
    options = ModelOptions(dtype=jnp.bfloat16)
    norm = layers.GroupNorm(4, 16, options=options)
    x = 300.0 + jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    x16 = x.astype(jnp.bfloat16)
    out = norm(x16)
    assert out.dtype == jnp.bfloat16
    exact = np.asarray(x16, np.float64).reshape(2, 8, 8, 4, 4)
    exact = (exact - exact.mean((1, 2, 4), keepdims=True)) / np.sqrt(
        exact.var((1, 2, 4), keepdims=True) + 1e-5
    )
    np.testing.assert_allclose(np.asarray(out, np.float32), exact.reshape(x.shape), atol=3e-2)
    assert norm.scale[...].dtype == jnp.float32  # parameters stay fp32 masters


def test_layers_cast_fp32_params_to_the_compute_dtype():
    options = ModelOptions(dtype=jnp.bfloat16)
    dense = layers.Linear(4, 3, options=options, rngs=nnx.Rngs(0))
    conv = layers.Conv2d(4, 3, 3, padding=1, options=options, rngs=nnx.Rngs(0))
    assert dense.kernel[...].dtype == jnp.float32
    assert dense(jnp.ones((2, 4))).dtype == jnp.bfloat16
    assert conv(jnp.ones((1, 5, 5, 4))).dtype == jnp.bfloat16


def test_upsample_nearest_to_an_explicit_size_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.arange(2 * 5 * 3 * 2, dtype=np.float32).reshape(2, 5, 3, 2)  # NHWC
    for size in ((10, 6), (9, 7), (5, 3)):
        expected = (
            torch.nn.functional.interpolate(
                torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode="nearest"
            )
            .numpy()
            .transpose(0, 2, 3, 1)
        )
        np.testing.assert_array_equal(
            np.asarray(resnet.upsample_nearest(jnp.asarray(x), size)), expected
        )
    doubled = np.asarray(resnet.upsample_nearest(jnp.asarray(x)))
    np.testing.assert_array_equal(doubled, x.repeat(2, 1).repeat(2, 2))


def test_fill_random_follows_each_init_and_is_seeded():
    def make():
        return resnet.ResnetBlock2D(8, 16, temb_channels=4, groups=4,
                                    options=ModelOptions(), rngs=nnx.Rngs(0))  # fmt: skip

    a = layers.fill_random(nnx.eval_shape(make), seed=3)
    b = layers.fill_random(nnx.eval_shape(make), seed=3)
    c = layers.fill_random(nnx.eval_shape(make), seed=4)
    bound = 1 / np.sqrt(8 * 9)  # conv1: fan_in = 8 channels x 3 x 3
    kernel = np.asarray(a.conv1.kernel[...])
    assert kernel.dtype == np.float32 and np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound and abs(kernel.mean()) < 0.1 * bound
    np.testing.assert_array_equal(np.asarray(a.norm1.scale[...]), np.ones(8))
    np.testing.assert_array_equal(np.asarray(a.norm1.bias[...]), np.zeros(8))
    np.testing.assert_array_equal(kernel, np.asarray(b.conv1.kernel[...]))
    assert not np.array_equal(kernel, np.asarray(c.conv1.kernel[...]))
    # Streams are keyed by path: conv1 and conv2 differ though both are drawn by one rule.
    assert not np.array_equal(
        np.asarray(a.conv2.kernel[...])[:, :, :8], np.asarray(a.conv1.kernel[...])[:, :, :8, :]
    )


def test_init_draws_match_between_jax_and_numpy_in_distribution():
    init = Init("normal", 0.02)
    jax_draw = np.asarray(init.jax(jax.random.key(0), (20000,), jnp.float32))
    np_draw = init.numpy(np.random.default_rng(0), (20000,), np.float32)
    for draw in (jax_draw, np_draw):
        assert abs(draw.std() - 0.02) < 0.001 and abs(draw.mean()) < 0.001


def test_set_options_reaches_every_module():
    block = resnet.ResnetBlock2D(8, 8, temb_channels=None, groups=4, options=ModelOptions(),
                                 rngs=nnx.Rngs(0))  # fmt: skip
    layers.set_options(block, remat=True, attention="einsum")
    for _, module in nnx.iter_modules(block):
        if hasattr(module, "options"):
            assert module.options.remat and module.options.attention == "einsum"


def test_options_follow_the_training_flags(tmp_path):
    from shared import cli

    def options(*flags):
        argv = ["--config", "configs/models/tiny-ddpm.yaml", "--train_data_dir", str(tmp_path)]
        config = cli.parse_args([*argv, *flags], task="unconditional", backend="flax")
        return ModelOptions.from_config(config)

    default = options()
    assert (default.dtype, default.attention, default.remat) == (jnp.float32, "dot_product", False)
    chosen = options(
        "--mixed_precision", "bf16", "--attention", "einsum", "--gradient_checkpointing"
    )
    assert (chosen.dtype, chosen.attention, chosen.remat) == (jnp.bfloat16, "einsum", True)
    assert chosen.param_dtype == jnp.float32
    with pytest.raises(ValueError, match="mixed_precision=bf16"):  # the config refuses fp16
        options("--mixed_precision", "fp16")
