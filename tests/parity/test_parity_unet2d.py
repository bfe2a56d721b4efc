"""flaxdiff's UNet2DModel against diffusers', same weights and inputs, float64 and float32.

Models are tiny (two levels, 16x16 images, batch 2) and each is built and jit-compiled once per
module (JAX compiles are the slow part on a CPU runner).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from parity_helpers import (
    F32_REL,
    F64_REL,
    assert_grads_parity,
    assert_parity,
    float64_time_proj,
    nchw_to_nhwc,
)

from flaxdiff.models.layers import Buffer, ModelOptions, set_options
from flaxdiff.models.state_dict import load_torch_state_dict, torch_state_dict
from flaxdiff.models.unet_2d import UNet2DConfig, UNet2DModel

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[2]
BATCH, SIZE, IN_CH, OUT_CH = 2, 16, 3, 3
TWO_LEVELS = dict(block_out_channels=(32, 64), in_channels=IN_CH, out_channels=OUT_CH)
CONFIGS = {
    # The tutorial's layout in small: self-attention at the lower level and in the mid block.
    "attention": dict(
        **TWO_LEVELS,
        layers_per_block=2,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    ),
    # Resnets only (mid block included); a learned time table fed a Python-int timestep,
    # class vectors added as they are, an explicit time-embedding width.
    "no_attention": dict(
        **TWO_LEVELS,
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        time_embedding_type="learned",
        num_train_timesteps=1000,
        time_embedding_dim=48,
        class_embed_type="identity",
    ),
    # Score-SDE style: fourier noise-level embedding (output divided by sigma), class labels
    # embedded as timesteps, [0, 1] inputs centred, diffusers' asymmetric downsample padding,
    # explicit mid-attention groups.
    "fourier": dict(
        **TWO_LEVELS,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        time_embedding_type="fourier",
        class_embed_type="timestep",
        center_input_sample=True,
        downsample_padding=0,
        attn_norm_num_groups=4,
        attention_head_dim=16,
    ),
    # Improved-DDPM style: scale-shift resnets (the mid attention then has no group norm),
    # class ids, one head over all channels, another activation, a mid-block output scale.
    "scale_shift": dict(
        **TWO_LEVELS,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=5,
        attention_head_dim=None,
        act_fn="mish",
        mid_block_scale_factor=2.0,
        freq_shift=1,
        flip_sin_to_cos=False,
    ),
}
GRADIENT_CONFIGS = ("attention", "fourier")


def _inputs(name: str) -> tuple[np.ndarray, np.ndarray | int, np.ndarray | None]:
    """(sample NCHW, timesteps, class labels) as numpy float64 / int64 (or a Python int)."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((BATCH, IN_CH, SIZE, SIZE))
    timesteps, labels = np.array([3, 999]), None
    if name == "no_attention":
        timesteps = 250  # diffusers: torch.tensor([250]), broadcast over the batch
        labels = rng.standard_normal((BATCH, CONFIGS[name]["time_embedding_dim"]))
    elif name == "fourier":
        timesteps = np.array([0.7, 12.5])  # noise levels (sigmas): the projection takes a log
        labels = np.array([1.5, 40.0])  # through the same projection: positive too
    elif name == "scale_shift":
        labels = np.array([4, 1])
    return sample, timesteps, labels


