"""The errors a user can act on: each message names the flag, file or folder and the fix.

Entry points (`shared.cli.run_main`) print a `UserError` as one line and exit with status 2,
without a traceback (set ``TWINDIFF_DEBUG=1`` to see it); any other exception is a bug and keeps
its traceback. Each class also derives from the builtin its callers used to catch (a
`ConfigError` is a `ValueError`), so code that caught those still does.
"""

from __future__ import annotations

import os

EXIT_USER_ERROR = 2
DEBUG_ENV = "TWINDIFF_DEBUG"


class UserError(Exception):
    """Something the user can fix: bad input, a damaged file, a full disk, a diverged run."""


class ConfigError(UserError, ValueError):
    """A config value or combination that cannot run; the message names the flag and the fix."""


class DataError(UserError, ValueError):
    """The data is unusable as configured: no images, too many unreadable images, bad metadata."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or read (damaged, incomplete, disk full)."""


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says what to change."""


def debug_enabled() -> bool:
    """``TWINDIFF_DEBUG=1``: show tracebacks of user errors too."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
