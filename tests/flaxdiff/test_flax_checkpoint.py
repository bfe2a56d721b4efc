"""flaxdiff.checkpoint: the orbax train state inside the shared checkpoint folder.

In process (one device): a bit-exact round trip of a train state with an optax AdamW state, the
shared files and `verify`, the non-finite refusal, one-line errors for a damaged or mismatched
checkpoint. In subprocesses: 8 virtual devices (mesh -> smaller mesh, one device, pmap and back)
and two real JAX processes writing one checkpoint collectively.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from flaxdiff import checkpoint
from shared.errors import CheckpointError, TrainingError
from shared.run import checkpoints
from shared.run.process import ProcessGroup

ROOT = Path(__file__).resolve().parents[2]
CONFIG_TEXT = "train_batch_size: 2\n"


def host_state(seed=0, ema=True):
    """A train state as the trainer holds it, in numpy: AdamW after one update, EMA, key data.

    The subprocesses import it from this file, so that every process builds the same values.
    """
    rng = np.random.default_rng(seed)
    params = {
        "conv": {
            "kernel": rng.standard_normal((8, 3, 2), np.float32),
            "bias": rng.standard_normal((3,), np.float32),
        },
        "norm": {"scale": rng.standard_normal((4,)).astype(jnp.bfloat16)},
    }
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    state = {
        "step": np.int32(7),
        "params": params,
        "opt_state": opt_state,
        "ema": jax.tree.map(lambda p: p * 0.5, params) if ema else None,
        "rng": jax.random.key_data(jax.random.key(seed)),
        "ema_step": np.int32(6),
    }
    return jax.tree.map(np.asarray, state)


def assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()


def device_state(**kwargs):
    return jax.tree.map(jnp.asarray, host_state(**kwargs))


def save(output_dir, state, step=7, **kwargs):
    return checkpoint.save(
        output_dir,
        state,
        group=checkpoint.process_group(),
        step=step,
        trainer_state={"global_step": step, "epoch": 1},
        config_text=CONFIG_TEXT,
        loader_state={"epoch": 1, "position": 12},
        limit=kwargs.pop("limit", 2),
        **kwargs,
    )


def all_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One committed checkpoint (tests that damage it work on a copy)."""
    output_dir = tmp_path_factory.mktemp("run")
    state = device_state()
    return output_dir, save(output_dir, state), state


def test_process_group_of_one_process_is_the_trivial_group():
    assert checkpoint.process_group() == ProcessGroup()


