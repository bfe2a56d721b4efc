"""The flax train state inside the shared checkpoint folder (`shared.run.checkpoints`), with orbax.

The shared code owns the folder: its layout, the manifest, the atomic commit, discovery, resume
rules and pruning. This module writes and reads the flax part inside it:

    checkpoint-<step>/
      state/        the whole train state pytree ({"step", "params", "opt_state", "ema", "rng",
                    "ema_step", ...}) as one orbax checkpoint (OCDBT + zarr); every process writes
                    the shards it holds, so a sharded state is never gathered onto one host
      state_tree.json   every array of state/: its path, dtype and global shape (the main
                    process writes it; `restore` checks a resuming run against it)
      + the shared files: trainer_state.json, config.yaml, data_<rank>.json, manifest.json

The state is saved host-agnostic: each array with its global shape, whatever mesh or device count
wrote it. `restore` places every array with the sharding the resuming run asks for, so a run saved
on a (data=4, fsdp=2) mesh resumes on (data=2, fsdp=2), on one device, or under pmap.

Layouts (the trainer's `parallelism`):
  "mesh": arrays with their global shapes, sharded or replicated over a `jax.sharding.Mesh`, or on
    one device.
  "pmap": every array has a leading axis of one replica per local device (what `jax.pmap` and
    `flax.jax_utils.replicate` produce); the replicas are identical, one copy is saved.

Saving is synchronous: `save` returns once orbax has written and closed every file, because the
shared protocol checksums, fsyncs and renames the folder right after the writers return. The
rng is saved as key data (`jax.random.key_data`, uint32), not as a typed key array.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from shared.errors import CheckpointError
from shared.run import checkpoints
from shared.run.manifest import fsync_path, write_durable
from shared.run.process import ProcessGroup

STATE_DIR = "state"
STATE_TREE = "state_tree.json"
LAYOUTS = ("mesh", "pmap")
# orbax splits a replicated shard between its replicas so that several hosts share the write; for
# a small array the slicing costs more than it saves (one dispatch per slice: 12 s for the first
# save of the tiny UNet's train state on an 8-device CPU mesh, 2 s with this floor).
_MIN_REPLICA_SLICE_BYTES = 1 << 20
_REPLICA_AXIS = "replica"
_BARRIER = "twindiff:barrier"
_MAX_LISTED = 3  # differences named in a mismatch message


def process_group() -> ProcessGroup:
    """The shared view of JAX's processes: a barrier and an all-processes AND.

    Both are device collectives (`multihost_utils`): every process must call them in the same
    order, from the thread that runs the training steps.
    """
    if jax.process_count() == 1:
        return ProcessGroup()

    def barrier() -> None:
        multihost_utils.sync_global_devices(_BARRIER)

    def all_true(flag: bool) -> bool:
        flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
        return bool(np.all(flags))

    return ProcessGroup(
        index=jax.process_index(),
        count=jax.process_count(),
        barrier=barrier,
        all_true=all_true,
    )


def all_finite(state: Mapping[str, Any]) -> bool:
    """Whether every float weight of `state["params"]` and `state["ema"]` is finite.

    One jitted reduction over all of them and one device-to-host transfer of a boolean; every
    process gets the same answer (the reduction is global), so all of them refuse a save together.
    """
    return bool(_all_finite((state["params"], state.get("ema"))))


@jax.jit
def _all_finite(trees: Any) -> jax.Array:
    floats = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floats:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))


def abstract_of(state: Any) -> Any:
    """`state` as `jax.ShapeDtypeStruct`s, each with its array's sharding (None for host arrays).

    What `restore` needs to bring a checkpoint back in the layout the state has now, e.g. the
    freshly initialized state of a resuming run: ``restore(path, abstract_of(state))``.
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(*_shape_dtype(x), sharding=getattr(x, "sharding", None)),
        state,
    )


