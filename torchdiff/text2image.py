"""Stable Diffusion text-to-image fine-tuning (diffusers' `train_text_to_image.py` flags).

accelerate launch -m torchdiff.text2image --pretrained_model_name_or_path MODEL
    --dataset_name lambdalabs/naruto-blip-captions --resolution 512 ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shared import cli
from torchdiff import trainer

TASK = trainer.Task(name="text2image")


def main(argv: Sequence[str] | None = None) -> int:
    return trainer.main(TASK, argv)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