def _cast(value, dtype):
    """Floating arrays to `dtype`; integer arrays and Python ints as they are."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(dtype)
    return value


def _flax_args(name: str, dtype) -> tuple:
    sample, timesteps, labels = _inputs(name)
    return nchw_to_nhwc(sample).astype(dtype), _cast(timesteps, dtype), _cast(labels, dtype)


def _torch_args(name: str, dtype, *, requires_grad: bool = False) -> tuple:
    def tensor(value):
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value

    sample, timesteps, labels = _flax_args(name, dtype)
    x = torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 3, 1, 2)))
    return x.requires_grad_(requires_grad), tensor(timesteps), tensor(labels)


def _cotangent(dtype) -> np.ndarray:  # (B, H, W, C_out): weights every output differently
    return np.random.default_rng(1).standard_normal((BATCH, SIZE, SIZE, OUT_CH)).astype(dtype)


@dataclasses.dataclass
class Pair:
    reference: torch.nn.Module  # diffusers UNet2DModel, eval mode
    model: UNet2DModel  # the same weights
    dtype: type  # np.float64 or np.float32


def _jitted_forward(model: UNet2DModel, name: str, dtype) -> np.ndarray:
    """The model's output (NHWC) on the config's inputs; timesteps and labels are baked in."""
    graphdef, state = nnx.split(model)
    sample, timesteps, labels = _flax_args(name, dtype)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, timesteps, labels))
    return np.asarray(run(state, sample))


@functools.cache
def _pair(name: str, *, float64: bool, attention: str = "einsum") -> Pair:
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**CONFIGS[name]).eval()
    if float64:
        reference = reference.double()
        float64_time_proj(reference)
        options = ModelOptions(dtype="float64", param_dtype="float64", attention=attention)
    else:
        options = ModelOptions(attention=attention)
    config = UNet2DConfig.from_dict(dict(reference.config))
    # Built abstract, then filled: no random init to run (eager JAX ops compile one by one).
    model = nnx.eval_shape(lambda: UNet2DModel(config, options=options))
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    load_torch_state_dict(model, state, source=f"diffusers {name}")
    return Pair(reference, model, np.float64 if float64 else np.float32)


def _reference_output(pair: Pair, name: str) -> np.ndarray:
    with torch.no_grad():
        return nchw_to_nhwc(pair.reference(*_torch_args(name, pair.dtype)).sample.numpy())


@functools.cache
def _flax_run(name: str, *, float64: bool, remat: bool = False):
    """Output, d loss/d sample and {diffusers key: d loss/d weight}, loss = <out, cotangent>.

    One compile gives all three (the forward is part of the gradient program).
    """
    dtype = np.float64 if float64 else np.float32
    model = _pair(name, float64=float64).model
    if remat:
        model = set_options(nnx.clone(model), remat=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sample, timesteps, labels = _flax_args(name, dtype)
    cotangent = _cotangent(dtype)

    def loss(params, sample):
        out = nnx.merge(graphdef, params, rest)(sample, timesteps, labels)
        return jnp.sum(out * cotangent), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), (grad_params, grad_sample) = step(params, sample)
    as_torch = torch_state_dict(nnx.merge(graphdef, grad_params, rest))
    frozen = set(torch_state_dict(model, only=Buffer))  # saved, never trained (fourier weight)
    grads = {k: v for k, v in as_torch.items() if k not in frozen}
    return np.asarray(out), np.asarray(grad_sample), grads


# ---------------------------------------------------------------------------------------------
# float64: the same function to rounding


@pytest.mark.parametrize(
    "name, attention",
    # einsum only: jax.nn.dot_product_attention keeps a float32 softmax, so float64 models run
    # the einsum path; the fused path is checked in float32 below.
    [(name, "einsum") for name in CONFIGS],
)
def test_forward_float64(x64, name, attention):
    if attention == "einsum" and name in GRADIENT_CONFIGS:
        out = _flax_run(name, float64=True)[0]  # compiled with the gradients anyway
    else:
        out = _jitted_forward(
            _pair(name, float64=True, attention=attention).model, name, np.float64
        )
    assert out.dtype == np.float64
    expected = _reference_output(_pair(name, float64=True), name)
    assert_parity(out, expected, rel=F64_REL, what=f"{name}/{attention} f64")


@pytest.mark.parametrize("name", GRADIENT_CONFIGS)
def test_gradients_float64(x64, name):
    reference = _pair(name, float64=True).reference
    reference.zero_grad()
    x, t, y = _torch_args(name, np.float64, requires_grad=True)
    out = reference(x, t, class_labels=y).sample  # (B, C, H, W)
    (out * torch.from_numpy(_cotangent(np.float64).transpose(0, 3, 1, 2))).sum().backward()
    expected = {k: p.grad.numpy() for k, p in reference.named_parameters() if p.requires_grad}

    _, grad_sample, grads = _flax_run(name, float64=True)
    assert_parity(grad_sample, nchw_to_nhwc(x.grad.numpy()), rel=F64_REL, what=f"{name} d/dx")
    assert_grads_parity(grads, expected, rel=F64_REL, what=f"{name} f64 d/dparams")


def test_class_label_errors(x64):
    sample = _flax_args("attention", np.float64)[0]
    unlabelled, labelled = (
        _pair("attention", float64=True).model,
        _pair("scale_shift", float64=True).model,
    )
    with pytest.raises(ValueError, match="no class embedding"):
        jax.eval_shape(lambda: unlabelled(sample, 250, np.array([0, 1])))
    with pytest.raises(ValueError, match="pass class_labels"):
        jax.eval_shape(lambda: labelled(sample, 250))


# ---------------------------------------------------------------------------------------------
# float32: what users see (diffusers' float32 sinusoids, default attention)


def test_forward_float32():
    pair = _pair("attention", float64=False, attention="dot_product")
    out = _jitted_forward(pair.model, "attention", np.float32)
    assert out.dtype == np.float32
    assert_parity(out, _reference_output(pair, "attention"), rel=F32_REL, what="attention f32")


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing


def test_remat_forward_is_bit_identical_and_saves_fewer_residuals():
    plain = _pair("attention", float64=False).model
    remat = set_options(nnx.clone(plain), remat=True)
    assert all(m.options.remat for _, m in nnx.iter_modules(remat) if hasattr(m, "options"))
    assert not plain.down_blocks[1].options.remat  # the clone only
    np.testing.assert_array_equal(
        _jitted_forward(remat, "attention", np.float32),
        _jitted_forward(plain, "attention", np.float32),
    )
    sample, timesteps, _ = _flax_args("attention", np.float32)

    def saved(model) -> int:
        """Elements the backward pass keeps from the forward (traced only, never run)."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(sample, timesteps))  # noqa: E731
        backward = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)  # residuals as leaves
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(backward))

    assert saved(remat) < saved(plain) / 2


