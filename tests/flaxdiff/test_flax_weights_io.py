"""flaxdiff.models.weights_io: safetensors/.bin files <-> numpy state dicts, and pickle safety."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from flaxdiff.models import weights_io
from flaxdiff.models.weights_io import (
    UnsafePickleError,
    load_torch_pickle,
    read_weights,
    write_weights,
)

UNET = "diffusion_pytorch_model"
ROOT = Path(__file__).resolve().parents[2]


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-exact equality (NaN payloads and -0.0 included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def assert_dicts_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert_same(got[key], want[key])


def random_bits(shape, dtype, seed=0) -> np.ndarray:
    """Arbitrary bit patterns of `dtype` (NaNs, infs, subnormals), for bit-exactness checks."""
    dtype = np.dtype(dtype)
    words = np.random.default_rng(seed).integers(0, 256, size=(*shape, dtype.itemsize))
    return words.astype(np.uint8).view(dtype).reshape(shape)


def torch_like_zip(path: Path, pkl: bytes, storages=None, byteorder: bytes | None = b"little"):
    """A zip laid out like torch.save's: <archive>/data.pkl, data/<key>, byteorder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


# ---------------------------------------------------------------------------------------------
# .bin files written by torch.save
# ---------------------------------------------------------------------------------------------


def to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: go through the bits
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.detach().contiguous().numpy()


def test_bin_dtypes_are_exact(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.tensor([-(2**62), 0, 7, 2**62]),
        "i32": torch.tensor([-5, 6], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "u16": torch.tensor([1, 65535], dtype=torch.int32).to(torch.uint16),
        "f8": torch.tensor([0.5, -448.0]).to(torch.float8_e4m3fn),
    }
    torch.save(sd, tmp_path / "w.bin")
    got = load_torch_pickle(tmp_path / "w.bin")
    assert sorted(got) == sorted(sd)
    for key in ["f32", "f16", "f64", "i64", "i32", "i16", "i8", "u8", "bool"]:
        assert_same(got[key], sd[key].numpy())
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    assert_same(got["bf16"], to_numpy(sd["bf16"]))
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), sd["bf16"].float().numpy())
    # uint16 and float8 are saved through _rebuild_tensor_v3 with an UntypedStorage.
    assert got["u16"].dtype == np.uint16 and got["u16"].tolist() == [1, 65535]
    assert got["f8"].dtype == ml_dtypes.float8_e4m3fn
    assert got["f8"].astype(np.float32).tolist() == [0.5, -448.0]


def test_bin_views_of_shared_storages(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "base": base,
        "transposed": base.t(),  # strides (1, 6)
        "slice": base[1:3, 2:5],  # storage offset 8, non-contiguous
        "row": base[3],
        "every_other": base.view(-1)[1::2],
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "scalar_view": base[2, 1],  # 0-d view into the shared storage
        "empty": base[:, :0],
    }
    torch.save(sd, tmp_path / "w.bin")
    got = load_torch_pickle(tmp_path / "w.bin")
    for key, tensor in sd.items():
        assert_same(got[key], tensor.contiguous().numpy())
        assert got[key].flags.c_contiguous
    assert got["slice"].tolist() == [[8.0, 9.0, 10.0], [14.0, 15.0, 16.0]]
    assert got["scalar"].shape == () and got["scalar"] == 3.5
    assert got["scalar_view"].shape == () and got["scalar_view"] == 13.0
    # Copies: writing one array does not show through another that shared its storage.
    got["base"][0, 0] = -1.0
    assert got["transposed"][0, 0] == 0.0


def test_bin_module_state_dict_and_parameters(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2)
    ).to(torch.bfloat16)
    state = module.state_dict()
    torch.save(state, tmp_path / "plain.bin")
    # keep_vars=True keeps nn.Parameter objects (pickled via _rebuild_parameter); a Parameter
    # with a python attribute goes through _rebuild_parameter_with_state.
    with_params = module.state_dict(keep_vars=True)
    with_params["0.weight"].tag = "extra state"
    torch.save(with_params, tmp_path / "params.bin")
    for name in ["plain.bin", "params.bin"]:
        got = load_torch_pickle(tmp_path / name)
        assert type(got) is dict and list(got) == list(state)
        for key, tensor in state.items():
            assert_same(got[key], to_numpy(tensor))
    assert got["1.num_batches_tracked"].dtype == np.int64
    assert got["0.weight"].shape == (4, 3, 3, 3)


