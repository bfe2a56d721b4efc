"""The worker side of the loader: decoding one sample, the worker processes' state and the
shared-memory slots that carry decoded arrays back (see `shared.data.loader` for the contract).

The same `load_sample` runs in the main thread (``num_workers=0``) and in workers, so a batch does
not depend on where it was decoded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from shared.data.records import BadImageError, Record
from shared.prompts import select_caption

# ---------------------------------------------------------------------------------------------
# One sample: the same code runs in the main thread (num_workers=0) and in workers.


@dataclasses.dataclass(frozen=True)
class Job:
    """What every sample needs besides its (epoch, index); sent to each worker once."""

    source: Any
    transform: Callable[..., np.ndarray]
    seed: int
    train: bool


def load_sample(job: Job, epoch: int, index: int, names: list[str]) -> dict[str, Any]:
    """Decodes and transforms sample `index`; appends the image name to `names` for messages."""
    record = job.source[index]
    if not isinstance(record, Record):
        raise TypeError(f"source[{index}] returned {type(record).__name__}, not a Record")
    names.append(record.image.name)
    rng = np.random.default_rng([job.seed, epoch, index])
    extra_names = tuple(sorted(record.extras))
    arrays = [job.transform(record.image, rng)]
    arrays += [job.transform(record.extras[name], rng) for name in extra_names]
    caption = select_caption(record.captions, train=job.train, rng=rng)
    return {
        "index": index,
        "arrays": arrays,  # the image, then the extras in `extra_names` order
        "extra_names": extra_names,
        "caption": caption,
        "meta": dict(record.meta),
    }


def sample_name(index: int, names: list[str]) -> str:
    return f"sample {index} ({names[0]})" if names else f"sample {index}"


# Worker-process state, set once by `worker_init`.
_worker_job: Job | None = None
_worker_init_error: str | None = None
_worker_logs: list[tuple[str, int, str, str | None]] = []
_worker_shm: dict[str, shared_memory.SharedMemory] = {}


class _ForwardLogs(logging.Handler):
    """Keeps a worker's log records so the main process can re-log them."""

    def emit(self, record: logging.LogRecord) -> None:
        key = getattr(record, "warn_once_key", None)
        _worker_logs.append((record.name, record.levelno, record.getMessage(), key))


def _exit_with_owner() -> None:
    """Blocks until the process that owns the loader is gone, then ends this worker at once.

    Without this, a loader owner killed by SIGKILL (preemption, the OOM killer) leaves its
    workers blocked on the task queue forever: the other workers hold its write end, so they
    never see end-of-file. The owner is the worker's multiprocessing parent (for forkserver
    workers that is the trainer, not the server that forked them), whose sentinel is a pipe
    only the owner writes to: it reads end-of-file when the owner dies, however it dies. A
    process the owner forked inherits that pipe and would keep it open, so on Linux a pidfd of
    the owner is watched as well. Both wait in the kernel, so this costs nothing per sample.
    """
    owner = multiprocessing.parent_process()
    if owner is None:  # not started by multiprocessing: nothing owns this process
        return
    waitables: list[Any] = [owner.sentinel]
    # Absent before Python 3.9 / Linux 5.3 and off Linux. If the owner is already gone, the call
    # fails (or, should its pid be reused already, watches a stranger) and the sentinel decides.
    with contextlib.suppress(AttributeError, OSError):
        waitables.append(os.pidfd_open(owner.pid))
    multiprocessing.connection.wait(waitables)
    # Nothing to save: the samples belong to a consumer that is gone, and the shared memory is
    # unlinked by the resource tracker once the last process holding it has exited.
    os._exit(1)


def worker_init(sys_path: list[str], payload: bytes) -> None:
    global _worker_job, _worker_init_error
    threading.Thread(target=_exit_with_owner, name="loader-owner-watch", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    logging.getLogger().addHandler(_ForwardLogs())
    # A forkserver child has the sys.path of the parent when the server started; the source's
    # module may have been importable only since.
    sys.path[:] = sys_path
    try:
        _worker_job = pickle.loads(payload)
    except Exception:
        _worker_init_error = traceback.format_exc()


def worker_task(epoch: int, index: int, slot: tuple | None) -> tuple[str, Any, list, bool]:
    """("ok", sample) | ("bad", (name, reason)) | ("error", (name, message)), the logs, and
    whether the sample's arrays went into the shared-memory `slot` (and so not into the sample)."""
    del _worker_logs[:]
    names: list[str] = []
    in_slot = False
    try:
        if _worker_job is None:
            raise RuntimeError(
                "the loader worker could not unpickle the source/transform (define their "
                "classes in an importable module, not in a __main__ script):\n"
                f"{_worker_init_error}"
            )
        sample = load_sample(_worker_job, epoch, index, names)
        arrays = sample["arrays"]
        if slot is not None and [(a.shape, a.dtype.str) for a in arrays] == [
            (shape, dtype) for shape, dtype, _ in slot[2]
        ]:
            for view, a in zip(views(attached(slot[0]), *slot[1:]), arrays, strict=True):
                view[...] = a
            sample["arrays"], in_slot = None, True
        out = ("ok", sample)
    except BadImageError as e:
        out = ("bad", (e.name, e.reason))
    except Exception:
        out = ("error", (sample_name(index, names), traceback.format_exc()))
    return (*out, list(_worker_logs), in_slot)


def attached(name: str) -> memoryview:
    if name not in _worker_shm:
        try:  # Python >= 3.13: only the creator tracks the block (and unlinks it after a crash)
            _worker_shm[name] = shared_memory.SharedMemory(name, track=False)
        except TypeError:  # before: registered again with the parent's tracker, no harm done
            _worker_shm[name] = shared_memory.SharedMemory(name)
    return _worker_shm[name].buf


# ---------------------------------------------------------------------------------------------
# Shared memory: workers write decoded arrays into slots of one block instead of pickling ~1 MB
# per sample through a pipe (measured here: 3.5 ms per 512px sample, a quarter of its decode
# time; the copy out of shared memory into the batch costs ~0.2 ms).


def views(buf: memoryview, base: int, layout: tuple) -> list[np.ndarray]:
    return [np.ndarray(shape, dtype, buf, base + offset) for shape, dtype, offset in layout]


class SlotRing:
    """`count` slots laid out like the first sample's arrays: ((shape, dtype, offset), ...).

    A slot is taken when its task is submitted and given back once the batch holding its sample
    is collated (copied out); the slot of a dropped task goes back only when that task is done,
    so a late write never lands in a reused slot.
    """

    def __init__(self, arrays: list[np.ndarray], count: int):
        layout, self.slot_bytes = [], 0
        for a in arrays:
            layout.append((a.shape, a.dtype.str, self.slot_bytes))
            self.slot_bytes += -(-a.nbytes // 64) * 64
        self.layout = tuple(layout)
        self.shm = shared_memory.SharedMemory(create=True, size=self.slot_bytes * count)
        self.free = list(range(count))
        self.draining: list[tuple[int, concurrent.futures.Future]] = []

    def take(self) -> int | None:
        for item in [d for d in self.draining if d[1].done()]:
            self.draining.remove(item)
            self.free.append(item[0])
        return self.free.pop() if self.free else None

    def spec(self, slot: int) -> tuple:
        return (self.shm.name, slot * self.slot_bytes, self.layout)

    def views(self, slot: int) -> list[np.ndarray]:
        return views(self.shm.buf, slot * self.slot_bytes, self.layout)