def test_round_trip_is_bit_exact_through_the_shared_folder(saved):
    output_dir, folder, state = saved
    assert folder == output_dir / "checkpoint-7"
    names = all_files(folder)
    for shared_file in ("trainer_state.json", "manifest.json", "data_0.json", "config.yaml"):
        assert shared_file in names
    tree = json.loads((folder / "state_tree.json").read_text())["arrays"]
    assert tree["params/conv/kernel"] == {"dtype": "float32", "shape": [8, 3, 2]}
    assert tree["opt_state/0/mu/norm/scale"] == {"dtype": "bfloat16", "shape": [4]}
    assert tree["rng"] == {"dtype": "uint32", "shape": [2]}
    assert any(name.startswith("state/") for name in names)
    # orbax renamed its own temporary folder before returning, and the shared commit renamed
    # checkpoint-7.tmp: only finished files are left, and the manifest lists every one of them.
    assert not [name for name in names if "tmp" in name]
    assert sorted(os.listdir(output_dir)) == ["checkpoint-7"]
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {name for name in names if (folder / name).is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    assert checkpoints.verify(folder) == []
    assert checkpoints.find_resume(output_dir, "latest") == folder
    assert checkpoints.read_trainer_state(folder)["global_step"] == 7
    assert checkpoints.read_loader_state(folder, 0) == {"epoch": 1, "position": 12}
    assert (folder / "config.yaml").read_text() == CONFIG_TEXT

    restored = checkpoint.restore(folder, checkpoint.abstract_of(state))
    assert_bit_equal(restored, host_state())
    # optax's own state types come back (the optimizer's update accepts it as it is).
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
    assert (
        restored["params"]["conv"]["kernel"].sharding == state["params"]["conv"]["kernel"].sharding
    )
    # An abstract without shardings (eval_shape of the init) restores onto the first device.
    abstract = jax.eval_shape(lambda s: s, host_state())
    assert_bit_equal(checkpoint.restore(folder, abstract), host_state())


def test_a_later_save_replaces_and_prunes(tmp_path):
    state = device_state()
    save(tmp_path, state, step=7)
    newer = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    folder = save(tmp_path, newer, step=8, limit=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-8"]
    assert_bit_equal(checkpoint.restore(folder, checkpoint.abstract_of(state)), newer)


@pytest.mark.parametrize("where", ["params", "ema"])
def test_a_non_finite_weight_refuses_to_write(tmp_path, where):
    state = device_state()
    state[where]["conv"]["bias"] = state[where]["conv"]["bias"].at[1].set(jnp.nan)
    assert not checkpoint.all_finite(state)
    with pytest.raises(TrainingError, match="not finite at step 7"):
        save(tmp_path / "run", state)
    assert not (tmp_path / "run").exists()


def test_finite_ignores_the_optimizer_and_integer_leaves_and_a_missing_ema():
    state = device_state(ema=False)
    state["opt_state"][0].mu["conv"]["bias"] = jnp.full((3,), jnp.inf)
    assert checkpoint.all_finite(state)


def test_restore_names_a_missing_state_folder_or_tree(tmp_path, saved):
    _, folder, state = saved
    copy = shutil.copytree(folder, tmp_path / "checkpoint-7")
    (copy / "state_tree.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-7: state_tree.json is missing"):
        checkpoint.restore(copy, checkpoint.abstract_of(state))
    shutil.rmtree(copy / "state")
    with pytest.raises(CheckpointError, match=r"checkpoint-7: it has no state/ folder") as info:
        checkpoint.restore(copy, checkpoint.abstract_of(state))
    assert "\n" not in str(info.value)


def test_restore_refuses_damaged_data_in_one_line(tmp_path, saved):
    _, folder, state = saved
    copy = shutil.copytree(folder, tmp_path / "checkpoint-7")
    for file in (copy / "state").rglob("*"):
        if file.is_file() and file.parent.name == "d":
            file.write_bytes(b"")  # truncated array data
    assert checkpoints.verify(copy)  # the shared manifest catches it first when resuming
    with pytest.raises(CheckpointError, match="cannot read state/") as info:
        checkpoint.restore(copy, checkpoint.abstract_of(state))
    assert "\n" not in str(info.value)


def test_restore_refuses_a_state_of_another_run(saved):
    _, folder, state = saved
    without_ema = dict(state, ema=None)
    with pytest.raises(CheckpointError, match=r"ema/conv/bias is only in the checkpoint"):
        checkpoint.restore(folder, checkpoint.abstract_of(without_ema))
    wider = dict(state, params=dict(state["params"], conv={"kernel": jnp.zeros((8, 3, 3))}))
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(folder, checkpoint.abstract_of(wider))
    message = str(info.value)
    assert "params/conv/bias is only in the checkpoint" in message
    assert "params/conv/kernel is float32[8, 3, 2] in the checkpoint, float32[8, 3, 3]" in message
    assert "\n" not in message
    # A different dtype would be cast silently by orbax: refused, a resume is exact.
    bf16 = dict(state, rng=state["rng"].astype(jnp.int32))
    with pytest.raises(CheckpointError, match=r"rng is uint32\[2\] in the checkpoint, int32\[2\]"):
        checkpoint.restore(folder, checkpoint.abstract_of(bf16))


def test_typed_prng_keys_and_unknown_layouts_are_refused(tmp_path):
    state = dict(device_state(), rng=jax.random.key(0))
    with pytest.raises(TypeError, match="key_data"):
        save(tmp_path, state)
    with pytest.raises(ValueError, match="layout 'data'"):
        save(tmp_path, device_state(), layout="data")


def test_tiny_unet_params_round_trip(tmp_path):
    """The real parameter tree of a model (nnx paths with integer keys, 300 leaves)."""
    from flax import nnx

    from flaxdiff.models.convert import init_model

    config = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())["model"]
    params = nnx.to_pure_dict(nnx.state(init_model(config["unet_config"], seed=0), nnx.Param))
    state = {"step": jnp.int32(3), "params": params, "ema": None}
    folder = save(tmp_path, state, step=3)
    assert_bit_equal(checkpoint.restore(folder, checkpoint.abstract_of(state)), state)


# The subprocesses build their state with this file's helpers.
IMPORTS = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import numpy as np
    import jax
    from test_flax_checkpoint import assert_bit_equal, host_state
    """
)

# --- 8 virtual devices ----------------------------------------------------------------------------

MESH_SCRIPT = IMPORTS + textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import flax.jax_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
    from flaxdiff import checkpoint

    assert jax.device_count() == 8
    output_dir = Path(sys.argv[1])

    def mesh_of(data, fsdp):
        devices = np.array(jax.devices()[: data * fsdp]).reshape(data, fsdp)
        return Mesh(devices, ("data", "fsdp"))

    def shardings_of(tree, mesh):
        # Weights and moments sharded over fsdp on their first axis, scalars and rng replicated.
        def one(x):
            fsdp = x.ndim >= 2 or (x.ndim == 1 and x.shape[0] % mesh.shape["fsdp"] == 0
                                   and x.shape[0] > 2)
            return NamedSharding(mesh, P("fsdp") if fsdp else P())
        return jax.tree.map(one, tree)

    def saved(state, **kwargs):
        step = int(np.asarray(state["step"]).reshape(-1)[0])
        return checkpoint.save(
            output_dir, state, group=checkpoint.process_group(), step=step,
            trainer_state={}, config_text="", loader_state={"epoch": 0, "position": 0},
            limit=None, **kwargs)

    host = host_state()
    big = mesh_of(4, 2)
    state = jax.tree.map(jax.device_put, host, shardings_of(host, big))
    assert len(state["params"]["conv"]["kernel"].sharding.device_set) == 8
    assert state["params"]["conv"]["kernel"].addressable_shards[0].data.shape == (4, 3, 2)
    folder = saved(state)
    abstract = jax.eval_shape(lambda: host)

    def check(restored, wanted):
        assert_bit_equal(restored, host)
        for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(wanted)):
            assert leaf.sharding == sharding, (leaf.sharding, sharding)

    small = mesh_of(2, 2)
    wanted = shardings_of(host, small)
    check(checkpoint.restore(folder, abstract, wanted), wanted)
    one = SingleDeviceSharding(jax.devices()[5])
    check(checkpoint.restore(folder, abstract, one), jax.tree.map(lambda _: one, host))
    # fsdp 2 -> fsdp 4: the abstract's own shardings say where each array goes.
    wide = shardings_of(host, mesh_of(2, 4))
    wide_abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, wide)
    check(checkpoint.restore(folder, wide_abstract), wide)

    # mesh -> pmap: one replica per device, usable by jax.pmap as it is.
    replicated = flax.jax_utils.replicate(host)
    pmapped = checkpoint.restore(folder, checkpoint.abstract_of(replicated), layout="pmap")
    assert_bit_equal(pmapped, replicated)
    for leaf in jax.tree.leaves(pmapped):
        assert leaf.shape[0] == 8 and len(leaf.sharding.device_set) == 8
        assert [s.device for s in leaf.addressable_shards] == jax.local_devices()
    sums = jax.pmap(lambda s: s["params"]["conv"]["kernel"].sum())(pmapped)
    assert np.all(np.asarray(sums) == np.asarray(sums)[0])

    # pmap -> mesh: a replicated state is saved once, with the replica axis dropped.
    want9 = dict(host_state(seed=1), step=np.int32(9))
    folder9 = saved(flax.jax_utils.replicate(want9), layout="pmap")
    restored9 = checkpoint.restore(folder9, abstract, shardings_of(host, big))
    assert_bit_equal(restored9, want9)
    print("OK")
    """
)


