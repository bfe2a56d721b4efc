"""flaxdiff's CLIPTextModel against transformers' CLIPTextModel (the reference), on tiny configs.

float64 proves both compute the same function (outputs and every parameter gradient within
F64_REL); float32 is what users run (F32_REL). The weights are transformers' random init, with
biases and layer norms perturbed so that they take part, loaded through `load_torch_state_dict`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from parity_helpers import F32_REL, F64_REL, assert_grads_parity, assert_parity
from safetensors.numpy import save_file

from flaxdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
from flaxdiff.models.layers import ModelOptions, set_options
from flaxdiff.models.state_dict import load_torch_state_dict, torch_state_dict

BOS, EOS, LENGTH = 998, 999, 77
COMMON = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
              max_position_embeddings=LENGTH, projection_dim=16)  # fmt: skip
CONFIGS = {
    # SD1 (OpenAI ViT-L/14): quick_gelu and the legacy eos_token_id=2, so the pooled token is
    # the largest id (EOS here, as 49407 there); the tokenizer pads with EOS (argmax ties).
    "sd1": dict(COMMON, num_hidden_layers=3, hidden_act="quick_gelu", pad_token_id=1,
                bos_token_id=0, eos_token_id=2),
    # SD2-style (OpenCLIP ViT-H/14): exact gelu, the real eos id, padding with id 0.
    "sd2": dict(COMMON, num_hidden_layers=2, hidden_act="gelu", pad_token_id=0,
                bos_token_id=BOS, eos_token_id=EOS),
}  # fmt: skip
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    """Runs torch on one thread while this module runs.

    The matmuls here are tiny: with 2 OpenMP threads on a 2-core machine that also runs XLA,
    each took ~10 ms instead of microseconds (the float32 backward 1.2 s instead of 15 ms).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_model(kind: str, dtype: str) -> transformers.CLIPTextModel:
    """transformers' model at its own init, biases and norms then made random (seeded)."""
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CONFIGS[kind]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "layer_norm" in name:  # the norm weights
                param.normal_(1.0, 0.1)
    return model.to(TORCH_DTYPES[dtype]).eval()


def flax_model(reference, kind: str, dtype: str, **options) -> CLIPTextModel:
    """`reference`'s weights in a flaxdiff model, through `load_torch_state_dict`.

    The model is built abstractly and filled with zeros first: its random init is eager JAX (an
    XLA compile per draw, seconds on 2 cores) and `test_init_matches_transformers` covers it.
    """
    config = CLIPTextConfig(**CONFIGS[kind])
    model_options = ModelOptions(dtype=dtype, param_dtype=dtype, **options)
    abstract = nnx.eval_shape(
        lambda: CLIPTextModel(config, options=model_options, rngs=nnx.Rngs(0))
    )
    graphdef, shapes = nnx.split(abstract)
    zeros = jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), shapes)
    model = nnx.merge(graphdef, zeros)
    # transformers 5 names its parameters without "text_model."; the model's renames add it.
    state = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
    return load_torch_state_dict(model, state, source=f"torch {kind}")


