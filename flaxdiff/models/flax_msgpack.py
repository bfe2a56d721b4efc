"""Old Flax (Linen) msgpack weights -> the Flax NNX models.

diffusers <= 0.39 (``FlaxModelMixin`` / ``FlaxStableDiffusionPipeline.save_pretrained``) and
transformers 4.x (``FlaxPreTrainedModel.save_pretrained``) wrote a model's Linen parameter tree as
one msgpack file (`flax.serialization.to_bytes`): ``diffusion_flax_model.msgpack`` for diffusers
models, ``flax_model.msgpack`` for transformers ones. Hub repos such as
duongna/stable-diffusion-v1-4-flax and the outputs of the old Flax training scripts hold nothing
else. This module reads them into the models of `convert`, without torch or the old libraries.

The Linen tree names the same weights as the PyTorch module tree, written differently:

- a list index is glued to its list's name (``down_blocks_0/attentions_1/to_out_0``: diffusers'
  converter turned every ``name.N`` into ``name_N``) or is a path element of its own
  (``text_model/encoder/layers/0``: transformers' Flax CLIP);
- leaves are ``kernel`` (dense (in, out), conv HWIO), ``scale`` (norms) and ``embedding``
  where PyTorch has ``weight`` (dense (out, in), conv OIHW);
- the old VAE attention keeps its pre-0.14 names ``query/key/value/proj_attn``.

`linen_to_torch` turns such a tree into the PyTorch state dict of a given model, settling which
``_N`` is an index by the model's own names (``time_embedding/linear_1`` is a name, not
``linear.1``) and old names by the model's ``torch_key_renames``; loading then goes through
`state_dict.load_torch_state_dict`, so its checks (missing, unexpected, shapes) and dtype casts
are the ones of a safetensors load, and a float32 weight arrives bit for bit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from flax import nnx, serialization

from flaxdiff.models.layers import Buffer
from flaxdiff.models.state_dict import load_torch_state_dict
from shared.errors import ConfigError
from shared.model_folders import REDOWNLOAD_FIX

# The msgpack file of each library, keyed by the stem of its PyTorch weights (the stems that
# `convert.ModelEntry.weight_stem` gives).
WEIGHT_FILES: Mapping[str, str] = {
    "diffusion_pytorch_model": "diffusion_flax_model.msgpack",  # diffusers
    "model": "flax_model.msgpack",  # transformers
}

# Linen leaf -> PyTorch leaf; kernels also change layout (`_torch_layout`).
_LINEN_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# "name_3" at the end of a dotted segment: a list index glued to its name, or part of the name.
_GLUED_INDEX = re.compile(r"_(\d+)(?=\.|$)")
_LFS_POINTER = b"version https://git-lfs"
_TORCH_SUFFIXES = (".safetensors", ".bin")


def weights_file(folder: str | os.PathLike, *, stem: str) -> Path | None:
    """The msgpack weights of a component folder, when they are its only weights.

    Args:
      folder: a component folder (``unet/``, ``text_encoder/``).
      stem: the PyTorch weight stem of its library (``"diffusion_pytorch_model"`` or ``"model"``).

    Returns:
      ``folder/diffusion_flax_model.msgpack`` (or ``flax_model.msgpack``), or None when that file
      is absent or the folder also holds PyTorch weights (``*.safetensors``, ``*.bin``), which
      are read instead, as diffusers/transformers read them.
    """
    folder = Path(folder)
    path = folder / WEIGHT_FILES[stem]
    if not path.is_file():
        return None
    if any(p.name.endswith(_TORCH_SUFFIXES) for p in folder.iterdir()):
        return None
    return path


def _flatten(tree: object, prefix: tuple[str, ...], path: Path) -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(tree, np.ndarray):
        yield "/".join(prefix), tree
        return
    if not isinstance(tree, dict):
        # Scalars and lists never occur in a saved parameter tree.
        where = "/".join(prefix) or "the top level"
        raise ConfigError(
            f"{path} is damaged or not a Flax parameter file: {where} holds a "
            f"{type(tree).__name__}, not arrays; {REDOWNLOAD_FIX}"
        )
    for key, value in tree.items():
        yield from _flatten(value, (*prefix, str(key)), path)


def read_msgpack(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of a Flax msgpack file, flat: ``"down_blocks_0/resnets_0/conv1/kernel"``.

    Values are numpy arrays exactly as stored (bf16 as ``ml_dtypes.bfloat16``). Reading never
    runs code: `flax.serialization.msgpack_restore` decodes arrays from their raw bytes only.

    Raises:
      ConfigError: the file is damaged (cut short, not msgpack, not a tree of arrays) or is a
        Git LFS pointer instead of the weights; one line naming the file.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(_LFS_POINTER):
        raise ConfigError(
            f"{path} is a Git LFS pointer, not the weights: the repository was cloned without "
            "git-lfs; run `git lfs pull` in it, or download the model again"
        )
    try:
        tree = serialization.msgpack_restore(data)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
        # msgpack's errors (cut short, extra data) are ValueErrors; a bad array header is a
        # ValueError or TypeError from numpy.
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(
            f"{path} is damaged (it is not a readable Flax msgpack file: {reason}); "
            f"{REDOWNLOAD_FIX}"
        ) from err
    params = dict(_flatten(tree, (), path))
    if not params:
        raise ConfigError(
            f"{path} is damaged or not a Flax parameter file: it holds no arrays; {REDOWNLOAD_FIX}"
        )
    return params


def _torch_keys(model: nnx.Module) -> list[str]:
    """The PyTorch state-dict keys of `model` (as `state_dict.torch_state_dict` names them),
    computed from the graph alone, so an abstract (``nnx.eval_shape``) model serves."""
    keys = []
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param | Buffer):
            *parents, leaf = (str(p) for p in path)
            keys.append(".".join([*parents, _LINEN_LEAVES.get(leaf, leaf)]))
    return keys


def _canonical(key: str) -> str:
    """`key` with every glued ``name_N`` read as an index: a form Linen and PyTorch share."""
    return _GLUED_INDEX.sub(r".\1", key)


def _torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    if leaf == "kernel" and value.ndim == 2:
        return value.T  # (in, out) -> (out, in)
    return value


def linen_to_torch(params: Mapping[str, np.ndarray], model: nnx.Module) -> dict[str, np.ndarray]:
    """Flat Linen parameters -> the PyTorch state dict of `model` (its key names and layouts).

    Args:
      params: ``"/"``-joined Linen paths -> arrays, as `read_msgpack` returns them.
      model: the model the weights are for (may be abstract); its parameter names decide which
        glued ``_N`` is a list index, and its ``torch_key_renames`` translate old names.

    Returns:
      PyTorch key -> array (views, not copies). A Linen path that names no parameter of `model`,
      or one that another path already gave, is kept under its own name, so that loading
      reports it as unexpected as the file spells it.

    Raises:
      ValueError: two parameters of `model` differ only in ``name.N`` against ``name_N``, which
        the Linen names cannot tell apart.
    """
    known: dict[str, str] = {}
    for key in _torch_keys(model):
        other = known.setdefault(_canonical(key), key)
        if other != key:
            raise ValueError(
                f"{type(model).__name__} has parameters {other} and {key}, which Linen parameter "
                "names cannot tell apart; it cannot be loaded from a Flax msgpack file"
            )
    renames = [(re.compile(p), r) for p, r in getattr(type(model), "torch_key_renames", ())]
    out: dict[str, np.ndarray] = {}
    for linen_path, value in params.items():
        *parents, leaf = linen_path.split("/")
        canonical = _canonical(".".join([*parents, _LINEN_LEAVES.get(leaf, leaf)]))
        key = known.get(canonical)
        if key is None:
            renamed = canonical
            for pattern, replacement in renames:
                renamed = pattern.sub(replacement, renamed)
            key = known.get(_canonical(renamed))
        if key is None or key in out:  # no such parameter, or a second file entry for one
            key = linen_path
        out[key] = _torch_layout(leaf, value)
    return out


def load_msgpack(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Loads a Flax msgpack weight file into `model` in place (cast to each parameter's dtype).

    Args:
      model: a flaxdiff model built from the folder's config.json (may be abstract).
      path: its ``diffusion_flax_model.msgpack`` / ``flax_model.msgpack``.

    Raises:
      ConfigError: a damaged file (see `read_msgpack`).
      ValueError: weights that do not fit the model (missing, unexpected, shapes), naming the file.
    """
    params = read_msgpack(path)
    return load_torch_state_dict(
        model, linen_to_torch(params, model), source=f"the Flax weights in {path}"
    )