def run_script(script, *args, env=None, timeout=240):
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_sharded_state_resumes_on_other_meshes_one_device_and_pmap(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = run_script(MESH_SCRIPT, tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-4000:]


# --- two JAX processes ----------------------------------------------------------------------------

PROCESS_SCRIPT = IMPORTS + textwrap.dedent(
    """
    import sys
    from pathlib import Path
    rank, port, output_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=rank)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flaxdiff import checkpoint
    from shared.run import checkpoints

    group = checkpoint.process_group()
    assert (group.index, group.count) == (rank, 2)
    assert group.all_true(True) and not group.all_true(rank == 0)
    group.barrier()

    host = host_state()
    # fsdp spans both processes: each one holds, and writes, half of every weight.
    devices = np.array(jax.devices())
    fsdp = Mesh(devices.reshape(1, 4), ("data", "fsdp"))

    def put(x, mesh, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def spec(x):
        return P("fsdp") if x.ndim >= 2 else P()

    state = jax.tree.map(lambda x: put(x, fsdp, spec(x)), host)
    kernel = state["params"]["conv"]["kernel"]
    assert not kernel.is_fully_addressable
    folder = checkpoint.save(
        output_dir, state, group=group, step=7, trainer_state={"epoch": 0}, config_text="",
        loader_state={"epoch": 0, "position": 10 + rank}, limit=None)
    if rank == 0:
        assert checkpoints.verify(folder) == [], checkpoints.verify(folder)
    assert checkpoints.read_loader_state(folder, rank) == {"epoch": 0, "position": 10 + rank}

    # Resume on a mesh that splits the data axis over the processes instead.
    data = Mesh(devices.reshape(2, 2), ("data", "fsdp"))
    wanted = jax.tree.map(lambda x: NamedSharding(data, P("data") if x.ndim >= 2 else P()), host)
    restored = checkpoint.restore(folder, jax.eval_shape(lambda: host), wanted)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(host)):
        for shard in leaf.addressable_shards:
            got = np.asarray(shard.data)
            assert got.tobytes() == np.asarray(want[shard.index]).tobytes()
    print("OK", rank)
    """
)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_one_checkpoint_collectively(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_SCRIPT, str(rank), str(port), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and f"OK {rank}" in out, err[-4000:]
    folder = tmp_path / "checkpoint-7"
    names = all_files(folder)
    assert {"data_0.json", "data_1.json"} <= set(names)
    # Both processes wrote their own shards into the one orbax folder.
    assert any("process_1" in name for name in names)
    assert checkpoints.verify(folder) == []
