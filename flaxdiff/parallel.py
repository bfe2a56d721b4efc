"""How the flax trainer spreads one run over devices: `--parallelism pmap|mesh`, one interface.

The trainer's step is one pure function, `train_step(state, batch) -> (state, metrics)`, written as
if for one device; a `Strategy` applies the parallelism from outside:

    strategy = strategy_from_config(cfg)
    state = strategy.init(init_fn, rng)        # or strategy.place(host_state) for loaded weights
    step = strategy.compile(train_step)        # inside: loss, grads = strategy.mean((loss, grads))
    for batch in loader:                       # numpy, this process's shard of the global batch
        state, metrics = step(state, strategy.shard_batch(batch))
    log(strategy.unreplicate(metrics)); save(strategy.unreplicate(state))

"pmap" (`PmapStrategy`), the classic TPU v3 layout: the state is replicated on every local device
(a leading axis of size `local_device_count`), the batch is split over them, the step runs under
`jax.pmap` and averages gradients with `lax.pmean`. Every device holds the whole state.

"mesh" (`MeshStrategy`): `jax.jit` over a `Mesh` with axes ("data", "fsdp"). Params, optimizer
state and EMA are sharded over "fsdp" by rules on parameter paths and shapes (`param_sharding`),
never by model name, so one rule set serves the UNet, CLIP, the VAE and any future model; the
global batch is sharded over every device. The step sees global arrays: a mean over the batch is
already the mean over all devices, and XLA inserts the all-gathers and reduce-scatters.

Multi-host: every process runs the same program and loads only its own rows of each global batch
(`shared.data.loader` with `process_index` / `process_count`); `shard_batch` assembles the global
array from those per-process pieces without moving data between hosts.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxdiff.models.attention import target_platform
from flaxdiff.sharding import (  # noqa: F401  (the sharding API, re-exported for callers)
    DATA,
    DEFAULT_RULES,
    FSDP,
    MIN_SHARD_SIZE,
    ShardingRule,
    bytes_per_device,
    make_mesh,
    param_sharding,
    path_str,
    state_shardings,
)
from shared.config import TrainConfig
from shared.errors import ConfigError

log = logging.getLogger(__name__)

PMAP_AXIS = "devices"

StepFn = Callable[[Any, Any], tuple[Any, Any]]

# ---------------------------------------------------------------------------------------------
# Host <-> device


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_array(x: Any) -> np.ndarray:
    """`x` as a numpy array in the dtype JAX would give it (float64 -> float32 without x64)."""
    x = np.asarray(x)
    dtype = jax.dtypes.canonicalize_dtype(x.dtype)
    return x if x.dtype == dtype else x.astype(dtype)


def _host_copy(x: Any) -> Any:
    """One host copy of a (possibly sharded, possibly multi-host) array, never one per device.

    The copy is assembled from this process's shards when they cover the array (single host;
    FSDP groups within a host); otherwise this one leaf is gathered across processes, so devices
    hold at most one extra whole leaf at a time, never the whole state.
    """
    if _is_key(x):
        return jax.random.wrap_key_data(
            _host_copy(jax.random.key_data(x)), impl=jax.random.key_impl(x)
        )
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    out = np.empty(x.shape, x.dtype)
    seen, covered = set(), 0
    for shard in x.addressable_shards:
        # Shards of a GSPMD layout are equal or disjoint: count each block once.
        block = tuple((s.start, s.stop, s.step) for s in shard.index)
        if block in seen:
            continue
        seen.add(block)
        data = np.asarray(shard.data)
        out[shard.index] = data
        covered += data.size
    if covered == x.size:
        return out
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---------------------------------------------------------------------------------------------
# Strategies


class Strategy(abc.ABC):
    """How the state, the batch and the step are laid out on devices; see the module docstring.

    Attributes:
      name: "pmap" or "mesh" (`--parallelism`).
      per_device_batch_size: `--train_batch_size`, examples per device per micro-batch.
      num_devices: devices over all processes, the data-parallel width of the run.
      local_device_count: devices of this process.
      process_index, process_count: this process among all (the loader's arguments).
      local_batch_size: examples this process loads per micro-batch
        (`RunPlan.per_process_batch_size`).
      global_batch_size: examples per micro-batch over all processes.
      devices: the devices the step runs on (pmap: this process's; mesh: all of the mesh's).
      platform: the devices' platform ("tpu", "gpu", "cpu"): the step is traced for it
        (`flaxdiff.models.attention.target_platform`), which may differ from this process's
        when the devices are a TPU topology compiled for ahead of time (`flaxdiff.plan`).
    """

    name: str

    def __init__(self, *, per_device_batch_size: int, num_devices: int, local_device_count: int,
                 platform: str):  # fmt: skip
        if per_device_batch_size < 1:
            raise ConfigError(f"--train_batch_size must be at least 1, got {per_device_batch_size}")
        self.platform = platform
        self.per_device_batch_size = per_device_batch_size
        self.num_devices = num_devices
        self.local_device_count = local_device_count
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        self.local_batch_size = per_device_batch_size * local_device_count
        self.global_batch_size = per_device_batch_size * num_devices

    @abc.abstractmethod
    def place(self, state: Any) -> Any:
        """Puts a host (or single-device) state on the devices in this strategy's layout.

        Leaf by leaf, from the one host copy: no per-device copy of the state is ever made on
        the host. The caller's arrays stay valid (the step donates only the placed copy). On
        several hosts, every process passes the same state (e.g. each loads the weights file).
        """

    @abc.abstractmethod
    def init(self, init_fn: Callable[..., Any], *args: Any, abstract_state: Any = None) -> Any:
        """Runs `init_fn(*args)` on the devices, its result created directly in the layout.

        Args:
          init_fn: returns the initial state; traced once under `jax.jit`.
          *args: its arguments (e.g. the rng), arrays.
          abstract_state: `jax.eval_shape(init_fn, *args)` when the caller has it already.
        """

    @abc.abstractmethod
    def shard_batch(self, batch: Any) -> Any:
        """This process's numpy batch (leading axis `local_batch_size`, or a multiple of the
        local device count) as the step's input."""

    @abc.abstractmethod
    def compile(self, step_fn: StepFn, *, donate: bool = True) -> StepFn:
        """`step_fn(state, batch) -> (state, metrics)` compiled for this layout.

        With `donate`, the old state's buffers are reused for the new state: the caller must not
        touch a state after passing it in.
        """

    @abc.abstractmethod
    def abstract_inputs(self, abstract_state: Any, abstract_batch: Any) -> tuple[Any, Any]:
        """The compiled step's arguments as `jax.ShapeDtypeStruct`s laid out on the devices, for
        `compile(step).lower(*abstract_inputs(...))`: shapes only, nothing allocated.

        Args:
          abstract_state: the host state's shapes (as `place` takes it).
          abstract_batch: this process's batch shapes (as `shard_batch` takes it).
        """

    def _traced_for_platform(self, step_fn: StepFn, **mesh: Any) -> StepFn:
        def step(state, batch):
            with target_platform(self.platform, **mesh):
                return step_fn(state, batch)

        return step

    @abc.abstractmethod
    def mean(self, tree: Any) -> Any:
        """Inside the step: the mean over all devices of per-device values (loss, grads, metrics)."""

    @abc.abstractmethod
    def fold_in_device(self, rng: jax.Array) -> jax.Array:
        """Inside the step: a key for the batch this device sees (distinct noise per shard)."""

    @abc.abstractmethod
    def unreplicate(self, tree: Any) -> Any:
        """Host copies (numpy; typed keys stay keys) of a state or metrics, for logging,
        checkpoints and export: one copy on the host, never one per device."""