def test_bin_big_endian_byteorder_is_respected(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"w": torch.randn(3, 2).t(), "h": torch.randn(4).bfloat16(), "b": torch.tensor([True])}
    torch.save(sd, tmp_path / "little.bin")
    # Rewrite the archive as a big-endian machine would have saved it: same pickle, storages
    # byte-swapped element by element, byteorder "big".
    itemsize = {"0": 4, "1": 2, "2": 1}
    with zipfile.ZipFile(tmp_path / "little.bin") as src:
        prefix = src.namelist()[0].split("/")[0]
        storages = {}
        for key, size in itemsize.items():
            raw = np.frombuffer(src.read(f"{prefix}/data/{key}"), f"<u{size}")
            storages[key] = raw.astype(f">u{size}").tobytes()
        pkl = src.read(f"{prefix}/data.pkl")
    torch_like_zip(tmp_path / "big.bin", pkl, storages, byteorder=b"big")
    got = load_torch_pickle(tmp_path / "big.bin")
    assert_same(got["w"], to_numpy(sd["w"]))
    assert_same(got["h"], to_numpy(sd["h"]))
    assert got["b"].tolist() == [True]
    # Without a byteorder record the file is little-endian (torch < 1.12 wrote none).
    with zipfile.ZipFile(tmp_path / "little.bin") as src:
        entries = {n.split("/", 2)[-1]: src.read(n) for n in src.namelist() if "/data/" in n}
    torch_like_zip(tmp_path / "old.bin", pkl, entries, byteorder=None)
    assert_same(load_torch_pickle(tmp_path / "old.bin")["w"], to_numpy(sd["w"]))


# ---------------------------------------------------------------------------------------------
# Safety of the restricted unpickler
# ---------------------------------------------------------------------------------------------


