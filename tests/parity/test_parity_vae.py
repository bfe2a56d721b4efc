"""flaxdiff's AutoencoderKL computes what diffusers' AutoencoderKL computes, from the same weights.

Tiny configs built here (two and three levels; one without quant convs or mid attention), random
PyTorch weights (norm affines perturbed so they matter) loaded into the Flax model, the same
images, noise and latents on both sides. float64 proves the functions equal (`F64_REL`): the
encoder moments, the posterior draw, decode(z), the reconstruction and the gradients of a scalar
loss through encode + sample + decode w.r.t. the image and every parameter. float32 is what
users run (`F32_REL`). Each Flax variant is jitted once and its results cached for the module.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from parity_helpers import (
    F32_REL,
    F64_REL,
    assert_grads_parity,
    assert_parity,
    nchw_to_nhwc,
    nhwc_to_nchw,
)

from flaxdiff.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from flaxdiff.models.convert import parameter_count
from flaxdiff.models.layers import ModelOptions
from flaxdiff.models.state_dict import load_torch_state_dict, torch_state_dict

ROOT = Path(__file__).resolve().parents[2]
BATCH, SIZE = 2, 32

CONFIGS = {
    "two_levels": dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ),
    "no_quant_no_mid_attention": dict(
        block_out_channels=(32, 32), layers_per_block=2, norm_num_groups=16, latent_channels=3,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ),
    "three_levels": dict(
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ),
}  # fmt: skip

_torch_models: dict[str, diffusers.AutoencoderKL] = {}
_results: dict[tuple, dict] = {}


def torch_vae(name: str) -> diffusers.AutoencoderKL:
    """diffusers' model for `name` (float32), random weights with non-trivial norm affines."""
    if name not in _torch_models:
        torch.manual_seed(len(_torch_models))
        model = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "norm" in key:  # GroupNorm inits to (1, 0), which would hide a swapped affine
                    param.copy_((key.endswith("weight")) + 0.2 * torch.randn_like(param))
        _torch_models[name] = model
    return _torch_models[name]


def torch_numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def flax_vae(name: str, options: ModelOptions) -> AutoencoderKL:
    """The Flax model with the torch weights of `name`, built abstract (no random init)."""
    tvae = torch_vae(name)
    config = AutoencoderKLConfig.from_dict(dict(tvae.config))
    model = nnx.eval_shape(lambda: AutoencoderKL(config, options=options))
    return load_torch_state_dict(model, torch_numpy_state(tvae), source=f"torch {name}")


def inputs(name: str, dtype) -> dict[str, np.ndarray]:
    """Image, loss weights and a latent (NHWC), and the PRNG key of the posterior draw."""
    rng = np.random.default_rng(1)
    config = CONFIGS[name]
    down = 2 ** (len(config["block_out_channels"]) - 1)
    latent_shape = (BATCH, SIZE // down, SIZE // down, config.get("latent_channels", 4))
    return {
        "x": rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)).astype(dtype),
        "w": rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(dtype),
        "z": rng.standard_normal(latent_shape).astype(dtype),
        "key": jax.random.key(7),
        "latent_shape": latent_shape,
    }


def flax_run(name: str, options: ModelOptions) -> dict:
    """Outputs and gradients of the Flax model: one jitted function per variant.

    z = encode(x).sample(key), loss = sum(w * decode(z)) (the body of ``model(x,
    sample_posterior=True, key=key)``); gradients w.r.t. x and all parameters, the latter as a
    diffusers-keyed state dict (NCHW / OIHW layouts, like the torch grads). `__call__` itself
    is checked in `test_forward_and_latent_helpers` (tracing it here too costs compile time).
    """
    model = flax_vae(name, options)
    graphdef, state = nnx.split(model)
    data = inputs(name, options.dtype)

    @jax.jit
    def step(state, x, w, key):
        def loss_fn(state, x):
            vae = nnx.merge(graphdef, state)
            posterior = vae.encode(x)
            sample = posterior.sample(key)
            decoded = vae.decode(sample)
            aux = {"mean": posterior.mean, "std": posterior.std, "sample": sample,
                   "decoded": decoded}  # fmt: skip
            return jnp.sum(decoded * w), aux

        return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state, x)

    (loss, aux), (grad_state, grad_x) = step(state, data["x"], data["w"], data["key"])
    noise = jax.random.normal(data["key"], data["latent_shape"], options.dtype)
    out = {k: nhwc_to_nchw(v) for k, v in aux.items()}
    out["noise"] = nhwc_to_nchw(noise)
    out["loss"] = loss.item()
    out["grad_x"] = nhwc_to_nchw(grad_x)
    out["grads"] = torch_state_dict(nnx.merge(graphdef, jax.tree.map(np.asarray, grad_state)))
    return out