def inputs(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ids (3, 77) and attention mask as the tokenizers make them, plus loss weights.

    Rows hold 77, 12 and 40 real tokens (BOS ... EOS), then padding: EOS for SD1, 0 for SD2.
    """
    rng = np.random.default_rng(1)
    pad = EOS if kind == "sd1" else 0
    ids = np.full((3, LENGTH), pad, np.int64)
    mask = np.zeros((3, LENGTH), np.int64)
    for row, count in enumerate((LENGTH, 12, 40)):
        ids[row, :count] = [BOS, *rng.integers(3, BOS, count - 2), EOS]
        mask[row, :count] = 1
    weights = rng.standard_normal((3, LENGTH, COMMON["hidden_size"]))
    pooled_weights = rng.standard_normal((3, COMMON["hidden_size"]))
    return ids, mask, weights, pooled_weights


@nnx.jit
def flax_forward(model: CLIPTextModel, ids: jax.Array, mask: jax.Array | None):
    return model(ids, mask, output_hidden_states=True)


@nnx.jit
def flax_loss_and_grads(model: CLIPTextModel, ids, mask, weights, pooled_weights):
    def loss(model):
        out = model(ids, mask)
        return jnp.sum(out.last_hidden_state * weights) + jnp.sum(
            out.pooler_output * pooled_weights
        )

    return nnx.value_and_grad(loss)(model)


def run_flax(model: CLIPTextModel, ids: np.ndarray, mask: np.ndarray, padded: bool):
    return flax_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask) if padded else None)


def run_torch(model: transformers.CLIPTextModel, ids: np.ndarray, mask: np.ndarray,
              padded: bool):  # fmt: skip
    with torch.no_grad():
        return model(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask) if padded else None,
            output_hidden_states=True,
        )


def flax_grads(model: CLIPTextModel, ids, mask, weights, pooled_weights,
               padded: bool) -> tuple[float, dict[str, np.ndarray]]:  # fmt: skip
    """(loss, gradients as a PyTorch state dict: the same key mapping as the weights)."""
    dtype = model.options.dtype
    loss, grads = flax_loss_and_grads(
        model,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask) if padded else None,
        jnp.asarray(weights, dtype),
        jnp.asarray(pooled_weights, dtype),
    )
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return float(loss), torch_state_dict(holder)


def torch_grads(model: transformers.CLIPTextModel, ids, mask, weights, pooled_weights,
                padded: bool) -> tuple[float, dict[str, np.ndarray]]:  # fmt: skip
    """(loss, gradients keyed as the checkpoint files name the weights)."""
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if padded else None)
    loss = (out.last_hidden_state * torch.from_numpy(weights).to(dtype)).sum() + (
        out.pooler_output * torch.from_numpy(pooled_weights).to(dtype)
    ).sum()
    loss.backward()
    grads = {f"text_model.{name}": p.grad.numpy() for name, p in model.named_parameters()}
    return float(loss.detach()), grads


def assert_outputs_parity(out, ref, *, rel: float, what: str) -> None:
    """last_hidden_state, pooler_output and every hidden state within rel."""
    assert_parity(out.last_hidden_state, ref.last_hidden_state, rel=rel, what=f"{what} last")
    assert_parity(out.pooler_output, ref.pooler_output, rel=rel, what=f"{what} pooled")
    assert len(out.hidden_states) == len(ref.hidden_states)
    stacked = np.stack([np.asarray(h) for h in out.hidden_states])
    reference = np.stack([h.numpy() for h in ref.hidden_states])
    assert_parity(stacked, reference, rel=rel, what=f"{what} hidden_states")


# ---------------------------------------------------------------------------------------------
# float64: the same function (einsum attention: jax.nn.dot_product_attention keeps a float32
# softmax, so a float64 model runs the einsum path; the fused path is checked in float32)


@pytest.mark.parametrize("attention", ["einsum"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_forward_float64(x64, kind, padded, attention):
    reference = torch_model(kind, "float64")
    model = flax_model(reference, kind, "float64", attention=attention)
    ids, mask, _, _ = inputs(kind)
    out = run_flax(model, ids, mask, padded)
    assert out.last_hidden_state.dtype == jnp.float64
    ref = run_torch(reference, ids, mask, padded)
    assert_outputs_parity(out, ref, rel=F64_REL, what=f"f64 {kind} {attention} padded={padded}")


@pytest.mark.parametrize("attention", ["einsum"])
@pytest.mark.parametrize(("kind", "padded"), [("sd1", False), ("sd2", True)])
def test_gradients_float64(x64, kind, padded, attention):
    reference = torch_model(kind, "float64")
    model = flax_model(reference, kind, "float64", attention=attention)
    data = inputs(kind)
    loss, grads = flax_grads(model, *data, padded)
    ref_loss, ref_grads = torch_grads(reference, *data, padded)
    what = f"f64 {kind} {attention} padded={padded}"
    assert_parity(loss, ref_loss, rel=F64_REL, what=f"{what} loss")
    # The token_embedding gradient is the gradient w.r.t. the input embeddings, row by row.
    assert_grads_parity(grads, ref_grads, rel=F64_REL, what=what)


def test_pooled_index_follows_eos_id(x64):
    """SD1 pools at the largest id (first of ties), SD2-style at the first EOS, wherever it is."""
    for kind in ("sd1", "sd2"):
        reference = torch_model(kind, "float64")
        model = flax_model(reference, kind, "float64")
        ids, mask, _, _ = inputs(kind)
        expected = [LENGTH - 1, 11, 39]
        out = run_flax(model, ids, mask, True)
        at_eos = np.asarray(out.last_hidden_state)[np.arange(3), expected]  # (3, D)
        np.testing.assert_array_equal(out.pooler_output, at_eos)


# ---------------------------------------------------------------------------------------------
# float32: what users run


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_forward_float32(kind):
    reference = torch_model(kind, "float32")
    model = flax_model(reference, kind, "float32")  # the default options: dot_product
    ids, mask, _, _ = inputs(kind)
    out = run_flax(model, ids, mask, True)
    assert out.last_hidden_state.dtype == jnp.float32
    assert_outputs_parity(out, run_torch(reference, ids, mask, True), rel=F32_REL,
                          what=f"f32 {kind} padded")  # fmt: skip


def test_gradients_float32():
    reference = torch_model("sd1", "float32")
    model = flax_model(reference, "sd1", "float32")
    data = inputs("sd1")
    loss, grads = flax_grads(model, *data, True)
    ref_loss, ref_grads = torch_grads(reference, *data, True)
    assert_parity(loss, ref_loss, rel=F32_REL, what="f32 sd1 padded loss")
    assert_grads_parity(grads, ref_grads, rel=F32_REL, what="f32 sd1 padded")


def test_remat_changes_nothing():
    """remat=True gives bit-identical outputs and gradients (jit-compiled, float32).

    On the SD1 config (quick_gelu). With exact (erf) gelu, XLA on CPU fuses the two compiled
    programs differently and some gradients differ by about an ulp (run eagerly they are equal).
    """
    reference = torch_model("sd1", "float32")
    plain = flax_model(reference, "sd1", "float32")
    remat = set_options(nnx.clone(plain), remat=True)
    data = inputs("sd1")
    ids, mask = data[0], data[1]
    for a, b in zip(
        jax.tree.leaves(run_flax(plain, ids, mask, True)),
        jax.tree.leaves(run_flax(remat, ids, mask, True)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    loss, grads = flax_grads(plain, *data, True)
    remat_loss, remat_grads = flax_grads(remat, *data, True)
    assert loss == remat_loss
    assert sorted(grads) == sorted(remat_grads)
    for key, grad in grads.items():
        np.testing.assert_array_equal(remat_grads[key], grad, err_msg=key)


def test_flash_option_runs_dot_product():
    reference = torch_model("sd1", "float32")
    flash = flax_model(reference, "sd1", "float32", attention="flash")
    dot = flax_model(reference, "sd1", "float32", attention="dot_product")
    ids, mask, _, _ = inputs("sd1")
    for a, b in zip(
        jax.tree.leaves(run_flax(flash, ids, mask, True)),
        jax.tree.leaves(run_flax(dot, ids, mask, True)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Weights, init and config


def test_state_dict_round_trip(tmp_path):
    """Keys and values survive bit for bit, and transformers loads what flaxdiff writes."""
    reference = torch_model("sd1", "float32")
    model = flax_model(reference, "sd1", "float32")
    expected = {f"text_model.{k}": v.numpy() for k, v in reference.state_dict().items()}
    written = torch_state_dict(model)
    assert sorted(written) == sorted(expected)  # the checkpoint files' names
    for key, value in expected.items():
        assert written[key].dtype == value.dtype, key
        assert np.array_equal(written[key], value), key

    # As a text_encoder/ folder: transformers 5 strips the files' "text_model." on load.
    save_file(written, str(tmp_path / "model.safetensors"))
    config = CLIPTextConfig.from_dict(reference.config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = transformers.CLIPTextModel.from_pretrained(tmp_path)
    for key, value in loaded.state_dict().items():
        assert np.array_equal(value.numpy(), expected[f"text_model.{key}"]), key

    # Checkpoints from transformers 4 carry the position_ids buffer: skipped.
    legacy = dict(expected, **{"text_model.embeddings.position_ids": np.arange(LENGTH)[None]})
    load_torch_state_dict(model, legacy)


def test_init_matches_transformers():
    """The same distributions as transformers' `_init_weights` (zero biases, unit norms)."""
    kw = dict(CONFIGS["sd2"], initializer_factor=0.5)
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw)).state_dict()
    ours = torch_state_dict(CLIPTextModel(CLIPTextConfig(**kw), rngs=nnx.Rngs(0)))
    assert sorted(ours) == sorted(f"text_model.{k}" for k in reference)
    for key, value in reference.items():
        value, mine = value.numpy(), ours[f"text_model.{key}"]
        assert mine.shape == value.shape and mine.dtype == np.float32, key
        if key.endswith("bias") or "layer_norm" in key:
            assert np.array_equal(mine, value), key  # zeros and ones
        else:
            assert abs(mine.mean()) < 0.15 * value.std(), key
            assert 0.9 < mine.std() / value.std() < 1.1, key


