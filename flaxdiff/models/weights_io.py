"""Weight files of diffusers/transformers model folders <-> flat dicts of numpy arrays.

The file layer under the Flax model conversion: it knows where a component folder keeps its
weights (safetensors, sharded safetensors, PyTorch ``.bin``, maybe with a variant such as
``fp16``) and nothing about the models. Numpy only: this runs on TPU hosts where torch may be
absent, so PyTorch ``.bin`` checkpoints are read by `load_torch_pickle`, a restricted unpickler
that never imports torch and never calls anything a file names except a few stand-ins.

Values are never converted: a bf16 tensor comes back as ``ml_dtypes.bfloat16`` and is written
back bit for bit.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy

from shared.diffusers_format import atomic_write, atomic_write_text

_FIX_HINT = (
    "convert it to safetensors on a trusted machine, e.g. load it with diffusers/transformers "
    "and call save_pretrained(folder, safe_serialization=True)"
)
# transformers names its pickled weights pytorch_model.bin but its safetensors model.safetensors.
_BIN_STEMS = {"model": "pytorch_model"}
_SHARD_RE = r"-\d{5}-of-\d{5}\.safetensors"


class UnsafePickleError(ValueError):
    """A pickled checkpoint names a global that a plain state dict never needs."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _candidates(stem: str, variant: str | None) -> list[tuple[str, str]]:
    """(file name, kind) in the order they are looked for; kind is "single" or "index"."""
    v = f".{variant}" if variant else ""
    out = [(f"{stem}{v}.safetensors", "single")]
    # diffusers/transformers put the variant before the last suffix of the index name
    # (model.safetensors.index.fp16.json); the form with the variant after the stem is also seen.
    out.append((f"{stem}.safetensors.index{v}.json", "index"))
    if variant:
        out.append((f"{stem}{v}.safetensors.index.json", "index"))
    bin_stem = _BIN_STEMS.get(stem, stem)
    out.append((f"{bin_stem}{v}.bin", "single"))
    out.append((f"{bin_stem}.bin.index{v}.json", "index"))
    if variant:
        out.append((f"{bin_stem}{v}.bin.index.json", "index"))
    return out


def _variants_present(names: list[str], stem: str) -> list[str]:
    """Variants (e.g. "fp16") that weight files in `names` carry; "" is the plain weights."""
    stems = "|".join(re.escape(s) for s in {stem, _BIN_STEMS.get(stem, stem)})
    patterns = [
        rf"(?:{stems})(?:\.(?P<v>[^.]+))?\.(?:safetensors|bin)(?:\.index\.json)?",
        rf"(?:{stems})\.(?:safetensors|bin)\.index\.(?P<v>[^.]+)\.json",
    ]
    found = set()
    for name in names:
        for pattern in patterns:
            match = re.fullmatch(pattern, name)
            if match:
                found.add(match.group("v") or "")
    return sorted(found)


def _load_one(path: Path) -> dict[str, np.ndarray]:
    if path.name.endswith(".safetensors"):
        return safetensors.numpy.load_file(path)
    return load_torch_pickle(path)