def torch_run(name: str, dtype: torch.dtype, noise: np.ndarray) -> dict:
    """diffusers' forward with the posterior noise given (its sample() draws with torch.randn)."""
    tvae = copy.deepcopy(torch_vae(name)).to(dtype)
    data = inputs(name, np.float64)
    x = torch.tensor(nhwc_to_nchw(data["x"]), dtype=dtype, requires_grad=True)
    w = torch.tensor(nhwc_to_nchw(data["w"]), dtype=dtype)
    posterior = tvae.encode(x).latent_dist
    sample = posterior.mean + posterior.std * torch.tensor(noise, dtype=dtype)
    decoded = tvae.decode(sample).sample
    loss = (decoded * w).sum()
    loss.backward()
    out = {
        "mean": posterior.mean,
        "std": posterior.std,
        "sample": sample,
        "decoded": decoded,
        "grad_x": x.grad,
    }
    out = {k: v.detach().numpy() for k, v in out.items()}
    out["loss"] = loss.item()
    out["grads"] = {k: p.grad.numpy() for k, p in tvae.named_parameters()}
    return out


def results(name: str, dtype: str, attention: str = "dot_product", remat: bool = False) -> dict:
    """{"flax": ..., "torch": ...} for a variant, computed once (float64 under the x64 fixture)."""
    key = (name, dtype, attention, remat)
    if key not in _results:
        options = ModelOptions(dtype=dtype, param_dtype=dtype, attention=attention, remat=remat)
        flax = flax_run(name, options)
        torch_dtype = torch.float64 if dtype == "float64" else torch.float32
        _results[key] = {"flax": flax, "torch": torch_run(name, torch_dtype, flax["noise"])}
    return _results[key]


# decoded = decode(z) of the posterior draw z = mean + std * noise, the same noise both sides.
OUTPUTS = ("mean", "std", "sample", "decoded")
# Each attention implementation on a config with attention (the third config has none); one
# jit compile per variant is most of this file's run time, so no config runs twice.
VARIANTS = [
    ("two_levels", "dot_product"),
    ("three_levels", "einsum"),
    ("no_quant_no_mid_attention", "einsum"),
]


def check_gradients(flax: dict, ref: dict, *, rel: float, what: str) -> None:
    """Gradient w.r.t. x and every parameter within rel x max |its reference|, each on its own."""
    assert_parity(flax["grad_x"], ref["grad_x"], rel=rel, what=f"{what} d loss / d x")
    assert_grads_parity(flax["grads"], ref["grads"], rel=rel, what=f"{what} parameter grads")


@pytest.mark.parametrize(("name", "attention"), VARIANTS)
def test_float64_outputs(x64, name, attention):
    res = results(name, "float64", attention)
    for output in OUTPUTS:
        assert_parity(res["flax"][output], res["torch"][output], rel=F64_REL,
                      what=f"f64 {name} {attention} {output}")  # fmt: skip
    assert res["flax"]["loss"] == pytest.approx(res["torch"]["loss"], rel=F64_REL)


@pytest.mark.parametrize(("name", "attention"), VARIANTS)
def test_float64_gradients(x64, name, attention):
    res = results(name, "float64", attention)
    check_gradients(res["flax"], res["torch"], rel=F64_REL, what=f"f64 {name} {attention}")


@pytest.mark.parametrize("name", ["two_levels", "no_quant_no_mid_attention"])
def test_float32_outputs_and_gradients(name):
    res = results(name, "float32")
    for output in OUTPUTS:
        assert_parity(res["flax"][output], res["torch"][output], rel=F32_REL,
                      what=f"f32 {name} {output}")  # fmt: skip
    check_gradients(res["flax"], res["torch"], rel=F32_REL, what=f"f32 {name}")


def test_remat_changes_nothing():
    plain = results("two_levels", "float32")["flax"]
    remat = results("two_levels", "float32", remat=True)["flax"]
    for output in (*OUTPUTS, "grad_x"):
        np.testing.assert_array_equal(remat[output], plain[output], err_msg=output)
    for key, grad in plain["grads"].items():
        np.testing.assert_array_equal(remat["grads"][key], grad, err_msg=key)


def test_remat_wraps_every_block():
    """With remat on, the forward holds one remat region per resnet and attention (mid too)."""

    def remat_regions(remat: bool) -> int:
        model = flax_vae("two_levels", ModelOptions(remat=remat))
        jaxpr = jax.make_jaxpr(lambda m, x: m(x))(model, jnp.zeros((1, SIZE, SIZE, 3)))
        return len(re.findall(r"\bremat\w*\[", str(jaxpr)))

    # encoder: 2 levels x 1 resnet + mid (2 resnets, 1 attention); decoder: mid 3 + 2 x 2
    # (the resnet before an upsampler shares its region with it, see `_up_decoder_block`).
    assert remat_regions(True) == 12
    assert remat_regions(False) == 0


