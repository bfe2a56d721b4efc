"""Memory and speed options of the torch backend, applied to models after they are built.

Gradient checkpointing, xFormers attention (with a PyTorch SDPA fallback wherever xFormers cannot
run), TF32 matmuls, gradient reset and peak-memory reporting. The models themselves know nothing of
these options; the trainer calls `enable_tf32` at start and `apply_memory_options` once the models
exist, before `accelerator.prepare`.
"""

from __future__ import annotations

import importlib
import logging
import sys

import torch
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    Attention,
    AttnAddedKVProcessor2_0,
    AttnProcessor2_0,
)

from shared.config import TrainConfig
from shared.run.report import peak_rss_bytes

logger = logging.getLogger(__name__)


class _LoggedLines(list):
    """The lines logged so far, so the caller can show or test them too."""

    def info(self, line: str) -> None:
        logger.info(line)
        self.append(line)

    def warning(self, line: str) -> None:
        logger.warning(line)
        self.append(line)


def enable_tf32(cfg: TrainConfig) -> list[str]:
    """Allows TF32 matmuls and cuDNN convolutions with `--allow_tf32`; returns the lines logged.

    Process-wide flags, so the trainer calls this once at start. They only matter on Ampere or
    newer GPUs and are harmless elsewhere.
    """
    lines = _LoggedLines()
    if cfg.torch.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        lines.info("TF32 enabled for CUDA matmuls and cuDNN convolutions (--allow_tf32)")
    return lines


def apply_memory_options(
    cfg: TrainConfig,
    *,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    train_text_encoder: bool = False,
    device: torch.device,
) -> list[str]:
    """Applies `--gradient_checkpointing` and `--enable_xformers_memory_efficient_attention`.

    Args:
      cfg: the run config; reads `cfg.training.gradient_checkpointing` and `cfg.torch`.
      unet: the denoiser (a diffusers `UNet2DConditionModel` or `UNet2DModel`).
      text_encoder: the text encoder, if the task has one.
      train_text_encoder: whether the text encoder is trained (only then is it checkpointed:
        a frozen encoder runs without a backward pass, so checkpointing it would save nothing).
      device: where the models will run; xFormers is only tried on CUDA.

    Returns:
      The lines logged (at INFO, or WARNING for a fallback), in order.
    """
    lines = _LoggedLines()
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        lines.info("gradient checkpointing enabled on the UNet")
        if train_text_encoder and text_encoder is not None:
            # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias that
            # warns); the old name is all that transformers 4.x has.
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            (enable or text_encoder.gradient_checkpointing_enable)()
            lines.info("gradient checkpointing enabled on the text encoder")
    if cfg.torch.enable_xformers_memory_efficient_attention:
        _enable_xformers(unet, device, lines)
    return lines


def _enable_xformers(unet: torch.nn.Module, device: torch.device, lines: _LoggedLines) -> None:
    reason = None
    if device.type != "cuda":
        reason = f"xFormers cannot run on {device.type}"
    else:
        try:
            xformers = importlib.import_module("xformers")
        except ImportError:
            reason = "xFormers is not installed"
    if reason is None:
        version = str(getattr(xformers, "__version__", "unknown"))
        if version.split("+")[0] == "0.0.16":
            # The same warning as the diffusers scripts: 0.0.16's backward is broken on some GPUs.
            lines.warning(
                "xFormers 0.0.16 cannot be used for training on some GPUs; if training misbehaves, "
                "upgrade to xFormers 0.0.17 or later"
            )
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # any failure leaves a working model behind via the fallback
            reason = f"enabling xFormers {version} failed ({type(err).__name__}: {err})"
        else:
            lines.info(f"xFormers {version} memory-efficient attention enabled on the UNet")
            return
    count = _use_sdpa(unet)
    lines.warning(
        f"--enable_xformers_memory_efficient_attention: {reason}; using PyTorch "
        f"scaled_dot_product_attention (AttnProcessor2_0) in {count} attention layers instead"
    )


def _use_sdpa(unet: torch.nn.Module) -> int:
    """Sets PyTorch SDPA processors on every attention layer; returns how many it set.

    Walks the modules rather than calling `unet.set_attn_processor`, which `UNet2DModel` lacks;
    it also resets layers a failed xFormers attempt may have switched halfway. Added-KV layers
    (DeepFloyd IF UNets) need the added-KV flavour of the processor.
    """
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            added_kv = isinstance(module.processor, ADDED_KV_ATTENTION_PROCESSORS)
            module.set_processor(AttnAddedKVProcessor2_0() if added_kv else AttnProcessor2_0())
            count += 1
    return count


def zero_grad(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Resets gradients; with `--set_grads_to_none` they become None (frees memory, skips a fill)."""
    optimizer.zero_grad(set_to_none=cfg.torch.set_grads_to_none)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on `device`, in bytes.

    CUDA: the peak allocated by PyTorch's caching allocator on that device. Elsewhere: the peak
    resident set size of the whole process (what the OS saw, including Python and libraries).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # the ceiling glibc's own dynamic threshold can reach


def steady_host_allocations() -> bool:
    """Fixes glibc's mmap threshold at 32 MiB (trim at 64 MiB); returns whether it could.

    glibc serves a large allocation with mmap until the process has freed an mmapped block at
    least that large, and only then from the heap: so whether every step's activation buffers
    cost an mmap, page faults and a munmap depended on what happened to be freed during setup.
    Measured on the tiny DreamBooth demo: the same steps 4-8% slower in one process than in
    another, and equal once the threshold is fixed. These are the values glibc's dynamic rule
    ends at anyway; a no-op off glibc (macOS, musl) and for GPU memory.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):  # not glibc
        return False