def _load_sharded(index_path: Path) -> dict[str, np.ndarray]:
    """Merges the shards that a ``*.index.json`` names, checking they agree with the index."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path} is not a shard index (no weight_map): {err}") from err
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{index_path}: weight_map must map tensor names to shard file names")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        # The index is data: it must not make us read files outside the folder.
        if Path(shard).name != shard or shard in {".", ".."}:
            raise ValueError(f"{index_path} names shard {shard!r}, which is not in its folder")
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names shard {shard}, which is missing")
        tensors = _load_one(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            # Typically an interrupted rewrite that left shards of two layouts side by side.
            raise ValueError(
                f"{shard_path} does not match {index_path.name}: missing {missing[:5]}, "
                f"not in the index {extra[:5]}"
            )
        out.update(tensors)
    return out


def read_weights(
    folder: str | os.PathLike, *, stem: str, variant: str | None = None
) -> dict[str, np.ndarray]:
    """Reads the weights of one model folder of a diffusers pipeline.

    Looks for, in order: ``{stem}[.{variant}].safetensors``, its sharded index, then the PyTorch
    ``.bin`` file (``pytorch_model*.bin`` when `stem` is ``"model"``) and its sharded index.
    Safetensors wins when both exist (it is faster and cannot run code).

    Args:
        folder: one component folder, e.g. ``sd/unet``.
        stem: ``"diffusion_pytorch_model"`` (diffusers models) or ``"model"`` (transformers).
        variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.

    Returns:
        Flat dict of PyTorch key -> array, values exactly as stored.

    Raises:
        FileNotFoundError: no weights (with the names tried and the folder's contents), or no
            weights of `variant` (with the variants that exist).
        ValueError: a shard index that disagrees with its shards, or a ``.bin`` file that
            `load_torch_pickle` refuses.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no weights: model folder {folder} does not exist")
    candidates = _candidates(stem, variant)
    for name, kind in candidates:
        path = folder / name
        if path.is_file():
            return _load_sharded(path) if kind == "index" else _load_one(path)

    present = sorted(p.name for p in folder.iterdir())
    variants = _variants_present(present, stem)
    tried = ", ".join(name for name, _ in candidates)
    shown = ", ".join(present[:30]) + (
        f", ... ({len(present)} in all)" if len(present) > 30 else ""
    )
    if variant and variants:
        listed = ", ".join(repr(v) if v else "(no variant)" for v in variants)
        raise FileNotFoundError(
            f"{folder} has no weights of variant {variant!r} (tried {tried}); "
            f"variants present: {listed}"
        )
    hint = ""
    if not variant and variants:
        hint = f"; only variants {', '.join(repr(v) for v in variants)} exist: pass variant="
    raise FileNotFoundError(
        f"no {stem} weights in {folder}: tried {tried}; the folder holds: {shown or 'nothing'}{hint}"
    )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    # Makes the renames themselves durable; directories cannot be opened on Windows.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(key: object, value: object) -> np.ndarray:
    if not isinstance(key, str):
        raise TypeError(f"state dict keys must be str, got {key!r}")
    array = np.asarray(value)
    # safetensors copies raw memory from the data pointer: a strided view would be written as
    # garbage. Not np.ascontiguousarray, which turns 0-d arrays into 1-d ones.
    return array if array.flags.c_contiguous else array.copy(order="C")


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> Iterator[list[str]]:
    """Sorted keys cut into consecutive groups of at most `max_shard_bytes` (a tensor bigger
    than that gets a shard of its own; a tensor is never split)."""
    keys = sorted(sizes)
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        yield keys
        return
    group: list[str] = []
    total = 0
    for key in keys:
        if group and total + sizes[key] > max_shard_bytes:
            yield group
            group, total = [], 0
        group.append(key)
        total += sizes[key]
    if group:
        yield group


def write_weights(
    folder: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    *,
    stem: str,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Writes a state dict as safetensors, the layout ``from_pretrained`` reads.

    One ``{stem}.safetensors`` file, or, when `max_shard_bytes` is given and the weights are
    larger, shards ``{stem}-00001-of-0000N.safetensors`` plus ``{stem}.safetensors.index.json``.
    Every file is written to a temp name, fsynced and renamed into place (the index last, so it
    never names shards that are not there yet); afterwards the files of this stem that the new
    layout does not use (old single file, old shards, old index) are removed.

    Args:
        folder: the model folder (created if missing).
        state_dict: PyTorch key -> array; written bit for bit, strided views made contiguous.
        stem: ``"diffusion_pytorch_model"`` or ``"model"``.
        max_shard_bytes: largest shard size; None writes one file whatever the size.

    Returns:
        The paths written: the single file, or the shards followed by the index.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {key: _contiguous(key, value) for key, value in state_dict.items()}
    groups = list(_plan_shards({k: a.nbytes for k, a in arrays.items()}, max_shard_bytes))
    # "format": "pt" is what diffusers/transformers check before loading a safetensors file.
    metadata = {"format": "pt"}

    def saver(keys: list[str]) -> Callable[[Path], None]:
        return lambda tmp: safetensors.numpy.save_file(
            {k: arrays[k] for k in keys}, tmp, metadata=metadata
        )

    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    written: list[Path] = []
    if len(groups) == 1:
        atomic_write(single, saver(groups[0]))
        written.append(single)
    else:
        weight_map = {}
        for i, keys in enumerate(groups, start=1):
            shard = folder / f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
            atomic_write(shard, saver(keys))
            written.append(shard)
            weight_map.update(dict.fromkeys(keys, shard.name))
        text = json.dumps(
            {
                "metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                "weight_map": weight_map,
            },
            indent=2,
            sort_keys=True,
        )
        atomic_write_text(index, text + "\n")
        written.append(index)

    # Only now that the new layout is complete: a stale index next to a new single file (or an
    # old single file next to new shards) would make loaders read a different set of weights.
    shard_re = re.escape(stem) + _SHARD_RE
    stale = [single, index, *(p for p in folder.iterdir() if re.fullmatch(shard_re, p.name))]
    for path in stale:
        if path not in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    _fsync_dir(folder)
    return written


# ---------------------------------------------------------------------------------------------
# Restricted reader of torch.save zip checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TorchType:
    """Stand-in for a ``torch.*Storage`` class or a ``torch.<dtype>`` object.

    Frozen with slots: a pickle's BUILD opcode cannot change these shared singletons.
    """

    name: str
    dtype: np.dtype


@dataclass(slots=True)
class _Storage:
    """Stand-in for a storage: the raw bytes of ``data/<key>`` and their element type."""

    raw: np.ndarray  # uint8, as stored
    dtype: np.dtype
    byteorder: str

    def typed(self, dtype: np.dtype) -> np.ndarray:
        """The bytes as a 1-d array of `dtype` in native byte order."""
        if self.raw.size % dtype.itemsize:
            raise ValueError(f"storage of {self.raw.size} bytes is no whole number of {dtype}")
        if self.byteorder == sys.byteorder or dtype.itemsize == 1:
            return self.raw.view(dtype)
        # Swapped as unsigned ints: ml_dtypes types need not implement byteswap.
        return self.raw.view(f"u{dtype.itemsize}").byteswap().view(dtype)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# torch.<dtype> objects: arguments of _rebuild_tensor_v3, which torch.save uses (with an
# UntypedStorage) for dtypes that have no *Storage class (uint16..uint64, float8).
_TORCH_DTYPES = {
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
    "double": np.float64,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
_UNTYPED = _TorchType("UntypedStorage", np.dtype(np.uint8))


def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"tensor {what} must be non-negative ints, got {value!r}")
    return tuple(value)


def _strided_copy(flat: np.ndarray, offset: object, size: object, stride: object) -> np.ndarray:
    """A C-contiguous copy of the view (offset, size, stride) into `flat`, all in elements."""
    (offset,) = _ints((offset,), "storage offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in length")
    if 0 in size:
        return np.empty(size, flat.dtype)
    # as_strided does no bounds check: a crafted file must not make us read past the storage.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise ValueError(
            f"tensor (offset {offset}, size {size}, stride {stride}) exceeds its storage of "
            f"{flat.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False
    )
    return np.array(view, order="C", copy=True)  # independent of the shared storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    # requires_grad, backward_hooks and metadata say nothing about the values.
    if not isinstance(storage, _Storage):
        raise ValueError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    return _strided_copy(storage.typed(storage.dtype), storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchType):
        raise ValueError("_rebuild_tensor_v3 needs a storage and a torch dtype")
    return _strided_copy(storage.typed(dtype.dtype), storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    # A Parameter is its tensor plus requires_grad (and, with state, python attributes).
    if not isinstance(data, np.ndarray):
        raise ValueError(f"_rebuild_parameter got {type(data).__name__}, not a tensor")
    return data


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "UntypedStorage"): _UNTYPED,
        ("torch.storage", "UntypedStorage"): _UNTYPED,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed["torch", name] = _TorchType(name, np.dtype(dtype))
    for name, dtype in _TORCH_DTYPES.items():
        allowed["torch", name] = _TorchType(name, np.dtype(dtype))
    return allowed


_ALLOWED = _allowed_globals()


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip checkpoint, resolving only state-dict globals."""

    def __init__(self, file, *, path: Path, archive: zipfile.ZipFile, prefix: str, order: str):
        super().__init__(file)
        self._path, self._archive, self._prefix, self._order = path, archive, prefix, order
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> object:
        # Never imports or looks up anything: unknown names are refused, known ones are ours.
        try:
            return _ALLOWED[module, name]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._path} refers to {module}.{name}, which a plain state dict does not "
                f"need; refusing to load it (loading could run code). To use it, {_FIX_HINT}"
            ) from None

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"{self._path}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _TorchType) or not isinstance(key, str):
            raise ValueError(f"{self._path}: bad storage reference {pid!r}")
        if key in self._storages:  # views of one storage share it: read the bytes once
            storage = self._storages[key]
            if storage.dtype != storage_type.dtype:
                raise ValueError(f"{self._path}: storage {key} used as two dtypes")
            return storage
        (numel,) = _ints((numel,), "storage size")
        nbytes = numel * storage_type.dtype.itemsize
        try:
            data = self._archive.read(f"{self._prefix}/data/{key}")
        except KeyError:
            raise ValueError(f"{self._path}: storage data/{key} is missing") from None
        if len(data) < nbytes:
            raise ValueError(f"{self._path}: storage {key} has {len(data)} of {nbytes} bytes")
        raw = np.frombuffer(data, np.uint8, count=nbytes)
        storage = _Storage(raw, storage_type.dtype, self._order)
        self._storages[key] = storage
        return storage


def load_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``torch.save`` state dict (zip format, torch >= 1.6) without torch or pickle risk.

    Only the globals a state dict needs resolve, each to a stand-in of this module (tensors
    become numpy arrays; bf16 as ``ml_dtypes.bfloat16``); anything else is refused before it is
    called. Views that share a storage (slices, transposes) come out as independent copies.

    Args:
        path: a ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin`` style file.

    Returns:
        Flat dict of key -> C-contiguous array.

    Raises:
        UnsafePickleError: the pickle names any other global (e.g. ``os.system``).
        ValueError: not a zip checkpoint (legacy torch < 1.6 format or a plain pickle), a
            malformed one, or not a flat dict of tensors (e.g. a training checkpoint).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a zip-format torch checkpoint (a legacy torch < 1.6 file or a plain "
            f"pickle), which cannot be read safely; {_FIX_HINT}"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip but not a torch checkpoint (no <name>/data.pkl)")
        prefix = pickles[0].rsplit("/", 1)[0]
        try:  # torch writes no byteorder record before 1.12: those files are little-endian
            order = archive.read(f"{prefix}/byteorder").decode("ascii", "replace")
        except KeyError:
            order = "little"
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {order!r}")
        with archive.open(pickles[0]) as f:
            unpickler = _StateDictUnpickler(
                f, path=path, archive=archive, prefix=prefix, order=order
            )
            try:
                obj = unpickler.load()
            except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}: corrupt or unsupported checkpoint: {err}") from err

    if isinstance(obj, dict):
        nested = [k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)]
        bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
        if nested and bad:
            raise ValueError(
                f"{path} holds a training checkpoint, its weights nested under {nested[0]!r}, "
                f"not a flat state dict; save that dict alone, or {_FIX_HINT}"
            )
        if not bad:
            return dict(obj)
        raise ValueError(f"{path}: entries that are not tensors: {[str(k) for k in bad[:5]]}")
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
