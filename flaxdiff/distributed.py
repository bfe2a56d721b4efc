"""Joining the processes of a multi-host run, before JAX touches a device.

Every process of a multi-host run starts the same program; `jax.distributed.initialize` connects
them so `jax.devices()` lists every host's devices and collectives span the hosts. When it is
called:

- ``JAX_COORDINATOR_ADDRESS`` is set (any machine, e.g. two local processes on 127.0.0.1):
  with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` from the environment, which must be set too;
- on a Cloud TPU VM (TPU devices under /dev, libtpu installed): without arguments, JAX reads the
  slice's metadata (one process on a single-host VM; optional there, but orbax's multi-host
  checkpoints and the health checks of a pod need it);
- otherwise not: one process, its local devices. ``TWINDIFF_DISTRIBUTED=0`` skips it anywhere.

Already-initialized runtimes (a test that initialized first) are left as they are.
"""

from __future__ import annotations

import glob
import logging
import os

import jax

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"{name}={value!r}: a multi-process run with JAX_COORDINATOR_ADDRESS needs "
            f"{', '.join(_ENV[1:])} set to integers on every process"
        ) from None


def _on_tpu_vm() -> bool:
    """TPU chips attached (v2-v4: /dev/accel*, v5 and later: /dev/vfio) and libtpu to drive them."""
    import importlib.util

    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _initialized() -> bool:
    from jax._src import distributed as jax_distributed  # the only place the state is kept

    return jax_distributed.global_state.client is not None


def initialize() -> bool:
    """Connects this process to the others when the environment describes a multi-process run.

    Returns whether `jax.distributed.initialize` was called (now or before).
    """
    if _initialized():
        return True
    if os.environ.get("TWINDIFF_DISTRIBUTED") == "0":
        return False
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if not 0 <= index < count:
            raise ConfigError(
                f"JAX_PROCESS_ID={index} with JAX_NUM_PROCESSES={count}: the id must be in "
                f"0..{count - 1}"
            )
        jax.distributed.initialize(coordinator, num_processes=count, process_id=index)
        logger.info("process %d of %d (coordinator %s)", index, count, coordinator)
        return True
    if _on_tpu_vm():
        try:
            jax.distributed.initialize()
        except Exception as error:  # the TPU metadata was unreadable: say what to set instead
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ConfigError(
                f"jax.distributed.initialize() failed on this TPU VM ({reason}); set "
                f"{', '.join(_ENV)} on every worker, or TWINDIFF_DISTRIBUTED=0 for one process"
            ) from None
        logger.info("TPU VM: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False