class PmapStrategy(Strategy):
    """`--parallelism pmap`: state replicated over the local devices, batch split, `pmean`."""

    name = "pmap"

    def __init__(self, *, per_device_batch_size: int, devices: Sequence[jax.Device] | None = None):
        """`devices`: default this process's; a TPU topology's devices plan a step for them."""
        self.devices = list(jax.local_devices() if devices is None else devices)
        # Named to jax.pmap only when given: on several hosts it would want every host's.
        self._pmap_devices = None if devices is None else self.devices
        super().__init__(
            per_device_batch_size=per_device_batch_size,
            num_devices=jax.device_count() if devices is None else len(self.devices),
            local_device_count=len(self.devices),
            platform=self.devices[0].platform,
        )
        # jax.pmap runs as jit + shard_map over this layout: one slice of a leading axis per
        # local device. Arrays laid out so pass into the pmapped step without a copy.
        self._mesh = Mesh(np.array(self.devices), (PMAP_AXIS,))
        self.sharding = NamedSharding(self._mesh, PartitionSpec(PMAP_AXIS))

    def _stack(self, slices: Sequence[np.ndarray]) -> jax.Array:
        """One array of shape (local_devices, ...) whose i-th slice lives on device i."""
        shape = (len(slices), *slices[0].shape[1:])
        parts = [jax.device_put(s, d) for s, d in zip(slices, self.devices, strict=True)]
        return jax.make_array_from_single_device_arrays(shape, self.sharding, parts)

    def _replicate(self, x: Any) -> jax.Array:
        if _is_key(x):
            data = self._replicate(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = _host_array(x)[None]  # a view: each device receives the same host buffer
        return self._stack([host] * len(self.devices))

    def place(self, state: Any) -> Any:
        return jax.tree.map(self._replicate, state)

    def init(self, init_fn: Callable[..., Any], *args: Any, abstract_state: Any = None) -> Any:
        del abstract_state  # the layout does not depend on the shapes
        n = len(self.devices)

        def replicated(*a):
            # Partitioned over the leading axis, the broadcast writes one copy per device.
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), init_fn(*a))

        return jax.jit(replicated, out_shardings=self.sharding)(*args)

    def shard_batch(self, batch: Any) -> Any:
        n = len(self.devices)

        def split(x):
            x = _host_array(x)
            if x.ndim == 0 or x.shape[0] % n:
                raise ValueError(
                    f"a batch leaf of shape {x.shape} cannot be split over {n} local devices"
                )
            per_device = x.reshape(n, x.shape[0] // n, *x.shape[1:])  # (ld, B/ld, ...)
            return self._stack([per_device[i : i + 1] for i in range(n)])

        return jax.tree.map(split, batch)

    def compile(self, step_fn: StepFn, *, donate: bool = True) -> StepFn:
        return jax.pmap(
            self._traced_for_platform(step_fn),
            axis_name=PMAP_AXIS,
            donate_argnums=(0,) if donate else (),
            devices=self._pmap_devices,
        )

    def abstract_inputs(self, abstract_state: Any, abstract_batch: Any) -> tuple[Any, Any]:
        n = len(self.devices)

        def stacked(x, split: bool):
            shape = np.shape(x)
            shape = (n, shape[0] // n, *shape[1:]) if split else (n, *shape)
            return jax.ShapeDtypeStruct(shape, x.dtype)

        return (
            jax.tree.map(lambda x: stacked(x, False), abstract_state),
            jax.tree.map(lambda x: stacked(x, True), abstract_batch),
        )

    def mean(self, tree: Any) -> Any:
        return jax.lax.pmean(tree, PMAP_AXIS)

    def fold_in_device(self, rng: jax.Array) -> jax.Array:
        return jax.random.fold_in(rng, jax.lax.axis_index(PMAP_AXIS))

    def unreplicate(self, tree: Any) -> Any:
        def first(x):
            if _is_key(x):
                data = first(jax.random.key_data(x))
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            if isinstance(x, jax.Array):
                # Only device 0's slice crosses to the host; the replicas are equal.
                x = x.addressable_shards[0].data
            return np.asarray(x)[0, ...]  # [0, ...]: a 0-d array, not a numpy scalar

        return jax.tree.map(first, tree)

    def __repr__(self) -> str:
        return f"PmapStrategy({self.local_device_count} local of {self.num_devices} devices)"


class MeshStrategy(Strategy):
    """`--parallelism mesh`: `jax.jit` over a ("data", "fsdp") mesh, state sharded by path rules."""

    name = "mesh"

    def __init__(
        self,
        mesh: Mesh,
        *,
        per_device_batch_size: int,
        rules: Sequence[ShardingRule] = DEFAULT_RULES,
        min_shard_size: int = MIN_SHARD_SIZE,
    ):
        devices = list(mesh.devices.flat)
        self.devices = devices
        process = {d.process_index for d in devices}
        local = mesh.local_devices if jax.process_index() in process else devices
        super().__init__(
            per_device_batch_size=per_device_batch_size,
            num_devices=mesh.size,
            local_device_count=len(local),
            platform=devices[0].platform,
        )
        self.mesh = mesh
        self.rules = tuple(rules)
        self.min_shard_size = min_shard_size
        # The batch is split over every device, FSDP groups included: FSDP is data parallelism
        # whose params are stored sharded. Over "data" alone each group would repeat its work.
        self.batch_sharding = NamedSharding(mesh, PartitionSpec((DATA, FSDP)))
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def shardings(self, abstract_state: Any) -> Any:
        """The state's `NamedSharding`s (for an init, a `device_put` or a checkpoint restore)."""
        return state_shardings(
            abstract_state, self.mesh, rules=self.rules, min_shard_size=self.min_shard_size
        )

    def place(self, state: Any) -> Any:
        def put(x, sharding):
            if _is_key(x):
                data = put(jax.random.key_data(x), sharding)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            # A local array (e.g. restored onto this process's first device) cannot be
            # device_put onto a mesh spanning other hosts (CPU and GPU backends refuse
            # cross-host transfers): it goes through the host copy below, as numpy does.
            if isinstance(x, jax.Array) and (
                sharding.is_fully_addressable or not x.is_fully_addressable
            ):
                # The step donates the placed state; device_put reuses the buffer of an array
                # already on a target device (even with may_alias=False, jax 0.10), so copy it
                # first or the first step would delete the caller's array.
                return jax.device_put(jnp.copy(x), sharding)
            host = _host_array(x)
            # Each device (on each host) receives only its slice of the one host copy.
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(put, state, self.shardings(state))

    def init(self, init_fn: Callable[..., Any], *args: Any, abstract_state: Any = None) -> Any:
        if abstract_state is None:
            abstract_state = jax.eval_shape(init_fn, *args)
        return jax.jit(init_fn, out_shardings=self.shardings(abstract_state))(*args)

    def shard_batch(self, batch: Any) -> Any:
        n = self.local_device_count

        def assemble(x):
            x = _host_array(x)
            if x.ndim == 0 or x.shape[0] % n:
                raise ValueError(
                    f"a batch leaf of shape {x.shape} cannot be split over {n} local devices"
                )
            # Global shape (B_local * processes, ...); each process gives only its own rows.
            return jax.make_array_from_process_local_data(self.batch_sharding, x)

        return jax.tree.map(assemble, batch)

    def compile(self, step_fn: StepFn, *, donate: bool = True) -> StepFn:
        traced = self._traced_for_platform(step_fn, mesh=self.mesh, batch_axes=(DATA, FSDP))

        def step(state, batch):
            batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
            new_state, metrics = traced(state, batch)
            # The rules are functions of path and shape, so the new state is pinned to the input
            # state's layout: donated buffers are reused and the next call needs no resharding.
            new_state = jax.lax.with_sharding_constraint(new_state, self.shardings(new_state))
            metrics = jax.lax.with_sharding_constraint(metrics, self.replicated)
            return new_state, metrics

        return jax.jit(step, donate_argnums=(0,) if donate else ())

    def abstract_inputs(self, abstract_state: Any, abstract_batch: Any) -> tuple[Any, Any]:
        def laid_out(x, sharding):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

        def global_batch(x):
            shape = np.shape(x)
            rows = shape[0] // self.local_device_count * self.num_devices
            return laid_out(jax.ShapeDtypeStruct((rows, *shape[1:]), x.dtype), self.batch_sharding)

        state = jax.tree.map(laid_out, abstract_state, self.shardings(abstract_state))
        return state, jax.tree.map(global_batch, abstract_batch)

    def mean(self, tree: Any) -> Any:
        # Under jit the step computes on global arrays: its mean over the batch is the mean over
        # all devices already.
        return tree

    def fold_in_device(self, rng: jax.Array) -> jax.Array:
        # One key draws the noise of the whole global batch; XLA partitions the draw.
        return rng

    def unreplicate(self, tree: Any) -> Any:
        return jax.tree.map(_host_copy, tree)

    def __repr__(self) -> str:
        axes = " x ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        return f"MeshStrategy({axes}, {self.process_count} process(es))"


def _pmap_from_config(cfg: TrainConfig, devices: Sequence[jax.Device] | None) -> Strategy:
    if cfg.flax.fsdp_size != 1:
        raise ConfigError(
            f"--fsdp_size={cfg.flax.fsdp_size} shards parameters, which --parallelism pmap "
            "cannot do; add --parallelism mesh (or drop --fsdp_size)"
        )
    return PmapStrategy(per_device_batch_size=cfg.training.train_batch_size, devices=devices)


def _mesh_from_config(cfg: TrainConfig, devices: Sequence[jax.Device] | None) -> Strategy:
    mesh = make_mesh(data=-1, fsdp=cfg.flax.fsdp_size, devices=devices)
    return MeshStrategy(mesh, per_device_batch_size=cfg.training.train_batch_size)


STRATEGIES: dict[str, Callable[[TrainConfig, Sequence[jax.Device] | None], Strategy]] = {
    "pmap": _pmap_from_config,
    "mesh": _mesh_from_config,
}


def strategy_from_config(cfg: TrainConfig, devices: Sequence[jax.Device] | None = None) -> Strategy:
    """The strategy `--parallelism` names, over all devices of all processes (or `devices`: a
    TPU topology's, to compile for ahead of time).

    Raises:
      ConfigError: `--fsdp_size` does not divide the device count, or is set with pmap.
    """
    strategy = STRATEGIES[cfg.flax.parallelism](cfg, devices)
    log.info("parallelism: %r", strategy)
    return strategy