def save(
    output_dir: str | os.PathLike,
    state: Mapping[str, Any],
    *,
    group: ProcessGroup,
    step: int,
    trainer_state: Mapping[str, Any],
    config_text: str,
    loader_state: Mapping[str, int],
    limit: int | None,
    layout: str = "mesh",
) -> Path:
    """Writes `checkpoint-<step>` through the shared protocol; every process calls it.

    Args:
      output_dir: `--output_dir`.
      state: the train state pytree; its arrays may be sharded over a mesh (`layout="mesh"`) or
        replicated per local device (`layout="pmap"`).
      group: this process among the run's processes (`process_group()`).
      step: the global step; names the folder.
      trainer_state: saved as trainer_state.json.
      config_text: the resolved config, saved as config.yaml.
      loader_state: this process's loader position, {"epoch", "position"}.
      limit: `--checkpoints_total_limit`.
      layout: "mesh" or "pmap", how `state` is laid out on the devices (see the module doc).

    Returns:
      The committed checkpoint folder.

    Raises:
      TrainingError: a weight of params or EMA is not finite; nothing is written.
      CheckpointError: the disk is full, or another process failed to write its part.
    """
    _check_layout(layout)
    finite = all_finite(state)
    saved = _drop_replica_axis(state) if layout == "pmap" and finite else state
    if finite:
        _check_savable(saved)

    def write_main(folder: Path) -> None:
        arrays = {
            name: {"dtype": dtype, "shape": list(shape)}
            for name, (shape, dtype) in _leaf_table(saved).items()
        }
        write_durable(folder / STATE_TREE, json.dumps({"arrays": arrays}, indent=1) + "\n")

    def write_each(folder: Path, rank: int) -> None:
        _write_state(folder / STATE_DIR, saved, rank=rank)

    return checkpoints.save(
        output_dir,
        step,
        group=group,
        write_main=write_main,
        write_each=write_each,
        trainer_state=trainer_state,
        config_text=config_text,
        loader_state=loader_state,
        limit=limit,
        finite=finite,
    )


def restore(
    path: str | os.PathLike,
    abstract_state: Any,
    shardings: Any = None,
    *,
    layout: str = "mesh",
) -> Any:
    """The train state saved in the checkpoint at `path`, placed as the resuming run asks.

    Every process calls it. Nothing is read twice into host memory: each process reads the
    shards its devices hold.

    Args:
      path: a checkpoint folder (from `shared.run.checkpoints.find_resume`).
      abstract_state: the state's structure, shapes and dtypes: arrays or `jax.ShapeDtypeStruct`s
        (`abstract_of`), e.g. of the freshly initialized state. Their shardings, when they have
        some, are where the restored arrays go. Under `layout="pmap"`, with the leading replica
        axis.
      shardings: overrides the shardings of `abstract_state`: one `Sharding` for every array or a
        pytree of them matching it. Leaves with neither go to the first local device. Not
        allowed under `layout="pmap"`, which places the state itself.
      layout: "mesh" or "pmap", the layout of the returned state (see the module doc); either
        reads a checkpoint written in either layout.

    Returns:
      The state, with the structure of `abstract_state`, values bit-equal to the saved ones.

    Raises:
      CheckpointError: `path` has no state folder, the saved state differs from `abstract_state`
        in structure, shape or dtype (a run with other options), or it cannot be read (damaged).
    """
    _check_layout(layout)
    path = Path(path)
    state_dir = path / STATE_DIR
    if not state_dir.is_dir():
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: it has no {STATE_DIR}/ folder, so it was not "
            "written by the flax backend or is damaged; resume from another checkpoint"
        )
    if layout == "pmap":
        if shardings is not None:
            raise ValueError("layout 'pmap' places the state itself: pass shardings=None")
        target = _pmap_target(abstract_state)
    else:
        target = _mesh_target(abstract_state, shardings)
    _check_matches(_read_state_tree(path), target, path)
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
    )
    checkpointer = _checkpointer()
    try:
        restored = checkpointer.restore(state_dir.absolute(), args=args)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _unreadable(path, err) from err
    finally:
        checkpointer.close()
    return _add_replica_axis(restored) if layout == "pmap" else restored


