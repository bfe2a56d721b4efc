"""PyTorch state dicts <-> parameters of the Flax models, by name.

The Flax models keep the module tree of diffusers/transformers, so a parameter path maps to a
PyTorch key mechanically: join the path with dots and rename the leaf (``kernel``/``scale``/
``embedding`` -> ``weight``), transposing dense kernels ((in, out) <-> (out, in)) and conv
kernels (HWIO <-> OIHW). Arrays are numpy both ways; values are never rounded (a float32 weight
stays bit-identical through a round trip).

A model class may declare
  ``torch_ignored_keys``: regexes of PyTorch keys that carry no parameter (buffers such as
    CLIP's ``position_ids``), skipped on load;
  ``torch_key_renames``: (regex, replacement) pairs applied to incoming PyTorch keys (old names
    of the same weights, e.g. the VAE attention's ``query`` -> ``to_q``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdiff.models.layers import Buffer

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _torch_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    return value


def _to_flax_layout(leaf: str, value: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and len(expected) == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # a 1x1 conv saved where diffusers now has a Linear
        return value.T
    if leaf == "kernel" and len(expected) == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def _variables(
    model: nnx.Module, only: type | tuple[type, ...] = (nnx.Param, Buffer)
) -> dict[str, tuple[tuple, nnx.Variable]]:
    """PyTorch key -> (path, variable) for every parameter and buffer of `model`."""
    out = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, only):
            out[_torch_key(path)] = (path, variable)
    return out


def torch_state_dict(
    model: nnx.Module, *, only: type | tuple[type, ...] = (nnx.Param, Buffer)
) -> dict[str, np.ndarray]:
    """The PyTorch state dict of `model` (numpy arrays in the parameters' dtype).

    `only` picks variable types, e.g. ``Buffer`` for the saved-but-frozen arrays.
    """
    state = {}
    for key, (path, variable) in _variables(model, only).items():
        state[key] = np.ascontiguousarray(
            _to_torch_layout(str(path[-1]), np.asarray(variable[...]))
        )
    return state


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> nnx.Module:
    """Copies a PyTorch state dict into `model` in place (cast to each parameter's dtype).

    `model` may be abstract (built under ``nnx.eval_shape``): loading then fills it without
    ever running the random init.

    Raises:
      ValueError: keys missing or left over, or a shape that does not match; the message names
        `source` (the file) and the keys, which points at a config that does not match the weights.
    """
    cls = type(model)
    ignored = [re.compile(p) for p in getattr(cls, "torch_ignored_keys", ())]
    renames = [(re.compile(p), r) for p, r in getattr(cls, "torch_key_renames", ())]
    targets = _variables(model)
    unexpected, mismatched, seen = [], [], set()
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        if key not in targets:
            if not any(p.search(key) for p in ignored):
                unexpected.append(key)
            continue
        path, variable = targets[key]
        expected = tuple(variable.shape)  # also on abstract (nnx.eval_shape) models
        array = _to_flax_layout(str(path[-1]), np.asarray(value), expected)
        if tuple(array.shape) != expected:
            mismatched.append(f"{key}: {tuple(np.shape(value))} does not fit {expected}")
            continue
        variable.set_value(jnp.asarray(array, dtype=variable.dtype))
        seen.add(key)
    missing = sorted(set(targets) - seen)
    if missing or unexpected or mismatched:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", mismatched)):  # fmt: skip
            if keys:
                shown = ", ".join(keys[:8]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 8 else ""
                )
                parts.append(f"{title}: {shown}")
        raise ValueError(
            f"{source} does not match {cls.__name__} built from its config ({'; '.join(parts)}); "
            "check that config.json belongs to these weights"
        )
    return model
