"""SIGTERM and Ctrl-C: stop cleanly, never lose the steps already trained.

- During setup (loading models, generating class images, before update 1) there is nothing to
  save: the signal raises `StopRequested` at once, and the entry point says so and exits with
  128 + the signal number (143 for SIGTERM, 130 for SIGINT).
- During training, SIGTERM (a preempted VM, a cluster's time limit) and the first Ctrl-C ask for
  a stop: the trainer finishes the update it is on, writes a checkpoint (unless that step has one),
  and exits 0 with the resume hint. All processes stop at the same step (the backend reduces the
  flag over processes).
- A second Ctrl-C aborts at once (KeyboardInterrupt): the newest checkpoint is what a resume uses.

Outside the main thread (a notebook runner, a test harness) no handler can be installed and the
signals keep their default behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import signal

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived before training began; nothing to save.

    A BaseException, like KeyboardInterrupt, so that `except Exception` in setup code cannot
    swallow it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} before training started: nothing was trained or saved; run the "
            "same command again to start"
        )


class StopSignal:
    """Installs the handlers for a run; `requested` names the signal once a stop is asked."""

    def __init__(self):
        self.requested: str | None = None
        self.training = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for signum in SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def requested_anywhere(self, group) -> str | None:
        """The signal's name when any process of `group` (a `shared.run.process.ProcessGroup`)
        got one, else None; a collective, so every process stops at the same step."""
        if group.all_true(self.requested is None):
            return None
        return self.requested or "a signal on another process"

    def start_training(self) -> None:
        """From now on a signal asks for a checkpoint and a stop instead of raising."""
        self.training = True

    def _handle(self, signum: int, frame) -> None:
        if not self.training:
            raise StopRequested(signum)
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        if self.requested is None:
            self.requested = name
            hint = " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""
            logger.warning("%s: saving a checkpoint after this step, then exiting%s", name, hint)
