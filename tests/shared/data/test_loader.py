"""shared.data.loader against its docstring's contract: order, shards, resume, bad images, workers."""

import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.data import transforms
from shared.data.loader import DataError, Loader, SampleError
from shared.data.records import ImageRef, Record
from shared.data.transforms import ImageTransform

HERE = Path(__file__).resolve().parent


def png(i: int, size=(12, 10)) -> bytes:
    pixels = np.random.default_rng(1000 + i).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


class ListSource:
    """A picklable list-backed source of tiny PNGs. `bad` indices hold truncated files;
    `bad_class` ones a truncated class image; `slow` (all) and `delays` ({index: seconds}) sleep
    in __getitem__; `pid` puts the decoding process's id in the meta."""

    def __init__(
        self, n, *, bad=(), bad_class=(), dreambooth=False, pid=False, slow=0.0, delays=None
    ):
        self.records = []
        for i in range(n):
            data = png(i)[: len(png(i)) // 2] if i in bad else png(i)
            extras, meta = {}, {}
            if dreambooth:
                class_data = png(5000 + i)
                if i in bad_class:
                    class_data = class_data[: len(class_data) // 2]
                extras = {"class": ImageRef(f"class{i}.png", data=class_data)}
                meta = {"class_prompt": "a photo of a dog", "instance_prompt": f"sks dog {i}"}
            captions = (f"caption {i} a", f"caption {i} b", f"caption {i} c")
            self.records.append(Record(ImageRef(f"img{i}.png", data=data), captions, extras, meta))
        self.pid, self.slow, self.delays = pid, slow, delays or {}

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if self.slow or i in self.delays:
            time.sleep(self.delays.get(i, self.slow))
        record = self.records[i]
        if self.pid:
            record = dataclasses.replace(record, meta={**record.meta, "pid": os.getpid()})
        return record


class ExplodingTransform:
    """Fails with an ordinary bug (not a bad image) on the image named `name`."""

    def __init__(self, name):
        self.name = name

    def __call__(self, ref, rng):
        if ref.name == self.name:
            raise RuntimeError("boom in the transform")
        return RANDOM(ref, rng)


class UnpicklableInWorkers:
    """Pickles in the parent, fails to unpickle anywhere else."""

    def __init__(self, parent_pid):
        self.parent_pid = parent_pid

    def __len__(self):
        return 8

    def __reduce__(self):
        return (_restore_only_in, (self.parent_pid,))


def _restore_only_in(pid):
    if os.getpid() != pid:
        raise ImportError("no such module here")
    return UnpicklableInWorkers(pid)


RANDOM = ImageTransform(8, random_flip=True)  # 12x10 -> resized 9x8 -> random crop 8x8, flip


def make(source, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("transform", RANDOM)
    kwargs.setdefault("seed", 0)
    return Loader(source, **kwargs)


def take(loader, count):
    return [next(loader) for _ in range(count)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype and x[key].tobytes() == y[key].tobytes(), key
            else:
                assert x[key] == y[key], key


def indices(batches):
    return np.concatenate([b["index"] for b in batches]).tolist()


def wait_gone(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.05)
    return alive


# -- order ------------------------------------------------------------------------------------


def test_order_is_the_documented_permutation():
    loader = make(ListSource(30), batch_size=4)
    assert (loader.steps_per_epoch, loader.epoch_length) == (7, 28)
    batches = take(loader, 14)
    for epoch in (0, 1):
        expected = np.random.default_rng([0, epoch]).permutation(30)[:28].tolist()
        assert indices(batches[7 * epoch : 7 * epoch + 7]) == expected
    assert indices(batches[:7]) != indices(batches[7:])
    assert loader.state() == {"epoch": 2, "position": 0}
    b = batches[0]
    assert b["pixel_values"].shape == (4, 8, 8, 3) and b["pixel_values"].dtype == np.uint8
    assert b["index"].dtype == np.int64


def test_same_seed_same_stream_other_seed_other_stream():
    a = take(make(ListSource(20), seed=3), 8)
    assert_same_batches(a, take(make(ListSource(20), seed=3), 8))
    c = take(make(ListSource(20), seed=4), 8)
    assert indices(a) != indices(c)


def test_per_sample_randomness_is_keyed_by_seed_epoch_index():
    source = ListSource(8)
    batch = next(make(source, batch_size=8, train=False))
    for k, i in enumerate(batch["index"]):
        expected = RANDOM(source[i].image, np.random.default_rng([0, 0, i]))
        assert np.array_equal(batch["pixel_values"][k], expected)


def test_eval_order_and_first_caption():
    batches = take(make(ListSource(10), train=False, batch_size=3), 4)
    assert indices(batches[:3]) == list(range(9))  # index 9 dropped: not a full batch
    assert indices(batches[3:]) == [0, 1, 2]
    assert batches[0]["captions"] == ["caption 0 a", "caption 1 a", "caption 2 a"]


def test_train_captions_are_random_and_deterministic():
    a = take(make(ListSource(40), batch_size=8), 10)
    chosen = [c for b in a for c in b["captions"]]
    assert {c[-1] for c in chosen} == {"a", "b", "c"}
    assert all(c.startswith(f"caption {i} ") for c, i in zip(chosen, indices(a), strict=True))
    assert chosen == [
        c for b in take(make(ListSource(40), batch_size=8), 10) for c in b["captions"]
    ]


def test_missing_captions_become_empty_strings():
    class NoCaptions(ListSource):
        def __getitem__(self, i):
            record = super().__getitem__(i)
            return dataclasses.replace(record, captions=() if i % 2 else (None,))

    batch = next(make(NoCaptions(8), batch_size=8))
    assert batch["captions"] == [""] * 8


# -- sharding ---------------------------------------------------------------------------------


def test_shards_are_disjoint_and_cover_the_truncated_epoch():
    n, batch_size, count = 50, 4, 3
    loaders = [
        make(ListSource(n), batch_size=batch_size, process_index=p, process_count=count)
        for p in range(count)
    ]
    assert {ld.steps_per_epoch for ld in loaders} == {50 // 12}
    assert {ld.epoch_length for ld in loaders} == {16}
    truncated = np.random.default_rng([0, 0]).permutation(n)[:48]
    shards = [indices(take(ld, ld.steps_per_epoch)) for ld in loaders]
    for p, shard in enumerate(shards):
        assert shard == truncated[p::count].tolist()
    assert sum(len(s) for s in shards) == len(set().union(*shards)) == 48
    assert set().union(*shards) == set(truncated.tolist())


def test_too_small_dataset_is_an_error():
    with pytest.raises(ValueError, match=r"5 samples.*global batch of 8 \(4 per process x 2"):
        make(ListSource(5), batch_size=4, process_count=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="process_index"):
        make(ListSource(8), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        make(ListSource(8), max_bad_fraction=1.0)
    with pytest.raises(TypeError, match="picklable"):
        make(ListSource(8), transform=lambda ref, rng: None, num_workers=1)


# -- workers, resume --------------------------------------------------------------------------


def test_workers_give_the_same_batches_as_the_main_thread(caplog, monkeypatch):
    source = ListSource(22, bad=(3,), dreambooth=True)
    expected = take(make(source, batch_size=4), 8)  # 1.6 epochs
    monkeypatch.setattr(transforms, "_warned", set())
    upscale = ImageTransform(16)  # every image is upscaled: one warning, however many workers
    with caplog.at_level(logging.WARNING):
        with make(source, batch_size=4, num_workers=2, prefetch_batches=3) as loader:
            assert_same_batches(take(loader, 8), expected)
            assert loader._ring is not None  # most samples came through shared memory
        with make(source, batch_size=4, num_workers=2, transform=upscale) as loader:
            take(loader, 3)
    upscaled = [r for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(upscaled) == 1 and "--resolution=16" in upscaled[0].getMessage()


def test_shared_memory_slots_live_until_the_batch_is_copied():
    # Batch 2 is 4, 5, 6, 7. While the main process waits for the slow sample 5, the workers
    # finish 6, 7 and 8 (submitted once 4 was taken): had sample 4's slot been given back when
    # 4 was taken rather than after the batch was copied, 8 would have overwritten it.
    source = ListSource(16, delays={5: 0.5})
    kwargs = dict(batch_size=4, train=False)
    expected = take(make(source, **kwargs), 3)
    with make(source, num_workers=2, prefetch_batches=1, **kwargs) as loader:
        assert_same_batches(take(loader, 3), expected)


def test_without_room_in_dev_shm_workers_fall_back_to_pipes(caplog, monkeypatch):
    source = ListSource(16)
    expected = take(make(source), 6)
    tiny = os.statvfs_result((4096, 4096, 1, 1, 1, 1, 1, 1, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: tiny)
    with caplog.at_level(logging.WARNING), make(source, num_workers=2) as loader:
        assert_same_batches(take(loader, 6), expected)
        assert loader._ring is None
    assert any("/dev/shm has no room" in r.getMessage() for r in caplog.records)


def reference_stream(source, count, **kwargs):
    return take(make(source, **kwargs), count)


def test_resume_continues_exactly():
    # Bad images make the position run ahead of batch_size * steps; resume must still be exact.
    source = ListSource(23, bad=(4, 17))
    kwargs = dict(batch_size=4, max_bad_fraction=0.1)
    total = 14  # steps_per_epoch = 5: crosses two epoch boundaries
    expected = reference_stream(source, total, **kwargs)
    for stop in (0, 1, 3, 4, 5, 6, 9, 10, 13):
        first = make(source, **kwargs)
        head = take(first, stop)
        state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
        tail = take(make(source, state=state, **kwargs), total - stop)
        assert_same_batches(head + tail, expected)


def test_resume_with_prefetch_in_flight():
    source = ListSource(23, bad=(4, 17))
    reference = make(source, batch_size=4, max_bad_fraction=0.1)
    expected = take(reference, 4)
    state_after_4 = reference.state()
    expected += take(reference, 8)
    assert state_after_4["position"] > 16  # a bad image was among the first samples
    kwargs = dict(batch_size=4, max_bad_fraction=0.1, num_workers=2)
    with make(source, prefetch_batches=3, **kwargs) as loader:
        head = take(loader, 4)
        state = loader.state()
        assert state == state_after_4  # consumed samples only, none of the prefetched ones
        more = take(loader, 3)  # consumed past the save point, with work in flight
        loader.restore(state)
        assert_same_batches(head + take(loader, 8), expected)
        assert loader.state() == reference.state()
    with make(source, state=state, **kwargs) as resumed:
        assert_same_batches(take(resumed, 3), more)


def test_state_counts_consumed_batches_only():
    loader = make(ListSource(20), batch_size=4)
    assert loader.state() == {"epoch": 0, "position": 0}
    take(loader, 4)
    assert loader.state() == {"epoch": 0, "position": 16}
    take(loader, 1)
    assert loader.state() == {"epoch": 1, "position": 0}


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ({"epoch": -1, "position": 0}, ValueError, "negative"),
        ({"epoch": 0, "position": -3}, ValueError, "negative"),
        ({"epoch": 0}, ValueError, "'epoch': int, 'position': int"),
        ({"epoch": 0, "position": 0, "step": 1}, ValueError, "step"),
        ({"epoch": 0, "position": 1.5}, TypeError, "position"),
        ({"epoch": True, "position": 0}, TypeError, "epoch"),
        ({"epoch": 0, "position": 21}, ValueError, "past the end"),
        ([0, 0], ValueError, "'epoch': int"),
    ],
)
def test_bad_states_are_rejected(state, error, match):
    loader = make(ListSource(20), batch_size=4)
    with pytest.raises(error, match=match):
        loader.restore(state)
    with pytest.raises(error, match=match):
        make(ListSource(20), batch_size=4, state=state)


def test_state_accepts_numpy_ints_and_the_end_of_an_epoch():
    loader = make(ListSource(20), batch_size=4)
    loader.restore({"epoch": np.int64(1), "position": np.array(20)})
    assert loader.state() == {"epoch": 2, "position": 0}
    assert type(loader.state()["epoch"]) is int


# -- bad images, errors -----------------------------------------------------------------------


def test_bad_images_are_skipped_and_batches_stay_full(caplog):
    bad = (2, 11)  # 2 of 40: 5%, allowed
    with caplog.at_level(logging.WARNING, logger="shared.data.loader"):
        batches = take(make(ListSource(40, bad=bad), batch_size=4), 7)
    perm = np.random.default_rng([0, 0]).permutation(40).tolist()
    assert indices(batches) == [i for i in perm if i not in bad][:28]  # later samples move up
    assert all(len(b["captions"]) == b["pixel_values"].shape[0] == 4 for b in batches)
    messages = [r.getMessage() for r in caplog.records]
    assert any("img2.png" in m for m in messages) and any("img11.png" in m for m in messages)
    again = take(make(ListSource(40, bad=bad), batch_size=4), 7)
    assert_same_batches(batches, again)


def test_bad_class_image_skips_the_sample():
    source = ListSource(12, dreambooth=True, bad_class=(5,))
    loader = make(source, batch_size=4, train=False, max_bad_fraction=0.1)
    batches = take(loader, 3)
    assert indices(batches) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 0]
    assert loader.bad_images[0].startswith("class5.png")


def test_too_many_bad_images_is_a_data_error():
    bad = (1, 4, 6, 9)  # 4 of 40 = 10% > 5%: the 3rd distinct bad image (> 2.0) raises
    loader = make(ListSource(40, bad=bad), batch_size=4, train=False)
    with pytest.raises(DataError) as info:
        take(loader, 10)
    message = str(info.value)
    assert "img1.png" in message and "img4.png" in message and "img6.png" in message
    assert "3 of the 40 images (7.5%)" in message and "--max_bad_image_fraction" in message
    assert loader.state() == {"epoch": 0, "position": 6}  # the batch returned: 0, 2, 3, 5


def test_bad_images_count_once_across_epochs():
    loader = make(ListSource(40, bad=(1, 4)), batch_size=4, train=False)  # 5%: allowed
    take(loader, 38)  # four epochs of 38 good samples
    assert loader.state() == {"epoch": 4, "position": 0}
    assert loader.skipped == 8 and len(loader.bad_images) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_other_errors_surface_with_the_sample_name(num_workers):
    with make(
        ListSource(12), transform=ExplodingTransform("img5.png"), num_workers=num_workers
    ) as loader:
        with pytest.raises(SampleError, match=r"sample 5 \(img5.png\)") as info:
            take(loader, 3)
        assert "boom in the transform" in str(info.value)
        assert loader.state()["position"] % 4 == 0


def test_a_worker_that_cannot_unpickle_the_source_says_so():
    loader = make(UnpicklableInWorkers(os.getpid()), batch_size=2, num_workers=1)
    with loader, pytest.raises(SampleError, match="could not unpickle the source"):
        next(loader)


# -- extras, collate_text ---------------------------------------------------------------------


def test_dreambooth_records_give_class_pixel_values_and_prompts():
    source = ListSource(8, dreambooth=True)
    batch = next(make(source, batch_size=4))
    assert batch["class_pixel_values"].shape == (4, 8, 8, 3)
    assert batch["class_prompt"] == ["a photo of a dog"] * 4
    assert batch["instance_prompt"] == [f"sks dog {i}" for i in batch["index"]]
    # One generator per sample: the image's draws, then the class image's.
    i = int(batch["index"][1])
    rng = np.random.default_rng([0, 0, i])
    assert np.array_equal(batch["pixel_values"][1], RANDOM(source[i].image, rng))
    assert np.array_equal(batch["class_pixel_values"][1], RANDOM(source[i].extras["class"], rng))


def test_collate_text_is_merged():
    def tokenize(captions):
        return {"input_ids": np.array([[len(c), ord(c[-1])] for c in captions], np.int32)}

    batch = next(make(ListSource(8), collate_text=tokenize))
    assert batch["input_ids"].shape == (4, 2)
    assert batch["input_ids"].tolist() == [[len(c), ord(c[-1])] for c in batch["captions"]]
    with pytest.raises(ValueError, match="collides"):
        next(make(ListSource(8), collate_text=lambda c: {"index": np.zeros(4)}))


def test_preserve_input_precision_batches_are_float():
    transform = ImageTransform(8, center_crop=True, preserve_input_precision=True)
    batch = next(make(ListSource(8), transform=transform))
    assert batch["pixel_values"].dtype == np.float32
    assert batch["pixel_values"].min() >= 0.0 and batch["pixel_values"].max() <= 1.0


# -- shutdown ---------------------------------------------------------------------------------


def test_close_stops_the_workers_and_frees_shared_memory():
    loader = make(ListSource(16, pid=True), num_workers=2)
    with loader:
        pids = {pid for b in take(loader, 3) for pid in b["pid"]}
        shm_file = Path("/dev/shm") / loader._ring.shm.name.lstrip("/")
        assert shm_file.exists() or not Path("/dev/shm").is_dir()
    assert pids and os.getpid() not in pids
    assert not wait_gone(pids)
    assert not shm_file.exists()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    loader.close()  # idempotent


def test_keyboard_interrupt_does_not_hang():
    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background
    # jobs (`pytest &` in a script) with SIGINT ignored, and Python then keeps it ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    loader = make(ListSource(16, slow=0.3, pid=True), batch_size=8, num_workers=2)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(loader)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert loader.state() == {"epoch": 0, "position": 0}
    batch = next(loader)  # still usable, nothing skipped
    assert indices([batch]) == np.random.default_rng([0, 0]).permutation(16)[:8].tolist()
    loader.close()
    assert not wait_gone(set(batch["pid"]))


EXIT_SCRIPT = """
import os, sys
with open({marker!r}, "a") as f:  # runs once per process that imports this script
    f.write(f"{{os.getpid()}}\\n")
sys.path.insert(0, {here!r})
from test_loader import ListSource, make

if __name__ == "__main__":
    loader = make(ListSource(16, pid=True), num_workers=2, prefetch_batches=4)
    batch = next(loader)
    print(" ".join(str(p) for p in set(batch["pid"])), flush=True)
    if {crash}:
        raise SystemExit("crash with work in flight")
"""


@pytest.mark.parametrize("crash", [False, True])
def test_no_workers_left_at_interpreter_exit(crash, tmp_path):
    marker = tmp_path / "imports.txt"
    script = tmp_path / "train.py"
    script.write_text(EXIT_SCRIPT.format(here=str(HERE), crash=crash, marker=str(marker)))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == (1 if crash else 0), result.stderr
    pids = {int(p) for p in result.stdout.split()}
    assert pids and not wait_gone(pids)
    # The workers did not re-import the trainer's __main__ script (nor what it imports).
    importers = {int(p) for p in marker.read_text().split()}
    assert len(importers) == 1 and not importers & pids
