"""Loader workers end with the process that owns the loader, even one killed by SIGKILL.

A preempted VM or the OOM killer gives the trainer no chance to run ``close()``; its decode
workers, the forkserver and the resource tracker must then go by themselves and take their
``/dev/shm`` segments and semaphores with them. Linux only: the processes are found in /proc.
"""

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads processes and mappings from /proc"
)

HERE = Path(__file__).resolve().parent

# A trainer stand-in: a loader with workers that has delivered a batch, then idles until killed.
# With `fork_child`, it first forks a child that outlives it, inheriting all its descriptors.
TRAINER = """
import os, sys, time
sys.path.insert(0, {here!r})
from test_loader import ListSource, make

loader = make(ListSource(16, pid=True), num_workers=2, start_method={start_method!r})
batch = next(loader)
child = 0
if {fork_child}:
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
print(os.getpid(), child, *sorted(set(batch["pid"])), flush=True)
time.sleep(120)
"""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a live or zombie process, None once it is reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name before it may hold anything
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every process below `root`, as pid -> start time (which tells a reused pid apart)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def _alive(processes: dict[int, int]) -> set[int]:
    """The pids of `processes` that still run: a zombie has freed everything but its pid, and
    this machine's init may be slow to reap the orphans it adopts."""
    alive = set()
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[0] not in "ZX":
            alive.add(pid)
    return alive


def _shm_files(pids) -> set[Path]:
    """The /dev/shm files (shared memory blocks, POSIX semaphores) that `pids` have mapped."""
    files = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
                    files.add(Path(path))
    return files


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def _trainer(tmp_path: Path, *, start_method: str = "forkserver", fork_child: bool = False):
    """Starts the trainer stand-in; yields (its Popen, its forked child or 0, its worker pids,
    all its descendants, their /dev/shm files). Afterwards kills whatever of it is left and
    removes its files, so a failing run leaves nothing behind either."""
    stderr = (tmp_path / "stderr.txt").open("w")
    code = TRAINER.format(here=str(HERE), start_method=start_method, fork_child=fork_child)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    processes: dict[int, int] = {}
    files: set[Path] = set()
    try:
        # A broken script may hang, or leave processes that keep the pipe open: never wait forever.
        assert select.select([proc.stdout], [], [], 60)[0], "the trainer printed nothing in 60 s"
        line = proc.stdout.readline()  # empty if the script failed before printing
        assert line, (tmp_path / "stderr.txt").read_text()
        pid, child, *workers = (int(p) for p in line.split())
        assert pid == proc.pid
        processes = _descendants(pid)
        files = _shm_files([pid, *processes])
        yield proc, child, set(workers), processes, files
    finally:
        proc.kill()
        for pid in _alive(processes):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        stderr.close()
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_sigkill_of_the_owner_leaves_no_process_and_no_shared_memory(start_method, tmp_path):
    with _trainer(tmp_path, start_method=start_method) as (proc, _, workers, processes, files):
        # What the kill must not leak: both workers, the forkserver that forked them (if any)
        # and the resource tracker; the sample ring and the queues' semaphores.
        expected = 4 if start_method == "forkserver" else 3
        assert workers and workers <= set(processes) and len(processes) == expected, processes
        assert any(f.name.startswith("psm_") for f in files), files
        assert any(f.name.startswith("sem.") for f in files), files
        assert all(f.exists() for f in files)
        time.sleep(1)  # the watch must not end a worker whose owner lives
        assert _alive(processes) == set(processes)

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        assert _wait_for(lambda: not _alive(processes), timeout=10), {
            pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in _alive(processes)
        }
        assert _wait_for(lambda: not any(f.exists() for f in files), timeout=5), files


def test_workers_also_end_when_a_fork_of_the_owner_lives_on(tmp_path):
    # The fork holds every descriptor the owner had, the workers' sentinel pipe included, so
    # only a watch on the owner's pid itself can notice that the owner is gone.
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        pytest.skip("needs pidfd_open (Python >= 3.9, Linux >= 5.3)")
    with _trainer(tmp_path, fork_child=True) as (proc, child, workers, processes, files):
        assert child in processes and workers <= set(processes), processes
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_for(lambda: not _alive({w: processes[w] for w in workers}), timeout=10)
        assert child in _alive(processes)

        # The forkserver and the resource tracker serve the fork as well; they stop with it.
        os.kill(child, signal.SIGKILL)
        assert _wait_for(lambda: not _alive(processes), timeout=10), _alive(processes)
        assert _wait_for(lambda: not any(f.exists() for f in files), timeout=5), files