class Reduce:
    """Unpickles as func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def raw_global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-0 pickle of module.name(arg), for names pickle.dumps would spell differently."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize("attack", ["os.system", "posix.system", "builtins.eval", "nested"])
def test_malicious_pickle_is_refused_before_running(tmp_path, attack):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    if attack == "os.system":
        pkl = raw_global_call("os", "system", command)
    elif attack == "posix.system":
        pkl = pickle.dumps(Reduce(os.system, command), protocol=2)  # pickles as posix.system
    elif attack == "builtins.eval":
        code = f"open({str(marker)!r}, 'w').close()"
        # Protocol 4 (STACK_GLOBAL); protocol 2 would spell the module __builtin__.
        pkl = pickle.dumps({"w": Reduce(eval, code)}, protocol=4)
    else:  # hidden inside an OrderedDict, as in a real state dict
        pkl = pickle.dumps(OrderedDict(w=Reduce(os.system, command)), protocol=2)
    path = torch_like_zip(tmp_path / "evil.bin", pkl)
    with pytest.raises(UnsafePickleError) as err:
        load_torch_pickle(path)
    message = str(err.value)
    assert str(path) in message and "safetensors" in message and "save_pretrained" in message
    expected = {"os.system": "os.system", "builtins.eval": "builtins.eval"}.get(attack)
    assert f"{expected or os.system.__module__ + '.system'}" in message
    assert not marker.exists()
    # read_weights goes through the same loader.
    path.rename(tmp_path / f"{UNET}.bin")
    with pytest.raises(UnsafePickleError):
        read_weights(tmp_path, stem=UNET)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch", "load"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("collections", "defaultdict"),
        ("torch._utils", "_rebuild_tensor_v2.__globals__"),
    ],
)
def test_near_miss_globals_are_refused(tmp_path, module, name):
    path = torch_like_zip(tmp_path / "w.bin", raw_global_call(module, name, "x"))
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}".replace(".", r"\.")):
        load_torch_pickle(path)


def test_non_zip_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.bin"
    plain.write_bytes(pickle.dumps(Reduce(os.system, f"touch {marker}")))
    with pytest.raises(ValueError, match="not a zip-format") as err:
        load_torch_pickle(plain)
    assert not isinstance(err.value, UnsafePickleError) and str(plain) in str(err.value)
    assert "safetensors" in str(err.value)
    assert not marker.exists()
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a zip-format"):
        load_torch_pickle(tmp_path / "legacy.bin")


def test_training_checkpoints_and_non_tensors_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.bin")
    with pytest.raises(ValueError, match="nested under 'state_dict'"):
        load_torch_pickle(tmp_path / "ckpt.bin")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "mixed.bin")
    with pytest.raises(ValueError, match=r"not tensors.*step"):
        load_torch_pickle(tmp_path / "mixed.bin")
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="holds a list"):
        load_torch_pickle(tmp_path / "list.bin")


def test_strides_past_the_storage_are_refused(tmp_path):
    torch = pytest.importorskip("torch")

    class Storage:
        pass

    storage = Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is storage else None

    def dump(size, stride, offset=0):
        buf = io.BytesIO()
        rebuild = torch._utils._rebuild_tensor_v2
        Pickler(buf, protocol=2).dump(
            {"w": Reduce(rebuild, storage, offset, size, stride, False, OrderedDict())}
        )
        data = np.arange(4, dtype=np.float32).tobytes()
        return torch_like_zip(tmp_path / "w.bin", buf.getvalue(), {"0": data})

    # The hand-made file is well-formed when it stays inside the 4 floats...
    assert load_torch_pickle(dump((2, 2), (1, 2)))["w"].tolist() == [[0.0, 2.0], [1.0, 3.0]]
    assert load_torch_pickle(dump((1,), (1,), offset=3))["w"].tolist() == [3.0]
    # ...and refused (not read out of bounds) when it does not.
    for size, stride, offset in [((100,), (1,), 0), ((2,), (4,), 0), ((1,), (1,), 4)]:
        with pytest.raises(ValueError, match="exceeds its storage"):
            load_torch_pickle(dump(size, stride, offset))
    with pytest.raises(ValueError, match="non-negative"):
        load_torch_pickle(dump((2,), (-1,), 1))


def test_module_imports_neither_torch_nor_jax():
    code = (
        "import sys, flaxdiff.models.weights_io\n"
        "print(sorted({'torch', 'jax'} & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# safetensors writing
# ---------------------------------------------------------------------------------------------


def sample_state() -> dict[str, np.ndarray]:
    return {
        "a.f32": random_bits((3, 5), np.float32, seed=1),
        "b.bf16": random_bits((4, 2), ml_dtypes.bfloat16, seed=2),
        "c.f16": random_bits((7,), np.float16, seed=3),
        "d.i64": np.array([-(2**63), 2**63 - 1]),
        "e.bool": np.array([[True, False]]),
        "f.scalar": np.float32(2.5) * np.ones((), np.float32),
    }


def test_round_trip_is_bit_exact_including_strided_views(tmp_path):
    state = sample_state()
    big = random_bits((6, 8), np.float32, seed=4)
    state["g.transposed"] = big.T
    state["h.strided"] = big[::2, 1::3]
    assert not state["g.transposed"].flags.c_contiguous
    assert not state["h.strided"].flags.c_contiguous
    written = write_weights(tmp_path, state, stem=UNET)
    assert written == [tmp_path / f"{UNET}.safetensors"]
    got = read_weights(tmp_path, stem=UNET)
    assert_dicts_same(got, {k: np.ascontiguousarray(v).reshape(v.shape) for k, v in state.items()})
    assert got["b.bf16"].dtype == ml_dtypes.bfloat16 and got["f.scalar"].shape == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{UNET}.safetensors"]


def test_written_file_loads_in_torch_with_pt_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = sample_state()
    (path,) = write_weights(tmp_path, state, stem="model")
    assert path.name == "model.safetensors"
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = load_file(path)
    assert loaded["b.bf16"].dtype == torch.bfloat16
    for key, value in state.items():
        assert_same(to_numpy(loaded[key]), value)


def test_sharded_write_and_read(tmp_path):
    state = {f"layer{i}.w": np.full((100,), i, np.float32) for i in range(5)}  # 400 bytes each
    state["huge"] = np.zeros((300,), np.float32)  # 1200 bytes: bigger than a shard, kept whole
    written = write_weights(tmp_path, state, stem=UNET, max_shard_bytes=1000)
    shards = [f"{UNET}-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [p.name for p in written] == [*shards, f"{UNET}.safetensors.index.json"]
    index = json.loads((tmp_path / f"{UNET}.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5 * 400 + 1200}
    # Sorted keys, cut greedily: huge | layer0, layer1 | layer2, layer3 | layer4.
    assert index["weight_map"] == {
        "huge": shards[0],
        "layer0.w": shards[1],
        "layer1.w": shards[1],
        "layer2.w": shards[2],
        "layer3.w": shards[2],
        "layer4.w": shards[3],
    }
    for shard in shards:
        in_shard = safetensors.numpy.load_file(tmp_path / shard)
        assert sorted(in_shard) == sorted(k for k, v in index["weight_map"].items() if v == shard)
    assert not (tmp_path / f"{UNET}.safetensors").exists()
    assert_dicts_same(read_weights(tmp_path, stem=UNET), state)
    # Small enough for one file: max_shard_bytes does not force shards.
    small = {"w": np.ones(10, np.float32)}
    assert write_weights(tmp_path / "s", small, stem=UNET, max_shard_bytes=1000) == [
        tmp_path / "s" / f"{UNET}.safetensors"
    ]


def test_rewrites_remove_stale_layouts(tmp_path):
    state = {f"k{i}": np.full((100,), i, np.float32) for i in range(6)}
    (tmp_path / "model.safetensors").write_bytes(b"other stem")  # not ours: left alone
    write_weights(tmp_path, state, stem=UNET, max_shard_bytes=800)
    assert len(list(tmp_path.glob(f"{UNET}-*-of-00003.safetensors"))) == 3
    # Fewer, bigger shards: the three old shards go.
    write_weights(tmp_path, state, stem=UNET, max_shard_bytes=1200)
    assert sorted(p.name for p in tmp_path.glob(f"{UNET}*")) == [
        f"{UNET}-00001-of-00002.safetensors",
        f"{UNET}-00002-of-00002.safetensors",
        f"{UNET}.safetensors.index.json",
    ]
    # Unsharded: no index left pointing at shards.
    new = {"only": np.arange(3, dtype=np.float32)}
    write_weights(tmp_path, new, stem=UNET)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{UNET}.safetensors",
        "model.safetensors",
    ]
    assert (tmp_path / "model.safetensors").read_bytes() == b"other stem"
    assert_dicts_same(read_weights(tmp_path, stem=UNET), new)
    # And back to shards: the single file goes (it would win over the index when loading).
    write_weights(tmp_path, state, stem=UNET, max_shard_bytes=1200)
    assert not (tmp_path / f"{UNET}.safetensors").exists()
    assert_dicts_same(read_weights(tmp_path, stem=UNET), state)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    old = {"w": np.arange(4, dtype=np.float32)}
    write_weights(tmp_path, old, stem=UNET)
    before = (tmp_path / f"{UNET}.safetensors").read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(weights_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_weights(tmp_path, {"w": np.zeros(4, np.float32)}, stem=UNET)
    assert (tmp_path / f"{UNET}.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [f"{UNET}.safetensors"]  # no temp left


def test_crash_between_shards_leaves_the_old_weights_readable(tmp_path, monkeypatch):
    old = {"w": np.arange(4, dtype=np.float32)}
    write_weights(tmp_path, old, stem=UNET)
    real_replace = os.replace
    calls = []

    def replace_once(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise KeyboardInterrupt  # killed after the first shard was renamed into place
        real_replace(src, dst)

    monkeypatch.setattr(weights_io.os, "replace", replace_once)
    new = {f"k{i}": np.full((100,), i, np.float32) for i in range(3)}
    with pytest.raises(KeyboardInterrupt):
        write_weights(tmp_path, new, stem=UNET, max_shard_bytes=500)
    # The old single file is still there and still wins; no index names a half-written layout.
    assert_dicts_same(read_weights(tmp_path, stem=UNET), old)
    assert not (tmp_path / f"{UNET}.safetensors.index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# read_weights: search order, variants, errors
# ---------------------------------------------------------------------------------------------


def test_safetensors_is_preferred_over_bin(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(2)}, tmp_path / f"{UNET}.bin")
    assert read_weights(tmp_path, stem=UNET)["w"].tolist() == [0.0, 0.0]
    write_weights(tmp_path, {"w": np.ones(2, np.float32)}, stem=UNET)
    assert read_weights(tmp_path, stem=UNET)["w"].tolist() == [1.0, 1.0]


def test_transformers_bin_names_and_sharded_bin(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.full((3,), 2.0)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "metadata": {"total_size": 20},
        "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
        },
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    got = read_weights(tmp_path, stem="model")
    assert got["a"].tolist() == [1.0, 1.0] and got["b"].tolist() == [2.0, 2.0, 2.0]
    # A plain pytorch_model.bin comes before the sharded .bin index.
    torch.save({"c": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert list(read_weights(tmp_path, stem="model")) == ["c"]


def test_variants(tmp_path):
    write_weights(tmp_path, {"w": np.ones(2, np.float32)}, stem=UNET)
    write_weights(tmp_path, {"w": np.ones(2, np.float16)}, stem=f"{UNET}.fp16")
    assert (tmp_path / f"{UNET}.safetensors").exists()  # another stem: left alone
    assert read_weights(tmp_path, stem=UNET, variant="fp16")["w"].dtype == np.float16
    assert read_weights(tmp_path, stem=UNET)["w"].dtype == np.float32
    with pytest.raises(FileNotFoundError) as err:
        read_weights(tmp_path, stem=UNET, variant="ema")
    message = str(err.value)
    assert "'ema'" in message and "'fp16'" in message and "(no variant)" in message
    # Sharded variant: the index name carries the variant before .json, as diffusers writes it.
    sub = tmp_path / "sharded"
    big = {f"k{i}": np.full((100,), i, np.float16) for i in range(3)}
    write_weights(sub, big, stem=UNET, max_shard_bytes=300)
    (sub / f"{UNET}.safetensors.index.json").rename(sub / f"{UNET}.safetensors.index.fp16.json")
    assert_dicts_same(read_weights(sub, stem=UNET, variant="fp16"), big)
    with pytest.raises(FileNotFoundError, match="variant="):
        read_weights(sub, stem=UNET)  # only a variant exists: the error says how to ask for it


def test_nothing_found_names_folder_and_tries(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        read_weights(tmp_path, stem=UNET)
    message = str(err.value)
    assert str(tmp_path) in message and "config.json" in message
    assert f"{UNET}.safetensors" in message and f"{UNET}.bin" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_weights(tmp_path / "missing", stem="model")


def test_bad_indexes_are_refused(tmp_path):
    state = {f"k{i}": np.full((100,), i, np.float32) for i in range(3)}
    write_weights(tmp_path, state, stem=UNET, max_shard_bytes=500)
    index_path = tmp_path / f"{UNET}.safetensors.index.json"
    index = json.loads(index_path.read_text())
    # An index that points outside the folder is not followed.
    index["weight_map"]["k0"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not in its folder"):
        read_weights(tmp_path, stem=UNET)
    # Shards of another layout than the index's (an interrupted rewrite) are detected.
    index["weight_map"]["k0"] = index["weight_map"]["k2"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not match"):
        read_weights(tmp_path, stem=UNET)
