"""`twindiff bench`: one training config timed on both backends, as a table and a JSON document.

    twindiff bench [--preset tiny|ddpm-128|sd15] [--backends flax torch] [--steps N]
                   [--warmup N] [--batch_size N] [--resolution N] [--device auto|cpu|accelerator]
                   [--json PATH|-] [--output_dir DIR] [training flags...]
    python -m shared.bench ...                       (the same, without the launcher)

`command` runs it (each backend in its own process, one after the other), `measure` is what a
backend's process measures (`flaxdiff.bench`, `torchdiff.bench`), `presets` the named configs
and `table` the report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `twindiff bench` command; returns its exit status."""
    from shared.bench.command import run  # here: the backends import `measure` alone

    return run(list(sys.argv[1:] if argv is None else argv))
