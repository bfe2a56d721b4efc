"""Stable Diffusion 1/2's CLIP text encoder in Flax NNX: transformers' ``CLIPTextModel``.

transformers v5 dropped its Flax models, so flaxdiff owns this one. The module tree keeps the
names of the checkpoint files (``text_model.encoder.layers.3.self_attn.q_proj.weight``; the
in-memory transformers 5 model drops the ``text_model.`` prefix, which loading accepts), so a
``text_encoder/model.safetensors`` maps onto it with `state_dict.load_torch_state_dict` and back
with `state_dict.torch_state_dict`. SD1 (OpenAI ViT-L/14: quick_gelu, 12 layers) and SD2
(OpenCLIP ViT-H/14: gelu, 23 layers) differ only in their `CLIPTextConfig`.

Semantics follow transformers 5.23: a causal mask always, combined with the padding mask from
``attention_mask``; position ids ``arange(L)``; the pooled output is the final-layer-normed state
at the end-of-text token (see `_eos_positions`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from flaxdiff.models.attention import attention
from flaxdiff.models.layers import (
    ACTIVATIONS,
    ZEROS,
    Embedding,
    Init,
    LayerNorm,
    Linear,
    ModelOptions,
    activation,
    call_block,
)

# config.json keys that describe the architecture; everything else in a transformers config
# (architectures, id2label, torch_dtype, transformers_version, dropout, ...) is carried through.
_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_MODEL_TYPE = "clip_text_model"
_DEFAULT_OPTIONS = ModelOptions()  # fp32 parameters and compute, dot_product attention


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture of a CLIP text encoder (transformers' ``CLIPTextConfig`` fields).

    Defaults are transformers' (OpenAI CLIP ViT-B/32). `projection_dim`, `initializer_range`
    and `bos_token_id` do not change the computation; they are kept so that `to_dict` writes a
    complete config.json.

    Attributes:
      raw: the config.json dict this config was read from (`from_dict`), so that `to_dict`
        writes back the keys this class does not model; not part of equality or hashing.
    """

    class_name: ClassVar[str] = "CLIPTextModel"  # its `convert.MODEL_CLASSES` key

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    raw: dict[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig: hidden_act={self.hidden_act!r} is not supported; "
                f"known: {', '.join(sorted(ACTIVATIONS))}"
            )
        if self.attention_dropout:
            raise ValueError(
                f"CLIPTextConfig: attention_dropout={self.attention_dropout} is not supported "
                "(this encoder has no dropout; Stable Diffusion text encoders use 0.0)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size={self.hidden_size} does not split into "
                f"num_attention_heads={self.num_attention_heads} heads"
            )
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
            # The pooled output is read at the position of one eos id; a list or None has none.
            raise ValueError(
                f"CLIPTextConfig: eos_token_id={self.eos_token_id!r} is not supported "
                "(the pooled output needs a single integer id)"
            )
        if self.layer_norm_eps is None:
            raise ValueError("CLIPTextConfig: layer_norm_eps must be a number, not None")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPTextConfig:
        """Reads a transformers ``config.json`` dict (``model_type`` ``clip_text_model``).

        Keys other than the architecture fields are ignored here and kept for `to_dict`.

        Raises:
          ValueError: another model type, or a value this encoder does not support.
        """
        model_type = config.get("model_type", _MODEL_TYPE)
        if model_type != _MODEL_TYPE:
            raise ValueError(
                f"config.json has model_type={model_type!r}; CLIPTextConfig reads "
                f"{_MODEL_TYPE!r} (a text_encoder/config.json)"
            )
        fields = {name: config[name] for name in _ARCHITECTURE_FIELDS if name in config}
        return cls(**fields, raw=dict(config))

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: the source dict with this config's architecture fields."""
        out = dict(self.raw)
        out.update({name: getattr(self, name) for name in _ARCHITECTURE_FIELDS})
        out["model_type"] = _MODEL_TYPE
        out["architectures"] = ["CLIPTextModel"]
        return out