def test_remat_gradients_float64(x64):
    """Remat recomputes the same function: the same output, gradients equal to rounding.

    Not bit for bit: the recomputation in the backward pass is fused differently by XLA,
    which reorders a few reductions (float32 gradients then differ by an ulp or so).
    """
    out, grad_sample, grads = _flax_run("fourier", float64=True)
    remat_out, remat_sample, remat_grads = _flax_run("fourier", float64=True, remat=True)
    np.testing.assert_array_equal(remat_out, out)
    assert_parity(remat_sample, grad_sample, rel=F64_REL, what="remat d/dx")
    assert_grads_parity(remat_grads, grads, rel=F64_REL, what="remat d/dparams")


# ---------------------------------------------------------------------------------------------
# Weights and configs


@pytest.mark.parametrize("name", ["attention", "fourier", "no_attention"])
def test_state_dict_round_trip(name):
    pair = _pair(name, float64=False)
    expected = {k: v.numpy() for k, v in pair.reference.state_dict().items()}
    exported = torch_state_dict(pair.model)
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name):
    torch.manual_seed(0)
    original = diffusers.UNet2DModel(**CONFIGS[name])
    config = UNet2DConfig.from_dict(dict(original.config))
    as_dict = config.to_dict()
    assert as_dict["_class_name"] == "UNet2DModel"
    rebuilt = diffusers.UNet2DModel.from_config(as_dict)

    def as_list(value):  # diffusers keeps what it was given: tuples or lists
        return list(value) if isinstance(value, tuple | list) else value

    for field in dataclasses.fields(UNet2DConfig):
        value, expected = rebuilt.config[field.name], original.config[field.name]
        assert as_list(value) == as_list(expected), field.name
    assert UNet2DConfig.from_dict(as_dict) == config


def _unet_config(yaml_name: str) -> dict:
    text = (REPO / "configs" / "models" / yaml_name).read_text()
    return yaml.safe_load(text)["model"]["unet_config"]


@pytest.mark.parametrize("yaml_name", ["ddpm-128.yaml", "tiny-ddpm.yaml"])
def test_yaml_config_parameter_count(yaml_name):
    unet_config = _unet_config(yaml_name)
    model = nnx.eval_shape(lambda: UNet2DModel(UNet2DConfig.from_dict(unet_config)))
    leaves = jax.tree.leaves(nnx.state(model, (nnx.Param, Buffer)))
    count = sum(math.prod(leaf.shape) for leaf in leaves)
    with torch.device("meta"):  # shapes only: no memory, no init
        reference = diffusers.UNet2DModel.from_config(unet_config)
    assert count == sum(p.numel() for p in reference.parameters())
    print(f"{yaml_name}: {count:,} parameters")


# ---------------------------------------------------------------------------------------------
# Unsupported options are refused by name


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(dropout=0.1), "dropout"),
        (dict(downsample_type="resnet"), "downsample_type"),
        (dict(upsample_type="resnet"), "upsample_type"),
        (dict(down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D")), "down_block_types"),
        (dict(down_block_types=("KDownBlock2D", "DownBlock2D")), "down_block_types"),
        (dict(up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D")), "up_block_types"),
        (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
        (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
        (dict(block_out_channels=(32, 64, 64)), "block_out_channels"),
        (dict(time_embedding_type="sinusoidal"), "time_embedding_type"),
        (dict(time_embedding_type="learned"), "num_train_timesteps"),
        (dict(class_embed_type="projection"), "class_embed_type"),
        (dict(act_fn="tanhshrink"), "act_fn"),
    ],
)
def test_unsupported_options_raise(changes, key):
    with pytest.raises(ValueError, match=key):
        UNet2DConfig(**{**CONFIGS["attention"], **changes})
