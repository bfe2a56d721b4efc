"""DreamBooth fine-tuning of Stable Diffusion (diffusers' `train_dreambooth.py` flags).

    accelerate launch -m torchdiff.dreambooth --pretrained_model_name_or_path MODEL
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog"
        --with_prior_preservation --class_data_dir ./class-dog --class_prompt "a photo of dog"

With prior preservation, the class images `--class_data_dir` lacks are generated first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shared import cli
from torchdiff import trainer

TASK = trainer.Task(name="dreambooth")


def main(argv: Sequence[str] | None = None) -> int:
    return trainer.main(TASK, argv)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
