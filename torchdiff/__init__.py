"""torchdiff: the PyTorch + Accelerate backend of twindiff.

Importing the package first quiets two warnings a user cannot act on, which diffusers' imports
would otherwise print on every run: transformers' "`CLIPImageProcessor` requires torchvision"
(it falls back to its PIL processor, which is what twindiff wants: torchvision has no role here)
and bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (diffusers imports
bitsandbytes whenever it is installed; twindiff never uses its 4-bit kernels, and 8-bit AdamW
errors still show). Only those messages are dropped.
"""

import logging


def _drop_torchvision_fallback_notice(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_fallback_notice)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def train(cfg, **overrides):
    """Trains a `twindiff.config(...)` with PyTorch in this process; returns a
    `twindiff.TrainResult` (output folder, summary, loss curve). `overrides` are flag values."""
    from shared import api

    return api.train(cfg, backend="torch", **overrides)