# --- writing ---


def _checkpointer() -> ocp.Checkpointer:
    # The synchronous Checkpointer: `save` returns after every process has written its shards and
    # the primary process has finalized (orbax writes into `state.orbax-checkpoint-tmp-<n>` inside
    # the shared .tmp folder and renames it to `state`), so the shared code that runs next
    # checksums and commits finished files only.
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
        (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def _write_state(target: Path, state: Any, *, rank: int) -> None:
    checkpointer = _checkpointer()
    try:
        checkpointer.save(target.absolute(), args=ocp.args.PyTreeSave(state))
    finally:
        checkpointer.close()
    if rank != 0:
        # The main process fsyncs the whole folder before the commit, but on a network
        # filesystem only the writing host can flush its own writes: orbax's per-process files.
        for own in target.rglob(f"*process_{rank}"):
            for file in [own, *own.rglob("*")] if own.is_dir() else [own]:
                fsync_path(file)


def _check_savable(state: Any) -> None:
    """Refuses leaves orbax would save wrongly, with the fix, before any process writes."""
    multiprocess = jax.process_count() > 1
    for keys, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(keys, simple=True, separator="/")
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(f"state leaf {name} is a typed PRNG key: save jax.random.key_data(key)")
        if multiprocess and isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
            # Every process would write its own copy under the same name.
            raise ValueError(
                f"state leaf {name} lives on this process's devices only; in a multi-process run "
                "every array must be a global array, sharded or replicated over the mesh"
            )


# --- layouts ---


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


def _local_mesh() -> Mesh:
    # pmap's device order (`flax.jax_utils.replicate` uses the same).
    return Mesh(np.array(jax.local_devices()), (_REPLICA_AXIS,))


def _global_replicated() -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()), (_REPLICA_AXIS,)), P())


@functools.cache
def _replica_fns(mesh: Mesh) -> tuple[Any, Any]:
    """Jitted (drop, add) of the leading replica axis, without moving data between devices.

    shard_map with `check_vma=False` lets each device keep its own replica as its copy of the
    replicated result; a plain `x[0]` would broadcast device 0's copy to all of them.
    """

    def drop(tree):
        return jax.tree.map(lambda x: x[0], tree)

    def add(tree):
        return jax.tree.map(lambda x: x[None], tree)

    drop_fn = jax.shard_map(
        drop, mesh=mesh, in_specs=P(_REPLICA_AXIS), out_specs=P(), check_vma=False
    )
    add_fn = jax.shard_map(
        add, mesh=mesh, in_specs=P(), out_specs=P(_REPLICA_AXIS), check_vma=False
    )
    return jax.jit(drop_fn), jax.jit(add_fn)


def _drop_replica_axis(state: Any) -> Any:
    """A pmap-layout state as global arrays replicated over every device of every process."""
    count = jax.local_device_count()
    for keys, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(leaf, jax.Array) or leaf.ndim == 0 or leaf.shape[0] != count:
            name = jax.tree_util.keystr(keys, simple=True, separator="/")
            raise ValueError(
                f"layout 'pmap': state leaf {name} of shape {np.shape(leaf)} has no leading axis "
                f"of {count} replicas (one per local device)"
            )
    drop, _ = _replica_fns(_local_mesh())
    local = drop(state)
    # Rewrapped as one global array: with several processes, orbax then writes one copy (from
    # process 0) instead of one per process.
    sharding = _global_replicated()
    return jax.tree.map(lambda x: _rewrap(x, sharding), local)


