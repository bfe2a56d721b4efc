"""shared.run.checkpoints: the folder layout and manifest, resume that skips damaged checkpoints,
pruning that keeps the last good one, durable commits, disk-full and multi-process failures."""

import errno
import json
import logging
import os
import re
import threading
import zlib
from pathlib import Path

import pytest

from shared.errors import CheckpointError, ConfigError, TrainingError
from shared.run import checkpoints
from shared.run.checkpoints import (
    find_resume,
    is_verified,
    list_checkpoints,
    prune,
    read_loader_state,
    read_trainer_state,
    remove_stale,
    save,
    verify,
)
from shared.run.process import SINGLE, ProcessGroup

SMALL_LIMIT = 1024  # CHECKSUM_MAX_BYTES in these tests: the 3000-byte "weights" get a size only
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
STATE_FILES = {WEIGHTS: 3000, "unet/config.json": 200, "optimizer.pt": 500}
CONFIG_TEXT = "train_batch_size: 2\nlearning_rate: 0.0001\n"


def payload(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 256 for i in range(size))


def write_state(tmp: Path, *, seed: int = 0) -> None:
    for name, size in STATE_FILES.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(payload(size, seed))


def save_step(output_dir, step, *, limit=None, group=SINGLE, write_main=None, **kwargs):
    return save(
        output_dir,
        step,
        group=group,
        write_main=write_main or (lambda tmp: write_state(tmp, seed=step)),
        trainer_state={"global_step": step, "plan": {"max_train_steps": 10}},
        config_text=CONFIG_TEXT,
        loader_state={"epoch": 1, "position": 7 + step},
        limit=limit,
        **kwargs,
    )


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-1])


def flip_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[10] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def small_checksums(monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKSUM_MAX_BYTES", SMALL_LIMIT)


# --- layout and manifest ---


def test_save_writes_the_layout_and_a_manifest_of_every_file(tmp_path):
    path = save_step(tmp_path, 4)

    assert path == tmp_path / "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # no .tmp left
    shared_files = {"data_0.json", "trainer_state.json", "config.yaml", "manifest.json"}
    assert files_under(path) == set(STATE_FILES) | shared_files
    assert json.loads((path / "trainer_state.json").read_text()) == {
        "global_step": 4,
        "plan": {"max_train_steps": 10},
        "finite": True,
    }
    assert (path / "config.yaml").read_text() == CONFIG_TEXT
    assert json.loads((path / "data_0.json").read_text()) == {"epoch": 1, "position": 11}

    manifest = json.loads((path / "manifest.json").read_text())
    listed = manifest["files"]
    assert set(listed) == files_under(path) - {"manifest.json"}
    for name, entry in listed.items():
        data = (path / name).read_bytes()
        assert entry["size"] == len(data)
        if len(data) <= SMALL_LIMIT:
            assert entry["crc32"] == f"{zlib.crc32(data):08x}"
        else:
            assert "crc32" not in entry
    assert "crc32" not in listed[WEIGHTS]  # 3000 bytes: size only
    assert manifest["total_bytes"] == sum(entry["size"] for entry in listed.values())
    assert manifest["global_step"] == 4

    assert verify(path) == []
    assert is_verified(path)
    assert list_checkpoints(tmp_path) == [path]
    assert read_trainer_state(path)["global_step"] == 4
    assert read_loader_state(path, 0) == {"epoch": 1, "position": 11}


def test_saving_a_step_again_replaces_it_and_leaves_no_old_folder(tmp_path):
    save_step(tmp_path, 5)
    path = save_step(tmp_path, 5, write_main=lambda tmp: write_state(tmp, seed=99))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    assert (path / "optimizer.pt").read_bytes() == payload(500, 99)
    assert verify(path) == []


def test_trainer_state_naming_another_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="global_step 3 != step 4"):
        save(
            tmp_path,
            4,
            group=SINGLE,
            write_main=write_state,
            trainer_state={"global_step": 3},
            config_text="",
            loader_state={"epoch": 0, "position": 0},
            limit=None,
        )
    assert list(tmp_path.iterdir()) == []


# --- verify and resume ---


