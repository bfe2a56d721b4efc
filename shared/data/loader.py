"""The deterministic, sharded, resumable, parallel loader: an endless iterator of numpy batches.

Contract (trainers, checkpoints and tests rely on every line of it):

* **Sizes.** ``N = len(source)``; ``batch_size`` is per process. ``steps_per_epoch =
  N // (batch_size * process_count)`` (a `ValueError` if 0). Each epoch is truncated to
  ``steps_per_epoch * batch_size * process_count`` samples, dropping the remainder, so every
  process yields the same number of full batches (pmap / jit need fixed shapes).
  ``epoch_length = steps_per_epoch * batch_size`` samples per process per epoch.
* **Order.** Epoch ``e`` reads ``np.random.default_rng([seed, e]).permutation(N)`` (train) or
  ``np.arange(N)`` (eval), truncated as above; process ``p`` reads ``order[p::process_count]``,
  its shard. The stream is endless: epoch ``e + 1`` follows the last batch of epoch ``e``.
* **Per-sample randomness.** Sample ``i`` (its dataset index) of epoch ``e`` draws from
  ``np.random.default_rng([seed, e, i])``, in this order: the image's transform, each extra
  image's transform (extras sorted by name), then the caption choice. So a batch does not depend
  on ``num_workers``, the prefetch depth, or which process decodes it.
* **Batch.** A dict: ``pixel_values`` (B, H, W, 3) uint8 (float32 in [0, 1] with
  ``preserve_input_precision``); ``<name>_pixel_values`` for each extra image (DreamBooth's
  ``class_pixel_values``); ``captions`` list[str] (train: a random one of the record's captions;
  eval: the first; none -> ""); each meta key as a list (None where a record lacks it);
  ``index`` (B,) int64 dataset indices; plus whatever ``collate_text(captions)`` returns.
* **Bad images.** A sample whose image (or an extra) raises `BadImageError` is skipped with a
  warning naming it, and the next sample of the stream takes its place: batches stay full and
  the stream stays deterministic. When the number of distinct bad images this process has met
  exceeds ``max_bad_fraction * N``, `DataError` is raised. (Distinct, so one bad file does not
  count again every epoch; with several processes each counts what its own shards contained,
  so no process fails unless the dataset really is past the limit.) Any other exception while
  loading a sample, in a worker or not, is raised as `SampleError` naming the sample.
* **Position.** ``state()`` is ``{"epoch": e, "position": k}``: the samples of this process's
  epoch-``e`` shard consumed by the batches returned so far, bad ones included; prefetched but
  unreturned work is not counted. A new ``Loader(..., state=s)`` or ``restore(s)`` continues
  with exactly the batch that would have come next. After an exception in ``next()`` the state
  stays at the last returned batch. The bad-image tally is not part of the state.
* **Workers.** ``num_workers=0`` decodes in the calling thread. Otherwise a process pool
  decodes samples ahead, at most ``prefetch_batches * batch_size`` samples in flight (make that
  at least ``num_workers`` to keep every worker busy), and results are used in stream order.
  The source, transform and seed go to each worker once, when it starts. Workers write decoded
  arrays into shared memory rather than pickling them through a pipe. Warnings that workers log
  are re-logged by the main process (once-only warnings once per run, not once per worker).

Processes. ``fork`` would copy a parent that JAX and torch have made multithreaded (JAX warns it
can deadlock), so workers start with "forkserver" (forked from a small clean server process; the
default on Linux from Python 3.14) or "spawn"; both took ~0.25 s to a first batch with 2 workers
here. Either would normally re-import the trainer's ``__main__`` module in every worker, and with
it JAX and torch: measured 2.0-2.4 s per start and 340 MB per worker instead of 0.25 s and 37 MB;
the loader skips that import (see `_main_module_hidden`). Workers ignore SIGINT: Ctrl-C reaches
the main process, which drops the work in flight; ``close()``, leaving the ``with`` block, garbage
collection or interpreter exit stop the workers and free the shared memory. When the process that
owns the loader dies without any of these (``kill -9``, the OOM killer, a preempted VM), a thread
in each worker sees it (`_exit_with_owner`) and ends the worker; the forkserver then exits (it
lives while its owner or a process it forked does), and so does multiprocessing's resource
tracker, after unlinking the shared memory and semaphores left behind. Measured here: all gone
20-85 ms after the kill; before, workers, forkserver and tracker stayed up (re-parented to init)
with their ``/dev/shm`` files for good.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import operator
import os
import pickle
import sys
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from shared.data import transforms
from shared.data.loader_workers import (
    Job,
    SlotRing,
    load_sample,
    sample_name,
    worker_init,
    worker_task,
)
from shared.data.records import BadImageError
from shared.errors import DataError

logger = logging.getLogger(__name__)

_BAD_NAMES_SHOWN = 5


class SampleError(RuntimeError):
    """Loading one sample failed with an unexpected error (not a bad image)."""


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While creating workers, stands in an empty module for ``__main__``.

    A spawn or forkserver child otherwise re-imports the parent's ``__main__`` (the trainer's task
    module, and with it JAX or torch: seconds and hundreds of MB per worker) only so that objects
    defined there can be unpickled. The loader sends nothing from ``__main__`` (it checks the
    pickled payload first), so its workers can skip that import.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _shutdown(
    executor: concurrent.futures.ProcessPoolExecutor, blocks: list[shared_memory.SharedMemory]
) -> None:
    executor.shutdown(wait=True, cancel_futures=True)
    for shm in blocks:
        with contextlib.suppress(BufferError):  # a caller may still hold a view; unlink anyway
            shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value.item()  # how some checkpoint libraries hand integers back
    if isinstance(value, bool | np.bool_) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an int, got {value!r}")
    return operator.index(value)


class Loader(Iterator[dict[str, Any]]):
    """Endless iterator of batches from `source`; see the module docstring for the contract.

    Args:
      source: ``len(source)`` and ``source[i] -> Record``; picklable when num_workers > 0.
      batch_size: samples per batch on this process.
      transform: ``transform(ImageRef, np.random.Generator) -> (H, W, 3) array``, e.g.
        `transforms.ImageTransform`; picklable when num_workers > 0.
      seed: non-negative int; with the epoch it fixes the order and all per-sample randomness.
      process_index, process_count: this process among those sharing the data (JAX:
        ``jax.process_index()``/``jax.process_count()``; Accelerate: process index/num_processes).
      num_workers: decoding processes; 0 decodes in the calling thread.
      prefetch_batches: batches of samples in flight ahead of the consumer (num_workers > 0).
      train: shuffle each epoch and pick random captions; False: dataset order, first caption.
      max_bad_fraction: tolerated fraction of unreadable images (``--max_bad_image_fraction``).
      collate_text: ``captions -> dict[str, np.ndarray]`` (e.g. a tokenizer), merged into each
        batch; runs in the main process.
      state: a ``state()`` to resume from.
      start_method: for the workers; None: "forkserver" where there is one, else "spawn".
    """

    def __init__(
        self,
        source,
        *,
        batch_size: int,
        transform: Callable[..., np.ndarray],
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int = 0,
        prefetch_batches: int = 2,
        train: bool = True,
        max_bad_fraction: float = 0.05,
        collate_text: Callable[[list[str]], Mapping[str, np.ndarray]] | None = None,
        state: Mapping[str, int] | None = None,
        start_method: str | None = None,
    ):
        ints = dict(batch_size=batch_size, seed=seed, process_index=process_index)
        ints |= dict(process_count=process_count, num_workers=num_workers)
        ints |= dict(prefetch_batches=prefetch_batches)
        ints = {name: _as_int(value, name) for name, value in ints.items()}
        lowest = dict(batch_size=1, seed=0, process_index=0, process_count=1, num_workers=0)
        for name, low in (lowest | dict(prefetch_batches=1)).items():
            if ints[name] < low:
                raise ValueError(f"{name} must be >= {low}, got {ints[name]}")
        batch_size, process_count = ints["batch_size"], ints["process_count"]
        if ints["process_index"] >= process_count:
            raise ValueError(f"process_index must be < process_count, got {ints}")
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        if start_method is None:
            forkserver = "forkserver" in multiprocessing.get_all_start_methods()
            start_method = "forkserver" if forkserver else "spawn"
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {transform!r}")

        self.num_samples = len(source)
        self.batch_size = batch_size
        self.process_index = ints["process_index"]
        self.process_count = process_count
        self.max_bad_fraction = float(max_bad_fraction)
        self.steps_per_epoch = self.num_samples // (batch_size * process_count)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                f"{batch_size * process_count} ({batch_size} per process x {process_count} "
                "processes); lower --train_batch_size or use more data"
            )
        self.epoch_length = self.steps_per_epoch * batch_size
        self._job = Job(source, transform, ints["seed"], bool(train))
        self._collate_text = collate_text
        self._max_in_flight = ints["prefetch_batches"] * batch_size
        self._shards: dict[int, np.ndarray] = {}
        self._bad: dict[int, str] = {}  # dataset index -> "name (reason)", first met first
        self.skipped = 0  # bad samples skipped, repeats in later epochs included
        self._epoch, self._position = self._validated(state) if state is not None else (0, 0)
        self._cursor = self._stream(self._epoch, self._position)
        self._in_flight: collections.deque = collections.deque()  # (index, future, slot)
        self._executor = None
        self._ring: SlotRing | None = None
        self._use_ring = True
        self._blocks: list[shared_memory.SharedMemory] = []  # for the finalizer to unlink
        self._closed = False
        if ints["num_workers"] > 0:
            self._start_workers(ints["num_workers"], start_method)

    def _start_workers(self, num_workers: int, start_method: str) -> None:
        try:
            payload = pickle.dumps(self._job)
        except Exception as e:
            raise TypeError(f"num_workers > 0 needs a picklable source and transform: {e}") from e
        self._executor = concurrent.futures.ProcessPoolExecutor(
            num_workers,
            mp_context=multiprocessing.get_context(start_method),
            initializer=worker_init,
            initargs=(list(sys.path), payload),
        )
        self._finalizer = weakref.finalize(self, _shutdown, self._executor, self._blocks)
        # Start every worker now, so they boot while the trainer compiles. Submitting one task
        # per worker is what makes the pool create its processes.
        hide_main = start_method != "fork" and b"__main__" not in payload
        with _main_module_hidden() if hide_main else contextlib.nullcontext():
            for _ in range(num_workers):
                self._executor.submit(os.getpid)

    # -- position -----------------------------------------------------------------------------

    def state(self) -> dict[str, int]:
        """``{"epoch": e, "position": k}`` after the batches returned so far."""
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state` (a `state()`), dropping any work in flight."""
        epoch, position = self._validated(state)
        self._drop_in_flight()
        self._epoch, self._position = epoch, position
        self._cursor = self._stream(epoch, position)

    def _validated(self, state: Mapping[str, int]) -> tuple[int, int]:
        if not isinstance(state, Mapping) or set(state) != {"epoch", "position"}:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"a loader state is {{'epoch': int, 'position': int}}, got {keys}")
        epoch = _as_int(state["epoch"], "loader state epoch")
        position = _as_int(state["position"], "loader state position")
        if epoch < 0 or position < 0:
            raise ValueError(f"loader state has a negative number: {dict(state)}")
        if position > self.epoch_length:
            raise ValueError(
                f"loader state position {position} is past the end of this process's epoch "
                f"({self.epoch_length} samples); was it saved with another dataset, batch size "
                "or process count?"
            )
        return (epoch + 1, 0) if position == self.epoch_length else (epoch, position)

    def _shard(self, epoch: int) -> np.ndarray:
        """Dataset indices this process reads in `epoch`, in order."""
        if epoch not in self._shards:
            order = np.arange(self.num_samples)
            if self._job.train:
                order = np.random.default_rng([self._job.seed, epoch]).permutation(order)
            used = order[: self.epoch_length * self.process_count]
            if len(self._shards) >= 3:
                del self._shards[min(self._shards)]
            self._shards[epoch] = used[self.process_index :: self.process_count]
        return self._shards[epoch]

    def _stream(self, epoch: int, position: int) -> Iterator[tuple[int, int]]:
        """(epoch, dataset index) of every sample from (epoch, position) on, forever."""
        while True:
            shard = self._shard(epoch)
            for k in range(position, len(shard)):
                yield epoch, int(shard[k])
            epoch, position = epoch + 1, 0

    # -- batches --------------------------------------------------------------------------------

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("the loader is closed")
        held: list[int] = []  # ring slots that this batch's samples are views of
        try:
            samples, consumed = self._take_batch(held)
            batch = self._collate(samples)  # copies out of the slots
        except BaseException:
            # Includes KeyboardInterrupt: the work in flight is dropped and state() stays at the
            # last returned batch, so calling next() again repeats nothing and skips nothing.
            self._drop_in_flight()
            self._cursor = self._stream(self._epoch, self._position)
            raise
        finally:
            if self._ring is not None:
                self._ring.free += held
        position = self._position + consumed
        self._epoch += position // self.epoch_length
        self._position = position % self.epoch_length
        return batch

    def _take_batch(self, held: list[int]) -> tuple[list[dict[str, Any]], int]:
        samples, consumed = [], 0
        while len(samples) < self.batch_size:
            index, status, payload = self._next_outcome(held)
            consumed += 1
            if status == "ok":
                samples.append(payload)
            elif status == "bad":
                self._skip_bad(index, *payload)
            else:
                name, message = payload
                raise SampleError(f"loading {name} failed in a loader worker:\n{message}")
        return samples, consumed

    def _next_outcome(self, held: list[int]) -> tuple[int, str, Any]:
        if self._executor is None:
            epoch, index = next(self._cursor)
            names: list[str] = []
            try:
                return index, "ok", load_sample(self._job, epoch, index, names)
            except BadImageError as e:
                return index, "bad", (e.name, e.reason)
            except Exception as e:
                raise SampleError(
                    f"loading {sample_name(index, names)} failed: {type(e).__name__}: {e}"
                ) from e
        while len(self._in_flight) < self._max_in_flight:
            epoch, index = next(self._cursor)
            slot = self._ring.take() if self._ring is not None else None
            spec = self._ring.spec(slot) if slot is not None else None
            future = self._executor.submit(worker_task, epoch, index, spec)
            self._in_flight.append((index, future, slot))
        index, future, slot = self._in_flight.popleft()
        try:
            status, payload, logs, in_slot = future.result()
        except BrokenProcessPool as e:
            raise SampleError(
                f"a loader worker process died while loading sample {index} or one of the "
                f"{len(self._in_flight)} after it (out of memory? a crash in a decoder?)"
            ) from e
        finally:
            if slot is not None and future.done():
                held.append(slot)  # given back after the batch is collated, or on an error
            elif slot is not None:  # interrupted while the task runs: it may still write
                self._ring.draining.append((slot, future))
        for name, level, message, once_key in logs:  # re-logged here, through our handlers
            if once_key is not None:
                transforms.warn_once(once_key, message)
            else:
                logging.getLogger(name).log(level, "%s", message)
        if in_slot:
            payload["arrays"] = self._ring.views(slot)
        elif status == "ok" and self._ring is None and self._use_ring:
            self._make_ring(payload["arrays"])
        return index, status, payload

    def _make_ring(self, arrays: list[np.ndarray]) -> None:
        count = self._max_in_flight + self.batch_size  # in flight + held by the batch
        nbytes = count * sum(a.nbytes for a in arrays)
        try:  # Docker's default /dev/shm is 64 MB; writing past it kills a worker with SIGBUS
            st = os.statvfs("/dev/shm")
            self._use_ring = st.f_bavail * st.f_frsize >= 2 * nbytes
        except OSError:
            pass
        if not self._use_ring:
            logger.warning(
                "/dev/shm has no room for %.0f MB of loader buffers, so workers pickle samples "
                "through pipes instead (slower); in Docker, raise --shm-size",
                nbytes / 2**20,
            )
            return
        self._ring = SlotRing(arrays, count)
        self._blocks.append(self._ring.shm)

    def _skip_bad(self, index: int, name: str, reason: str) -> None:
        self.skipped += 1
        if index in self._bad:
            logger.debug("skipping unreadable image %s again", name)
            return
        self._bad[index] = f"{name} ({reason})"
        logger.warning("skipping unreadable image %s: %s", name, reason)
        if len(self._bad) > self.max_bad_fraction * self.num_samples:
            count, total = len(self._bad), self.num_samples
            shown = list(self._bad.values())[:_BAD_NAMES_SHOWN]
            more = f"\n  ... and {count - len(shown)} more" if count > len(shown) else ""
            raise DataError(
                f"{count} of the {total} images ({count / total:.1%}) could not be read, more "
                f"than --max_bad_image_fraction={self.max_bad_fraction:g} allows:\n  "
                + "\n  ".join(shown)
                + more
                + "\nFix or remove these files, or raise --max_bad_image_fraction."
            )

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        extra_names = samples[0]["extra_names"]
        if any(s["extra_names"] != extra_names for s in samples):
            found = {s["index"]: list(s["extra_names"]) for s in samples}
            raise ValueError(f"the records of a batch must have the same extra images: {found}")
        keys = ["pixel_values"] + [f"{name}_pixel_values" for name in extra_names]
        batch: dict[str, Any] = {
            key: np.stack([s["arrays"][k] for s in samples]) for k, key in enumerate(keys)
        }
        batch["captions"] = [s["caption"] for s in samples]
        batch["index"] = np.array([s["index"] for s in samples], dtype=np.int64)
        meta_keys = dict.fromkeys(key for s in samples for key in s["meta"])
        self._merge(batch, {k: [s["meta"].get(k) for s in samples] for k in meta_keys}, "meta")
        if self._collate_text is not None:
            self._merge(batch, self._collate_text(batch["captions"]), "collate_text")
        return batch

    @staticmethod
    def _merge(batch: dict[str, Any], more: Mapping[str, Any], what: str) -> None:
        for key, value in more.items():
            if key in batch:
                raise ValueError(f"{what} key {key!r} collides with a batch key ({sorted(batch)})")
            batch[key] = value

    # -- shutdown -------------------------------------------------------------------------------

    @property
    def bad_images(self) -> list[str]:
        """Distinct unreadable images met so far, as "name (reason)", first met first."""
        return list(self._bad.values())

    def _drop_in_flight(self) -> None:
        for _, future, slot in self._in_flight:
            future.cancel()
            if slot is not None:
                self._ring.draining.append((slot, future))
        self._in_flight.clear()

    def close(self) -> None:
        """Stops the workers (waiting only for the samples they are decoding). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop_in_flight()
        if self._executor is not None:
            self._finalizer()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
