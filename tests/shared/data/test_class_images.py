"""shared.data.class_images: the plan of missing class images, saving, and generation over processes.

Several processes are simulated by threads sharing a `threading.Barrier`, so a process that skips a
collective shows up as a broken barrier instead of a hang.
"""

import hashlib
import logging
import re
import threading

import numpy as np
import pytest
from PIL import Image

from shared import config as C
from shared.data import class_images as CI
from shared.data import count_images
from shared.errors import DataError
from shared.run.process import ProcessGroup

PROMPT = "a photo of a dog"
NAME = re.compile(r"^(\d+)-([0-9a-f]{40})\.jpg$")


def dreambooth(class_dir, *, num=5, batch=2, prior=True):
    values = {
        "pretrained_model_name_or_path": "any-model",
        "instance_data_dir": "instances",
        "instance_prompt": "a photo of sks dog",
        "num_class_images": num,
        "sample_batch_size": batch,
    }
    if prior:
        values |= {
            "with_prior_preservation": True,
            "class_data_dir": str(class_dir),
            "class_prompt": PROMPT,
        }
    return C.build("dreambooth", "torch", values)


def fill(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"old{i}.png")


class FakeSampler:
    """Numpy images whose pixels encode a running number; records the prompts of each call."""

    def __init__(self, *, fail_on_call=None, error=None, size=16):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call
        self.error = error or RuntimeError("sampler exploded")
        self.size = size

    def __call__(self, prompts):
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise self.error
        self.calls.append(list(prompts))
        images = []
        for k in range(len(prompts)):
            value = (37 * (sum(map(len, self.calls)) + k)) % 256
            images.append(np.full((self.size, self.size, 3), value, np.uint8))
        return images


def file_indices(folder):
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    matches = [NAME.match(n) for n in names]
    return sorted(int(m.group(1)) for m in matches if m)


class Threads:
    """`count` processes as threads: a shared barrier, and all_true as an AND over one round."""

    def __init__(self, count):
        self.count = count
        self._barrier = threading.Barrier(count, timeout=20)
        self._flags: dict[int, bool] = {}

    def group(self, index):
        def all_true(flag):
            self._flags[index] = bool(flag)
            self._barrier.wait()
            result = all(self._flags.values())
            self._barrier.wait()  # nobody starts a next round before all have read this one
            return result

        return ProcessGroup(
            index=index, count=self.count, barrier=self._barrier.wait, all_true=all_true
        )

    def run(self, cfg, samplers):
        outcomes: list = [None] * self.count

        def one(index):
            try:
                outcomes[index] = CI.generate_class_images(
                    cfg, samplers[index], group=self.group(index), show_progress=False
                )
            except BaseException as e:
                outcomes[index] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        return outcomes


# --- plan ------------------------------------------------------------------------------------------


def test_no_plan_without_prior_preservation_or_when_full(tmp_path):
    assert (
        CI.plan_class_images(dreambooth(None, prior=False), process_index=0, process_count=1)
        is None
    )
    folder = tmp_path / "class"
    assert CI.plan_class_images(dreambooth(folder, num=3), process_index=0, process_count=1)
    fill(folder, 3)
    assert CI.plan_class_images(dreambooth(folder, num=3), process_index=0, process_count=1) is None
    fill(folder, 4)  # more than asked for is fine too
    assert CI.plan_class_images(dreambooth(folder, num=3), process_index=1, process_count=2) is None


def test_plan_one_process_continues_after_existing(tmp_path):
    folder = tmp_path / "class"
    fill(folder, 2)
    plan = CI.plan_class_images(
        dreambooth(folder, num=7, batch=2), process_index=0, process_count=1
    )
    assert (plan.folder, plan.prompt) == (folder, PROMPT)
    assert (plan.num_class_images, plan.existing, plan.missing, plan.first_index) == (7, 2, 5, 2)
    assert plan.indices == (2, 3, 4, 5, 6)
    assert plan.batches == (
        ((2, PROMPT), (3, PROMPT)),
        ((4, PROMPT), (5, PROMPT)),
        ((6, PROMPT),),
    )


@pytest.mark.parametrize(
    ("existing", "num", "batch", "count"), [(0, 9, 2, 2), (3, 10, 3, 2), (1, 4, 4, 5)]
)
def test_plan_shares_are_disjoint_and_cover_the_missing(tmp_path, existing, num, batch, count):
    folder = tmp_path / "class"
    fill(folder, existing)
    cfg = dreambooth(folder, num=num, batch=batch)
    plans = [CI.plan_class_images(cfg, process_index=r, process_count=count) for r in range(count)]
    shares = [set(p.indices) for p in plans]
    assert sum(map(len, shares)) == num - existing
    assert set().union(*shares) == set(range(existing, num))
    for rank, plan in enumerate(plans):
        assert plan.missing == num - existing and plan.existing == existing
        assert plan.indices == tuple(range(existing + rank, num, count))
        assert [i for b in plan.batches for i, _ in b] == list(plan.indices)
        assert all(1 <= len(b) <= batch for b in plan.batches)
        assert all(len(b) == batch for b in plan.batches[:-1])
    if num - existing < count:  # more processes than images: the last ones have nothing to do
        assert plans[-1].batches == () and plans[-1].indices == ()


