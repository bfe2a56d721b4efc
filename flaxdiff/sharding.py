"""Sharding rules for the ("data", "fsdp") mesh: which state array is split over "fsdp", and how.

Rules match parameter paths and shapes, never model names, so one rule set serves the UNet, CLIP,
the VAE and any future model; an optimizer moment or EMA copy of a parameter gets its parameter's
layout. `make_mesh` builds the mesh; `bytes_per_device` says what one device keeps. Used by
`flaxdiff.parallel.MeshStrategy` and by `flaxdiff.plan`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from shared.errors import ConfigError

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"

# Arrays under 2**14 elements (64 KiB in float32: biases, norms, the step, the rng) stay replicated:
# gathering one costs a collective's latency every step and saves almost no memory.
MIN_SHARD_SIZE = 2**14


# ---------------------------------------------------------------------------------------------
# Sharding rules


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """What to do with the arrays whose path matches `pattern` (the first matching rule wins).

    Attributes:
      pattern: a regex searched (`re.search`) in the "/"-joined path, e.g.
        `params/down_blocks/0/resnets/1/conv1/kernel` or `opt_state/1/mu/.../kernel`. Anchor at the
        end (`kernel$`) so a rule matches a parameter wherever the state nests it: its optimizer
        moments and EMA copy then follow it.
      shard: True: shard over "fsdp" by `param_sharding`'s shape rule; False: replicate.
    """

    pattern: str
    shard: bool


# Names shared by every model here (Linear/Conv/Norm/Embedding in flaxdiff.models.layers), not
# model names. Biases and norm parameters are vectors read whole by every device.
DEFAULT_RULES: tuple[ShardingRule, ...] = (
    ShardingRule(r"(^|/)(bias|scale)$", shard=False),
    ShardingRule(r".*", shard=True),
)


def path_str(path: Sequence[Any] | str) -> str:
    """A pytree key path as "a/b/0/c", the form `ShardingRule.pattern` is matched against.

    An `nnx.Variable` flattens to its `.value`; that last attribute is dropped so a path names the
    parameter (`.../conv_in/kernel`) whether the state holds `nnx.State` or plain dicts.
    """
    if isinstance(path, str):
        return path
    if path and path[-1] == jax.tree_util.GetAttrKey("value"):
        path = path[:-1]
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def param_sharding(
    path: Sequence[Any] | str,
    shape: Sequence[int],
    mesh: Mesh | jax.sharding.AbstractMesh,
    *,
    rules: Sequence[ShardingRule] = DEFAULT_RULES,
    min_shard_size: int = MIN_SHARD_SIZE,
) -> PartitionSpec:
    """The `PartitionSpec` of one state array on a ("data", "fsdp") mesh.

    Replicated: arrays under `min_shard_size` elements, arrays a rule replicates, arrays with no
    dimension divisible by the fsdp size, and everything when fsdp is 1. Otherwise the largest
    dimension divisible by the fsdp size is sharded over "fsdp" (ties: the last such dimension,
    the output features of a kernel). Only the path and the shape decide, so an optimizer moment
    or EMA copy of a parameter gets its parameter's spec.

    Args:
      path: the array's key path in the state (or its `path_str`).
      shape: the array's shape.
      mesh: a `Mesh` or `AbstractMesh` with an "fsdp" axis (only its axis sizes are read).
      rules: ordered path rules; a path no rule matches is replicated.
      min_shard_size: arrays with fewer elements are replicated.

    Returns:
      e.g. `PartitionSpec(None, None, None, "fsdp")` for a (3, 3, 320, 320) conv kernel,
      `PartitionSpec("fsdp")` for a (1024, 64) one.
    """
    fsdp = mesh.shape[FSDP]
    if fsdp == 1 or math.prod(shape) < min_shard_size:
        return PartitionSpec()
    name = path_str(path)
    rule = next((r for r in rules if re.search(r.pattern, name)), None)
    if rule is None or not rule.shard:
        return PartitionSpec()
    divisible = [(size, dim) for dim, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
        log.debug("%s %s: no dimension divisible by fsdp=%d, replicated", name, shape, fsdp)
        return PartitionSpec()
    _, dim = max(divisible)  # largest size, then the last dimension among equals
    # No trailing Nones: the spelling jit gives its outputs' specs, so a placed state's specs
    # compare equal to the step's.
    return PartitionSpec(*([None] * dim), FSDP)


def state_shardings(
    abstract_state: Any,
    mesh: Mesh | jax.sharding.AbstractMesh,
    *,
    rules: Sequence[ShardingRule] = DEFAULT_RULES,
    min_shard_size: int = MIN_SHARD_SIZE,
) -> Any:
    """A `NamedSharding` for every array of a state, by `param_sharding`.

    Args:
      abstract_state: any pytree of arrays or `jax.ShapeDtypeStruct`s (params, optax state, EMA,
        step, rng; `nnx.State` or dicts), e.g. from `jax.eval_shape(init_fn, rng)`.
      mesh: the ("data", "fsdp") mesh (an `AbstractMesh` gives shardings to plan with only).
      rules: see `param_sharding`.
      min_shard_size: see `param_sharding`.

    Returns:
      The same tree with a `NamedSharding` at each leaf: `out_shardings` of an init, targets of a
      `jax.device_put` or of a checkpoint restore.
    """

    def sharding(path, leaf):
        spec = param_sharding(
            path, np.shape(leaf), mesh, rules=rules, min_shard_size=min_shard_size
        )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def _leaf_bytes(shape: Sequence[int], dtype: Any) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        # A typed key is stored as its key data (uint32 words).
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        return math.prod(data.shape) * data.dtype.itemsize
    return math.prod(shape) * np.dtype(dtype).itemsize


def bytes_per_device(abstract_state: Any, shardings: Any) -> int:
    """Bytes of `abstract_state` that one device holds under `shardings` (the largest share).

    Args:
      abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`s.
      shardings: matching pytree of `NamedSharding`s (`state_shardings`).
    """
    total = 0
    for leaf, sharding in zip(
        jax.tree.leaves(abstract_state), jax.tree.leaves(shardings), strict=True
    ):
        total += _leaf_bytes(sharding.shard_shape(np.shape(leaf)), leaf.dtype)
    return total


# ---------------------------------------------------------------------------------------------
# The mesh


def make_mesh(*, data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over all `devices`; one of the two sizes may be -1 (the rest).

    "fsdp" is the inner axis, so an FSDP group is a run of neighbouring devices (on one host when
    it fits): its all-gathers, every step, take the fastest links. The axes are `Auto` (the
    compiler propagates shardings), not jax's `Explicit` default for `make_mesh`.

    Args:
      data: data-parallel groups, or -1.
      fsdp: devices per FSDP group (`--fsdp_size`), or -1.
      devices: default `jax.devices()` (all processes).

    Raises:
      ConfigError: the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    divisors = [d for d in range(1, count + 1) if count % d == 0]
    if data == -1 and fsdp == -1:
        raise ConfigError("the mesh needs --fsdp_size (or the data axis size); both are -1")
    if fsdp == -1:
        fsdp = count // data if data >= 1 and count % data == 0 else 0
    if data == -1:
        if fsdp < 1 or count % fsdp:
            raise ConfigError(
                f"--fsdp_size={fsdp} does not divide the {count} devices; use one of {divisors}"
            )
        data = count // fsdp
    if data < 1 or fsdp < 1 or data * fsdp != count:
        raise ConfigError(
            f"a mesh of data={data} x --fsdp_size={fsdp} does not use the {count} devices "
            f"exactly; --fsdp_size must be one of {divisors}"
        )
    return jax.make_mesh(
        (data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )
