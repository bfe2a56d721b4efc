"""Stable Diffusion text-to-image fine-tuning on JAX (diffusers' `train_text_to_image.py` flags).

    python -m flaxdiff.text2image --pretrained_model_name_or_path MODEL \
        --dataset_name lambdalabs/naruto-blip-captions --resolution 512 --parallelism mesh
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flaxdiff import trainer
from shared import cli

TASK = trainer.Task(name="text2image")


def main(argv: Sequence[str] | None = None) -> int:
    return trainer.main(TASK, argv)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