SD1_CONFIG_JSON = {  # openai/clip-vit-large-patch14 as SD1.5's text_encoder/config.json has it
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}  # fmt: skip
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim",
                "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range",
                "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id")  # fmt: skip


@pytest.mark.parametrize("source", ["sd1_json", "sd2", "defaults"])
def test_config_round_trip(source):
    if source == "sd1_json":
        original = SD1_CONFIG_JSON
    else:
        kw = CONFIGS["sd2"] if source == "sd2" else {}
        original = transformers.CLIPTextConfig(**kw).to_dict()
    config = CLIPTextConfig.from_dict(original)
    written = config.to_dict()
    assert written["model_type"] == "clip_text_model"
    assert written["architectures"] == ["CLIPTextModel"]
    for key in set(original) - {"architectures"}:  # nothing else is dropped or changed
        assert written[key] == original[key], key
    hf = transformers.CLIPTextConfig.from_dict(json.loads(json.dumps(written)))
    hf_original = transformers.CLIPTextConfig.from_dict(original)
    for name in ARCHITECTURE:
        assert getattr(hf, name) == getattr(hf_original, name) == getattr(config, name), name
    assert CLIPTextConfig.from_dict(written) == config
    if source == "defaults":
        assert config == CLIPTextConfig()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "gelu_10"}, r"hidden_act='gelu_10' is not supported; known: .*quick_gelu"),
        ({"attention_dropout": 0.1}, r"attention_dropout=0.1 is not supported .*no dropout"),
        ({"num_attention_heads": 5}, r"hidden_size=768 does not split into .*5 heads"),
        ({"eos_token_id": [2, 3]}, r"eos_token_id=\[2, 3\] is not supported"),
        ({"model_type": "clip"}, r"model_type='clip'.*clip_text_model"),
    ],
)
def test_unsupported_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        CLIPTextConfig.from_dict(dict(SD1_CONFIG_JSON, **change))


def test_too_long_input_raises():
    model = CLIPTextModel(CLIPTextConfig(**dict(CONFIGS["sd2"], max_position_embeddings=8)),
                          rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match="at most 8"):
        model(jnp.zeros((1, 9), jnp.int32))
