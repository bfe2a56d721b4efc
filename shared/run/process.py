"""The processes of a run, as the shared run control sees them: an index, a count, and two
collectives the backend implements (torch: Accelerate's barrier and gather; JAX: multihost_utils).

Shared code never talks to a framework; where every process must agree (a checkpoint commit, class
images written before training reads them), it calls these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


def _no_barrier() -> None:
    return None


def _alone(flag: bool) -> bool:
    return bool(flag)


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """This process among the run's processes.

    Attributes:
      index: this process's rank (0 is the main process: it writes logs, exports, commits).
      count: number of processes.
      barrier: returns once every process has called it.
      all_true: every process passes its flag; all get True iff every flag was True. A process
        that failed passes False, so the others do not wait forever at a later barrier.
    """

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = _no_barrier
    all_true: Callable[[bool], bool] = _alone

    @property
    def is_main(self) -> bool:
        return self.index == 0


SINGLE = ProcessGroup()