def test_latest_skips_a_truncated_and_a_bit_flipped_checkpoint(tmp_path, caplog):
    for step in (2, 4, 6):
        save_step(tmp_path, step)
    truncate(tmp_path / "checkpoint-6" / WEIGHTS)  # large: caught by its size
    flip_bit(tmp_path / "checkpoint-4" / "optimizer.pt")  # small, same size: caught by its crc32

    assert verify(tmp_path / "checkpoint-6") == [f"{WEIGHTS} is 2999 bytes, the manifest says 3000"]
    [problem] = verify(tmp_path / "checkpoint-4")
    assert problem.startswith("optimizer.pt fails its checksum (crc32 ")

    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert find_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].endswith(
        f"skipping damaged checkpoint-6: {WEIGHTS} is 2999 bytes, the manifest says 3000"
    )
    assert "skipping damaged checkpoint-4: optimizer.pt fails its checksum" in warnings[1]


def test_latest_with_only_damaged_checkpoints_raises(tmp_path):
    save_step(tmp_path, 3)
    (tmp_path / "checkpoint-3" / "unet" / "config.json").unlink()

    with pytest.raises(CheckpointError) as info:
        find_resume(tmp_path, "latest")
    message = str(info.value)
    assert "\n" not in message
    assert "checkpoint-3: unet/config.json is missing" in message


def test_latest_without_checkpoints_starts_fresh(tmp_path, caplog):
    assert find_resume(tmp_path, None) is None
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert find_resume(tmp_path / "not-yet", "latest") is None
    assert "no checkpoint in" in caplog.text