def test_plan_rejects_a_bad_process_index(tmp_path):
    cfg = dreambooth(tmp_path / "class")
    with pytest.raises(ValueError, match="process_index"):
        CI.plan_class_images(cfg, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="process_count"):
        CI.plan_class_images(cfg, process_index=0, process_count=0)


# --- saving ----------------------------------------------------------------------------------------


def test_save_names_the_file_by_index_and_sha1_of_its_bytes(tmp_path):
    pixels = np.zeros((12, 10, 3), np.uint8)
    pixels[..., 1] = 200
    path = CI.save_class_image(tmp_path, 7, pixels)
    match = NAME.match(path.name)
    assert match and match.group(1) == "7"
    assert match.group(2) == hashlib.sha1(path.read_bytes()).hexdigest()
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (10, 12)
        assert np.abs(np.asarray(image).astype(int) - pixels).max() <= 3
    rgba = Image.new("RGBA", (6, 6), (10, 20, 30, 128))
    assert CI.save_class_image(tmp_path, 8, rgba).name.startswith("8-")
    assert count_images(tmp_path) == 2 and not [p for p in tmp_path.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)],
)
def test_save_rejects_arrays_that_are_not_hwc_uint8_rgb(tmp_path, bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        CI.save_class_image(tmp_path, 0, bad)
    assert list(tmp_path.iterdir()) == []


def test_a_half_written_image_is_never_counted(tmp_path, monkeypatch):
    seen = []
    real = CI.atomic_write

    def watching(path, write):
        def write_and_look(tmp):
            write(tmp)
            seen.append((tmp.name, tmp.stat().st_size > 0, count_images(tmp_path)))

        return real(path, write_and_look)

    monkeypatch.setattr(CI, "atomic_write", watching)
    CI.save_class_image(tmp_path, 0, np.zeros((8, 8, 3), np.uint8))
    [(tmp_name, filled, counted)] = seen
    assert filled and counted == 0 and tmp_name.endswith(".tmp")
    assert count_images(tmp_path) == 1


# --- generation, one process -----------------------------------------------------------------------


def test_generate_fills_the_folder(tmp_path, caplog):
    folder = tmp_path / "new" / "class"  # does not exist yet
    sampler = FakeSampler()
    with caplog.at_level(logging.INFO, logger="shared.data.class_images"):
        written = CI.generate_class_images(
            dreambooth(folder, num=5, batch=2), sampler, group=ProcessGroup(), show_progress=False
        )
    assert written == 5 and count_images(folder) == 5
    assert sampler.calls == [[PROMPT] * 2, [PROMPT] * 2, [PROMPT]]
    assert file_indices(folder) == [0, 1, 2, 3, 4]
    for path in folder.iterdir():
        assert NAME.match(path.name).group(2) == hashlib.sha1(path.read_bytes()).hexdigest()
    assert "generating 5 class images" in caplog.text and PROMPT in caplog.text


def test_nothing_is_sampled_when_the_folder_is_full(tmp_path):
    folder = tmp_path / "class"
    fill(folder, 4)
    never = FakeSampler(fail_on_call=0, error=AssertionError("sampled although full"))
    assert CI.generate_class_images(dreambooth(folder, num=4), never, group=ProcessGroup()) == 0
    assert (
        CI.generate_class_images(dreambooth(folder, prior=False), never, group=ProcessGroup()) == 0
    )
    assert never.calls == [] and count_images(folder) == 4


def test_a_rerun_after_an_interrupted_one_makes_only_the_rest(tmp_path):
    folder = tmp_path / "class"
    fill(folder, 1)
    cfg = dreambooth(folder, num=8, batch=3)
    # The first run dies in its second batch: the first batch's images stay, whole.
    broken = FakeSampler(fail_on_call=1)
    with pytest.raises(RuntimeError, match="sampler exploded"):
        CI.generate_class_images(cfg, broken, group=ProcessGroup(), show_progress=False)
    assert file_indices(folder) == [1, 2, 3] and count_images(folder) == 4
    # A crash inside a write leaves at most a hidden temp file, which counts for nothing.
    (folder / ".4-deadbeef.jpg.0123abcd.tmp").write_bytes(b"\xff\xd8 half a jpeg")
    again = FakeSampler()
    assert CI.generate_class_images(cfg, again, group=ProcessGroup(), show_progress=False) == 4
    assert again.calls == [[PROMPT] * 3, [PROMPT]]
    assert file_indices(folder) == [1, 2, 3, 4, 5, 6, 7] and count_images(folder) == 8


def test_a_sampler_returning_too_few_images_is_an_error(tmp_path):
    def short(prompts):
        return [np.zeros((8, 8, 3), np.uint8)] * (len(prompts) - 1)

    with pytest.raises(ValueError, match="returned 1 images for 2 prompts"):
        CI.generate_class_images(dreambooth(tmp_path / "c", num=2), short, group=ProcessGroup())


def test_a_folder_still_short_afterwards_is_a_data_error(tmp_path):
    folder = tmp_path / "class"
    fill(folder, 2)
    cfg = dreambooth(folder, num=5, batch=3)

    def pruning(prompts):  # another program empties the folder while we sample
        for path in folder.glob("old*.png"):
            path.unlink()
        return [np.zeros((8, 8, 3), np.uint8)] * len(prompts)

    with pytest.raises(
        DataError, match=r"--class_data_dir .* holds 3 images .*--num_class_images 5"
    ):
        CI.generate_class_images(cfg, pruning, group=ProcessGroup(), show_progress=False)


# --- generation, several processes -----------------------------------------------------------------


def test_two_processes_share_the_work(tmp_path):
    folder = tmp_path / "class"
    fill(folder, 1)
    cfg = dreambooth(folder, num=8, batch=2)
    samplers = [FakeSampler(), FakeSampler()]
    outcomes = Threads(2).run(cfg, samplers)
    assert outcomes == [4, 3]
    assert [sum(map(len, s.calls)) for s in samplers] == [4, 3]
    assert [list(map(len, s.calls)) for s in samplers] == [[2, 2], [2, 1]]
    assert file_indices(folder) == list(range(1, 8)) and count_images(folder) == 8


def test_a_failing_process_fails_them_all_without_a_hang(tmp_path):
    folder = tmp_path / "class"
    cfg = dreambooth(folder, num=6, batch=1)
    error = RuntimeError("out of memory on process 1")
    samplers = [FakeSampler(), FakeSampler(fail_on_call=1, error=error)]
    outcomes = Threads(2).run(cfg, samplers)
    assert outcomes[1] is error  # the failing process re-raises its own error
    assert isinstance(outcomes[0], DataError)
    assert "another process" in str(outcomes[0]) and "--class_data_dir" in str(outcomes[0])
    # What finished is kept: process 0's three images and process 1's first.
    assert file_indices(folder) == [0, 1, 2, 4]
    # The rerun numbers past the gap, so no name of the first run can come up again.
    rerun = Threads(2).run(cfg, [FakeSampler(), FakeSampler()])
    assert rerun == [1, 1] and count_images(folder) == 6
    assert file_indices(folder) == [0, 1, 2, 4, 5, 6]


def test_a_rerun_repeating_the_same_images_overwrites_nothing(tmp_path):
    folder = tmp_path / "class"
    cfg = dreambooth(folder, num=7, batch=2)

    def constant(prompts):  # a seeded sampler makes the same bytes again on a rerun
        return [np.full((8, 8, 3), 50, np.uint8)] * len(prompts)

    def dies_second(prompts, calls=[]):  # noqa: B006 (counts calls across invocations)
        calls.append(prompts)
        if len(calls) > 1:
            raise RuntimeError("preempted")
        return constant(prompts)

    first = Threads(2).run(cfg, [constant, dies_second])
    assert isinstance(first[0], DataError) and str(first[1]) == "preempted"
    assert file_indices(folder) == [0, 1, 2, 3, 4, 6]  # process 1 made 1 and 3, not 5
    assert CI.first_free_index(folder, 6) == 7
    assert Threads(2).run(cfg, [constant, constant]) == [1, 0]
    assert count_images(folder) == 7 and file_indices(folder) == [0, 1, 2, 3, 4, 6, 7]


def test_first_free_index_skips_past_generated_names_only(tmp_path):
    assert CI.first_free_index(tmp_path / "absent", 0) == 0
    fill(tmp_path, 2)
    assert CI.first_free_index(tmp_path, 2) == 2
    (tmp_path / f"9-{'a' * 40}.jpg").write_bytes(b"x")
    (tmp_path / "12-photo.jpg").write_bytes(b"x")  # not a generated name
    (tmp_path / f".15-{'b' * 40}.jpg.0123abcd.tmp").write_bytes(b"x")
    assert CI.first_free_index(tmp_path, 4) == 10
    assert CI.first_free_index(tmp_path, 11) == 11


def test_full_folder_with_several_processes_samples_nothing(tmp_path):
    folder = tmp_path / "class"
    fill(folder, 3)
    never = [FakeSampler(fail_on_call=0), FakeSampler(fail_on_call=0)]
    assert Threads(2).run(dreambooth(folder, num=3), never) == [0, 0]