@struct.dataclass
class CLIPTextOutput:
    """What `CLIPTextModel` returns.

    Attributes:
      last_hidden_state: (B, L, D) the final-layer-normed states (SD's conditioning).
      pooler_output: (B, D) `last_hidden_state` at each sequence's end-of-text token.
      hidden_states: with ``output_hidden_states``: the embeddings and every encoder layer's
        output (num_hidden_layers + 1 arrays of (B, L, D), the last one before the final
        layer norm; SD2 conditions on the penultimate one), else None.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _normal_linear(in_features: int, out_features: int, std: float, *, options: ModelOptions,
                   rngs: nnx.Rngs) -> Linear:  # fmt: skip
    """A `Linear` initialized as transformers initializes CLIP: kernel N(0, std), bias 0."""
    return Linear(in_features, out_features, kernel_init=Init("normal", std), bias_init=ZEROS,
                  options=options, rngs=rngs)  # fmt: skip


class CLIPAttention(nnx.Module):
    """Multi-head self-attention: q_proj/k_proj/v_proj/out_proj, all with biases."""

    def __init__(self, config: CLIPTextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        self.options = options
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = dim // self.heads
        factor = config.initializer_factor
        in_std = dim**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
        out_std = dim**-0.5 * factor
        self.q_proj = _normal_linear(dim, dim, in_std, options=options, rngs=rngs)
        self.k_proj = _normal_linear(dim, dim, in_std, options=options, rngs=rngs)
        self.v_proj = _normal_linear(dim, dim, in_std, options=options, rngs=rngs)
        self.out_proj = _normal_linear(dim, dim, out_std, options=options, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        batch, length, _ = x.shape  # (B, L, D); mask bool (B or 1, 1, L, L)

        def split_heads(t):  # (B, L, D) -> (B, L, H, D/H)
            return t.reshape(batch, length, self.heads, self.head_dim)

        # "flash" means the Pallas kernel, which takes no mask and pads every sequence to 128:
        # CLIP needs a causal + padding mask on 77 tokens, so it runs dot_product instead.
        implementation = self.options.attention
        if implementation == "flash":
            implementation = "dot_product"
        out = attention(
            split_heads(self.q_proj(x)),
            split_heads(self.k_proj(x)),
            split_heads(self.v_proj(x)),
            implementation=implementation,
            mask=mask,
        )
        return self.out_proj(out.reshape(batch, length, -1))


class CLIPMLP(nnx.Module):
    """fc1, the config's activation, fc2."""

    def __init__(self, config: CLIPTextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        self.act = activation(config.hidden_act)
        dim = config.hidden_size
        factor = config.initializer_factor
        fc1_std = (2 * dim) ** -0.5 * factor
        fc2_std = dim**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
        self.fc1 = _normal_linear(dim, config.intermediate_size, fc1_std, options=options,
                                  rngs=rngs)  # fmt: skip
        self.fc2 = _normal_linear(config.intermediate_size, dim, fc2_std, options=options,
                                  rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """A pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config, options=options, rngs=rngs)
        self.layer_norm1 = LayerNorm(dim, eps=eps, options=options)
        self.mlp = CLIPMLP(config, options=options, rngs=rngs)
        self.layer_norm2 = LayerNorm(dim, eps=eps, options=options)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of `CLIPEncoderLayer`s (``encoder.layers.{i}``)."""

    def __init__(self, config: CLIPTextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        self.options = options
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, options=options, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, x: jax.Array, mask: jax.Array) -> list[jax.Array]:
        """Returns every layer's output, (B, L, D) each."""
        outputs = []
        for layer in self.layers:
            x = call_block(layer, x, mask, remat=self.options.remat)
            outputs.append(x)
        return outputs


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings (init N(0, 0.02 * factor))."""

    def __init__(self, config: CLIPTextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        std = 0.02 * config.initializer_factor
        dim = config.hidden_size
        self.token_embedding = Embedding(config.vocab_size, dim, std=std, options=options,
                                         rngs=rngs)  # fmt: skip
        self.position_embedding = Embedding(config.max_position_embeddings, dim, std=std,
                                            options=options, rngs=rngs)  # fmt: skip

    def __call__(self, input_ids: jax.Array) -> jax.Array:  # (B, L) -> (B, L, D)
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
    """transformers' ``text_model``: embeddings, encoder, final_layer_norm."""

    def __init__(self, config: CLIPTextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(config, options=options, rngs=rngs)
        self.encoder = CLIPEncoder(config, options=options, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                          options=options)  # fmt: skip


class CLIPTextModel(nnx.Module):
    """transformers' ``CLIPTextModel``: the text tower of CLIP, without projection.

    Parameters are created as transformers' ``CLIPPreTrainedModel._init_weights`` creates them
    (normal distributions scaled by `CLIPTextConfig.initializer_factor`, zero biases, unit
    layer norms); a pretrained encoder is loaded over them with `load_torch_state_dict`.
    """

    # transformers < 5 saved a persistent `position_ids` buffer: it holds no weights.
    torch_ignored_keys = (r"(^|\.)position_ids$",)
    # transformers 5 names its in-memory parameters without the `text_model.` prefix that the
    # checkpoint files carry (it strips the prefix when loading a file); accept both.
    torch_key_renames = ((r"^(?!text_model\.)", "text_model."),)

    def __init__(self, config: CLIPTextConfig, *, options: ModelOptions = _DEFAULT_OPTIONS,
                 rngs: nnx.Rngs):  # fmt: skip
        self.config = config
        self.options = options
        self.text_model = CLIPTextTransformer(config, options=options, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """Encodes token ids.

        Args:
          input_ids: (B, L) int token ids, L <= max_position_embeddings.
          attention_mask: (B, L), 1 for tokens and 0 for padding; None attends to every token.
            Padding must follow the tokens (as CLIP's tokenizer pads): a query with no
            visible key (left padding) is undefined in transformers too.
          output_hidden_states: also return the embeddings and every layer's output.

        Returns:
          `CLIPTextOutput`, arrays in ``options.dtype``.
        """
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {length} tokens; this CLIP text encoder takes at most "
                f"{self.config.max_position_embeddings} (max_position_embeddings)"
            )
        text = self.text_model
        hidden = text.embeddings(input_ids)  # (B, L, D)

        # Query i sees keys j <= i, and only those that are tokens, not padding.
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]  # (1, 1, L, L)
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]  # (B, 1, L, L)

        layer_outputs = text.encoder(hidden, mask)
        last = text.final_layer_norm(layer_outputs[-1] if layer_outputs else hidden)
        eos = _eos_positions(input_ids, self.config.eos_token_id)  # (B,)
        pooled = last[jnp.arange(last.shape[0]), eos]  # (B, D)
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=(hidden, *layer_outputs) if output_hidden_states else None,
        )


def _eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The index of each sequence's end-of-text token, (B, L) -> (B,).

    Configs written before transformers' fix of CLIP's eos id carry ``eos_token_id=2`` (SD1 and
    SD2 among them): for those the eos token is taken to be the largest id in the sequence, as
    in OpenAI's CLIP (its end-of-text token is the last of the vocabulary). Other configs name
    the real id: its first occurrence (the tokenizer may pad with it), or 0 if it is absent.
    Ties resolve to the first position, as torch's argmax does.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)