def _add_replica_axis(state: Any) -> Any:
    """Globally replicated arrays in pmap layout: a leading axis of one replica per local device."""
    mesh = _local_mesh()
    local = jax.tree.map(lambda x: _rewrap(x, NamedSharding(mesh, P())), state)
    _, add = _replica_fns(mesh)
    return add(local)


def _rewrap(x: jax.Array, sharding: Sharding) -> jax.Array:
    """The same device buffers seen as an array with `sharding` (same shape, same local devices)."""
    buffers = [shard.data for shard in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, buffers)


# --- restoring ---


def _mesh_target(abstract_state: Any, shardings: Any) -> Any:
    default = SingleDeviceSharding(jax.local_devices()[0])

    def one(leaf: Any, sharding: Sharding | None) -> jax.ShapeDtypeStruct:
        shape, dtype = _shape_dtype(leaf)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or default)

    if shardings is None:
        return jax.tree.map(lambda leaf: one(leaf, getattr(leaf, "sharding", None)), abstract_state)
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda leaf: one(leaf, shardings), abstract_state)
    return jax.tree.map(one, abstract_state, shardings)


def _pmap_target(abstract_state: Any) -> Any:
    count = jax.local_device_count()
    sharding = _global_replicated()

    def one(keys, leaf):
        shape, dtype = _shape_dtype(leaf)
        if not shape or shape[0] != count:
            name = jax.tree_util.keystr(keys, simple=True, separator="/")
            raise ValueError(
                f"layout 'pmap': abstract leaf {name} of shape {shape} has no leading axis of "
                f"{count} replicas (one per local device)"
            )
        return jax.ShapeDtypeStruct(shape[1:], dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def _read_state_tree(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    file = path / STATE_TREE
    try:
        arrays = json.loads(file.read_text(encoding="utf-8"))["arrays"]
        return {name: (tuple(a["shape"]), str(a["dtype"])) for name, a in arrays.items()}
    except FileNotFoundError:
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: {STATE_TREE} is missing, so it was not written by "
            "the flax backend or is damaged; resume from another checkpoint"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: {STATE_TREE} is unreadable ({err!r}); resume from "
            "an older checkpoint"
        ) from None


def _check_matches(saved: dict[str, tuple[tuple[int, ...], str]], target: Any, path: Path) -> None:
    """Names in one line what differs between the saved state and the one the run wants.

    orbax's own errors are multi-line dumps, and it would silently cast a different dtype; a
    resume is exact or refused.
    """
    wanted = _leaf_table(target)
    problems = [f"{name} is only in the checkpoint" for name in saved if name not in wanted]
    problems += [f"{name} is not in the checkpoint" for name in wanted if name not in saved]
    for name, (shape, dtype) in wanted.items():
        if name in saved and saved[name] != (shape, dtype):
            have_shape, have_dtype = saved[name]
            problems.append(
                f"{name} is {have_dtype}{list(have_shape)} in the checkpoint, "
                f"{dtype}{list(shape)} in this run"
            )
    if problems:
        more = len(problems) - _MAX_LISTED
        listed = "; ".join(problems[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: its state does not match this run's ({listed}); "
            "it was saved by a run with other options (--use_ema, the optimizer, the model); "
            "resume with the options it was saved with"
        )


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    # tensorstore's messages carry a kilobyte of JSON spec after the reason: the start says it.
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(first) > 300:
        first = first[:300] + "..."
    return CheckpointError(
        f"--resume_from_checkpoint {path}: cannot read {STATE_DIR}/ ({type(err).__name__}: "
        f"{first}); resume from an older checkpoint"
    )


def _leaf_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path ("params/conv/kernel") -> (global shape, dtype name) of every array in `tree`."""
    table = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape, dtype = _shape_dtype(leaf)
        table[jax.tree_util.keystr(keys, simple=True, separator="/")] = (shape, dtype.name)
    return table


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array, a `ShapeDtypeStruct` or a scalar (as JAX would store it)."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    return np.shape(leaf), np.dtype(jnp.result_type(leaf))