def test_state_dict_round_trip_is_exact():
    name = "two_levels"
    reference = torch_numpy_state(torch_vae(name))
    state = torch_state_dict(flax_vae(name, ModelOptions()))
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype, key
        np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_old_attention_names_load():
    """Checkpoints from before diffusers' attention refactor: query/key/value/proj_attn."""
    name = "two_levels"
    reference = torch_numpy_state(torch_vae(name))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in reference.items():
        for new, previous in old_names.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{previous}.")
                value = value[:, :, None, None] if value.ndim == 2 else value  # old 1x1 convs
        old[key] = value
    assert any(".proj_attn." in k for k in old) and any(".query." in k for k in old)
    config = AutoencoderKLConfig.from_dict(dict(torch_vae(name).config))
    model = load_torch_state_dict(nnx.eval_shape(lambda: AutoencoderKL(config)), old)
    state = torch_state_dict(model)
    for key, value in reference.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name):
    torch_config = dict(torch_vae(name).config)
    config = AutoencoderKLConfig.from_dict({**torch_config, "_diffusers_version": "0.42.1",
                                            "some_future_argument": 1})  # fmt: skip
    as_json = config.to_dict()
    assert as_json["_class_name"] == "AutoencoderKL"
    rebuilt = diffusers.AutoencoderKL.from_config(as_json)
    for field, value in as_json.items():
        if field.startswith("_"):
            continue
        for got in (rebuilt.config[field], torch_config[field]):
            got = list(got) if isinstance(got, tuple) else got
            assert got == value, (field, got, value)
    assert AutoencoderKLConfig.from_dict(as_json) == config


def test_unsupported_block_type_is_named():
    with pytest.raises(ValueError, match=r"down_block_types.*AttnDownEncoderBlock2D.*DownEncoder"):
        AutoencoderKLConfig(down_block_types=("AttnDownEncoderBlock2D",))
    with pytest.raises(ValueError, match=r"up_block_types.*'Foo'.*UpDecoderBlock2D"):
        AutoencoderKLConfig(up_block_types=("Foo",))


def torch_keyed_sizes(model: nnx.Module) -> dict[str, int]:
    """diffusers key -> parameter size, read from paths only (works on abstract models)."""
    leaf_names = {"kernel": "weight", "scale": "weight"}
    sizes = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            *parents, leaf = (str(p) for p in path)
            sizes[".".join([*parents, leaf_names.get(leaf, leaf)])] = int(variable.size)
    return sizes


@pytest.mark.parametrize("recipe", ["sd15", "tiny"])
def test_recipe_configs_build_with_diffusers_parameter_count(recipe):
    vae_config = yaml.safe_load((ROOT / "configs/models" / f"{recipe}.yaml").read_text())
    vae_config = vae_config["model"]["vae_config"]
    config = AutoencoderKLConfig.from_dict(vae_config)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config))
    with torch.device("meta"):  # shapes only: no 84M-parameter random init
        reference = diffusers.AutoencoderKL.from_config(vae_config)
    expected = {k: p.numel() for k, p in reference.named_parameters()}
    assert torch_keyed_sizes(abstract) == expected
    assert parameter_count(abstract) == sum(expected.values())
    if recipe == "sd15":
        assert sum(expected.values()) == 83_653_863


def test_forward_and_latent_helpers():
    """`__call__`, decode, kl and the trainers' latent scaling against diffusers (float32).

    Latents are (z - shift) * scale and images decode(latents / scale + shift), as diffusers'
    pipelines compute them; a shift_factor is set so both terms matter.
    """
    name = "no_quant_no_mid_attention"
    tvae = torch_vae(name)
    config = AutoencoderKLConfig.from_dict({**dict(tvae.config), "shift_factor": 0.25,
                                            "scaling_factor": 0.5})  # fmt: skip
    model = load_torch_state_dict(nnx.eval_shape(lambda: AutoencoderKL(config)),
                                  torch_numpy_state(tvae))  # fmt: skip
    data = inputs(name, np.float32)

    @nnx.jit
    def run(vae, x, z, key):
        posterior = vae.encode(x)
        return {
            "forward": vae(x),
            "forward_sampled": vae(x, sample_posterior=True, key=key),
            "decoded_draw": vae.decode(posterior.sample(key)),
            "decoded": vae.decode(z),
            "kl": posterior.kl(),
            "latents_mode": vae.latents_from_images(x, None),
            "latents_drawn": vae.latents_from_images(x, key),
            "latents_expected": (posterior.sample(key) - 0.25) * 0.5,
            "images": vae.images_from_latents(z),
        }

    out = run(model, data["x"], data["z"], data["key"])
    np.testing.assert_array_equal(out["forward_sampled"], out["decoded_draw"])
    np.testing.assert_array_equal(out["latents_drawn"], out["latents_expected"])
    with pytest.raises(ValueError, match="PRNG key"):
        model(data["x"], sample_posterior=True)

    x, z = (torch.from_numpy(nhwc_to_nchw(data[k])) for k in ("x", "z"))
    with torch.no_grad():
        posterior = tvae.encode(x).latent_dist
        reference = {
            "forward": nchw_to_nhwc(tvae(x).sample),
            "decoded": nchw_to_nhwc(tvae.decode(z).sample),
            "kl": posterior.kl().numpy(),
            "latents_mode": nchw_to_nhwc((posterior.mean - 0.25) * 0.5),
            "images": nchw_to_nhwc(tvae.decode(z / 0.5 + 0.25).sample),
        }
    for key, value in reference.items():
        assert_parity(out[key], value, rel=F32_REL, what=f"f32 {name} {key}")
