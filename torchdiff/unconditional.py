"""Unconditional DDPM training of a UNet2DModel (diffusers' `train_unconditional.py` flags).

accelerate launch -m torchdiff.unconditional --dataset_name NAME --resolution 64 ...
python -m torchdiff.unconditional --config models/tiny-ddpm.yaml --train_data_dir DIR
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shared import cli
from torchdiff import trainer

TASK = trainer.Task(name="unconditional")


def main(argv: Sequence[str] | None = None) -> int:
    return trainer.main(TASK, argv)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