@pytest.mark.parametrize("by_path", [False, True])
def test_a_named_damaged_checkpoint_raises_one_line(tmp_path, by_path):
    save_step(tmp_path, 2)
    save_step(tmp_path, 4)
    truncate(tmp_path / "checkpoint-4" / WEIGHTS)
    wanted = str(tmp_path / "checkpoint-4") if by_path else "checkpoint-4"

    with pytest.raises(CheckpointError) as info:
        find_resume(tmp_path, wanted)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--resume_from_checkpoint {wanted}: {tmp_path / 'checkpoint-4'}")
    assert f"{WEIGHTS} is 2999 bytes, the manifest says 3000" in message
    assert "'latest' or an older checkpoint" in message
    assert find_resume(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"


def test_a_named_missing_checkpoint_is_a_config_error(tmp_path):
    save_step(tmp_path, 2)
    with pytest.raises(ConfigError) as info:
        find_resume(tmp_path, "checkpoint-9")
    assert str(info.value).startswith(
        f"--resume_from_checkpoint checkpoint-9: no complete checkpoint at {tmp_path / 'checkpoint-9'}"
    )


def test_verify_reports_unreadable_manifests_and_missing_trainer_state(tmp_path):
    path = save_step(tmp_path, 2)
    (path / "manifest.json").write_text('{"files": [1, 2]}')
    assert verify(path) == ["manifest.json is unreadable (no 'files' table)"]
    (path / "manifest.json").write_text("{not json")
    [problem] = verify(path)
    assert problem.startswith("manifest.json is unreadable (")

    path = save_step(tmp_path, 4)
    (path / "trainer_state.json").unlink()
    assert verify(path) == ["trainer_state.json is missing"]
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    # Named explicitly, a folder with a manifest but no trainer state is damaged, not absent.
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is missing"):
        find_resume(tmp_path, "checkpoint-4")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is missing"):
        read_trainer_state(path)


def test_a_checkpoint_without_a_manifest_is_accepted_unverified(tmp_path):
    legacy = tmp_path / "checkpoint-10"
    write_state(legacy)
    (legacy / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (legacy / "data_0.json").write_text(json.dumps({"epoch": 2, "position": 5}))

    assert verify(legacy) == []
    assert not is_verified(legacy)
    assert find_resume(tmp_path, "latest") == legacy
    assert find_resume(tmp_path, "checkpoint-10") == legacy
    assert read_trainer_state(legacy) == {"global_step": 10}
    assert read_loader_state(legacy, 0) == {"epoch": 2, "position": 5}
    # Without a manifest, a garbled trainer state is still caught.
    (legacy / "trainer_state.json").write_text("{")
    [problem] = verify(legacy)
    assert problem.startswith("trainer_state.json is unreadable")


def test_read_loader_state_of_another_process_count(tmp_path):
    path = save_step(tmp_path, 2)
    with pytest.raises(CheckpointError) as info:
        read_loader_state(path, 3)
    message = str(info.value)
    assert "data_3.json is missing" in message
    assert "written by 1 process(es)" in message
    assert "process count" in message


# --- pruning and stale folders ---


def test_save_with_a_limit_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_prune_never_removes_the_newest_intact_checkpoint(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step)
    truncate(tmp_path / "checkpoint-3" / WEIGHTS)
    flip_bit(tmp_path / "checkpoint-4" / "unet" / "config.json")

    assert prune(tmp_path, None) == []
    with caplog.at_level(logging.INFO, logger=checkpoints.__name__):
        assert prune(tmp_path, 2) == [tmp_path / "checkpoint-1"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert "removing" in caplog.text
    assert "keeping" in caplog.text

    # A good save afterwards is the newest intact one, so the damaged ones may go.
    save_step(tmp_path, 5, limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]


def test_remove_stale_clears_interrupted_saves(tmp_path):
    save_step(tmp_path, 5)
    for name in ("checkpoint-3.tmp", "checkpoint-5.old"):
        write_state(tmp_path / name)
    # Killed between the two renames of a re-save: the .old folder is the committed copy.
    restored = tmp_path / "checkpoint-7.old"
    write_state(restored)
    (restored / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    (tmp_path / "checkpoint-x.tmp").mkdir()
    (tmp_path / "logs").mkdir()

    assert remove_stale(tmp_path) == [tmp_path / "checkpoint-3.tmp", tmp_path / "checkpoint-5.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-5",
        "checkpoint-7",
        "checkpoint-x.tmp",
        "logs",
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-7"]
    assert remove_stale(tmp_path) == []
    assert remove_stale(tmp_path / "absent") == []


# --- durability ---


def test_every_file_every_folder_and_the_output_folder_are_fsynced(tmp_path, monkeypatch):
    real_fsync = os.fsync
    synced = []

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    output_dir = tmp_path / "out"
    path = save_step(output_dir, 3)

    root = output_dir.resolve()
    tmp = root / "checkpoint-3.tmp"
    for name in files_under(path):
        assert str(tmp / name) in synced, name
    for folder in (tmp, tmp / "unet"):
        assert str(folder) in synced
    # The commit's rename is made durable after everything inside the folder.
    last_inside = max(i for i, p in enumerate(synced) if p.startswith(str(tmp)))
    assert str(root) in synced[last_inside + 1 :]
    assert str(root.parent) in synced  # the output folder was new: its own name too


# --- failures ---


def fill_then_fail(size: int, error: BaseException):
    def write_main(tmp: Path) -> None:
        (tmp / "optimizer.pt").write_bytes(payload(size, 1))
        raise error

    return write_main


def test_disk_full_removes_the_partial_folder_and_names_the_space(tmp_path):
    previous = save_step(tmp_path, 2)
    total = json.loads((previous / "manifest.json").read_text())["total_bytes"]
    assert total > 1024

    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError) as info:
        save_step(tmp_path, 4, write_main=fill_then_fail(100, full))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'checkpoint-4'} was not written: the disk is full")
    assert f"about {total / 1024:.1f} KiB needed (the size of checkpoint-2)" in message
    assert " free now" in message
    assert "--checkpoints_total_limit" in message
    assert "--output_dir" in message
    assert "checkpoint-2 is still the latest checkpoint" in message
    assert info.value.__cause__ is full

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert list_checkpoints(tmp_path) == [previous]
    assert verify(previous) == []


def test_disk_full_on_a_first_save_names_the_bytes_written(tmp_path):
    # A wrapped error (safetensors, torch) still counts when its chain holds the OSError.
    try:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    except OSError as cause:
        wrapped = RuntimeError("could not serialize")
        wrapped.__cause__ = cause
    with pytest.raises(CheckpointError) as info:
        save_step(tmp_path, 1, write_main=fill_then_fail(5000, wrapped))
    message = str(info.value)
    assert "the disk quota is exceeded (at least 4.9 KiB needed, " in message
    assert "no checkpoint is saved" in message
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_propagate_after_cleanup(tmp_path):
    previous = save_step(tmp_path, 2)
    denied = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(PermissionError) as info:
        save_step(tmp_path, 4, write_main=fill_then_fail(100, denied))
    assert info.value is denied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert verify(previous) == []


def test_non_finite_weights_write_nothing(tmp_path):
    calls = []
    with pytest.raises(TrainingError) as info:
        save_step(tmp_path / "out", 3, write_main=calls.append, finite=False)
    assert calls == []
    assert not (tmp_path / "out").exists()
    assert "weights are not finite at step 3: no checkpoint written" in str(info.value)

    good = save_step(tmp_path / "out", 2)
    with pytest.raises(TrainingError, match=re.escape(f"last good checkpoint: {good}")):
        save_step(tmp_path / "out", 4, write_main=calls.append, finite=False)
    assert calls == []
    assert list((tmp_path / "out").iterdir()) == [good]


# --- several processes (threads standing in for them) ---


class Collective:
    """barrier and all_true across `count` threads, as a backend lends them to shared code."""

    def __init__(self, count: int):
        self.count = count
        self.flags = [True] * count
        self.sync = threading.Barrier(count, timeout=20)

    def group(self, rank: int) -> ProcessGroup:
        def all_true(flag: bool) -> bool:
            self.flags[rank] = bool(flag)
            self.sync.wait()
            result = all(self.flags)
            self.sync.wait()  # nobody overwrites a flag before everyone has read them
            return result

        return ProcessGroup(
            index=rank, count=self.count, barrier=lambda: self.sync.wait(), all_true=all_true
        )


def run_processes(count: int, body) -> list:
    collective = Collective(count)
    results: list = [None] * count

    def target(rank: int) -> None:
        try:
            results[rank] = body(collective.group(rank))
        except BaseException as exc:
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def write_rng(tmp: Path, rank: int) -> None:
    (tmp / f"rng_{rank}.bin").write_bytes(payload(64, rank))


def test_two_processes_write_their_own_files(tmp_path):
    def body(group):
        return save(
            tmp_path,
            6,
            group=group,
            write_main=write_state,
            write_each=write_rng,
            trainer_state={"global_step": 6},
            config_text=CONFIG_TEXT,
            loader_state={"epoch": 0, "position": 10 * group.index},
            limit=None,
        )

    path = tmp_path / "checkpoint-6"
    assert run_processes(2, body) == [path, path]
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert {"data_0.json", "data_1.json", "rng_0.bin", "rng_1.bin"} <= set(listed)
    assert read_loader_state(path, 1) == {"epoch": 0, "position": 10}
    assert verify(path) == []


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_process_makes_every_process_raise(tmp_path, failing_rank):
    save_step(tmp_path, 2)
    broken = OSError(errno.EIO, "Input/output error")

    def write_each(tmp: Path, rank: int) -> None:
        write_rng(tmp, rank)
        if rank == failing_rank:
            raise broken

    def body(group):
        return save(
            tmp_path,
            4,
            group=group,
            write_main=write_state,
            write_each=write_each,
            trainer_state={"global_step": 4},
            config_text=CONFIG_TEXT,
            loader_state={"epoch": 0, "position": 0},
            limit=None,
        )

    results = run_processes(2, body)
    assert results[failing_rank] is broken
    other = results[1 - failing_rank]
    assert isinstance(other, CheckpointError)
    assert "another process failed" in str(other)
    assert "checkpoint-2 is still the latest checkpoint" in str(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_disk_full_on_another_process_is_a_checkpoint_error_everywhere(tmp_path):
    def write_each(tmp: Path, rank: int) -> None:
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    def body(group):
        return save(
            tmp_path,
            4,
            group=group,
            write_main=write_state,
            write_each=write_each,
            trainer_state={},
            config_text=CONFIG_TEXT,
            loader_state={"epoch": 0, "position": 0},
            limit=None,
        )

    main, other = run_processes(2, body)
    assert isinstance(main, CheckpointError)
    assert "another process failed" in str(main)
    assert isinstance(other, CheckpointError)
    assert "the disk is full" in str(other)
    assert list(tmp_path.iterdir()) == []
