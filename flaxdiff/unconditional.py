"""Unconditional DDPM training of a UNet2DModel on JAX (diffusers' `train_unconditional.py` flags).

    python -m flaxdiff.unconditional --train_data_dir ./images --resolution 64 --use_ema
    python -m flaxdiff.unconditional --config models/tiny-ddpm.yaml --train_data_dir DIR \
        --parallelism mesh --fsdp_size 2
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flaxdiff import trainer
from shared import cli

TASK = trainer.Task(name="unconditional")


def main(argv: Sequence[str] | None = None) -> int:
    return trainer.main(TASK, argv)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
