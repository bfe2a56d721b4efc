"""What a compiled train step needs per device, what a device has, and what would make it fit.

XLA reports a compiled program's memory (`Compiled.memory_analysis()`): its arguments (the state
and the batch), its outputs, the outputs that reuse donated arguments (aliases) and the
temporaries (activations kept for the backward pass, gradients, collectives' buffers). What a
device holds at the peak is arguments + outputs - aliases + temporaries. The trainer checks this
against its devices before step 1 and `flaxdiff.plan` against a TPU it compiles for.

TPU figures are per JAX device (a TensorCore on v2-v4 without megacore, a chip on v4/v5p with
megacore, a chip on v5e/v6e): Google's published HBM and peak bf16 FLOP/s per chip, scaled by the
device's share of its chip's cores.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled step."""

    arguments: int
    outputs: int
    aliases: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliases + self.temporaries


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: per chip, and how many TensorCores share it."""

    hbm_bytes: int
    peak_bf16_flops: float  # per second
    cores: int


# jax's `device_kind` -> the chip (cloud.google.com/tpu/docs: system architecture pages).
CHIPS: dict[str, Chip] = {
    "TPU v2": Chip(16 * GIB, 45e12, 2),
    "TPU v3": Chip(32 * GIB, 123e12, 2),
    "TPU v4": Chip(32 * GIB, 275e12, 2),
    "TPU v5": Chip(95 * GIB, 459e12, 2),  # v5p
    "TPU v5 lite": Chip(16 * GIB, 197e12, 1),  # v5e
    "TPU v6 lite": Chip(32 * GIB, 918e12, 1),  # v6e (Trillium)
}


def step_memory(compiled: Any) -> StepMemory:
    """The per-device memory of a `jax.stages.Compiled` step (pmap or jit)."""
    stats = compiled.memory_analysis()
    if isinstance(stats, (list, tuple)):  # some runtimes report one entry per device
        stats = stats[0]
    return StepMemory(
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliases=int(stats.alias_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
    )


# XLA's TPU compiler refuses a program that does not fit the HBM, in one of two messages: the
# temporaries alone exceed it, or the whole program (arguments, program, reserved) does, with a
# breakdown. Sizes are HumanReadableNumBytes' (powers of 1024: "G" is GiB).
_TEMPORARIES = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"
)
_USED = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")
_PART = r"^\s*{}\s+([\d.]+)([KMGT])\s*$"
_UNITS = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}


def _gib(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


class OutOfMemory(Exception):
    """XLA refused to compile a step for lack of device memory (a TPU checks at compile time).

    Attributes:
      needed_gib: what XLA asked for: the temporaries (`arguments_gib` None) or the whole
        program with its arguments.
      usable_gib: the HBM XLA could use.
      arguments_gib, program_gib: the breakdown, when XLA gave one.
    """

    def __init__(self, needed_gib: float, usable_gib: float, *,
                 arguments_gib: float | None = None, program_gib: float | None = None):  # fmt: skip
        what = "temporaries" if arguments_gib is None else "arguments + program"
        super().__init__(f"{what} {needed_gib:.2f} GiB > the {usable_gib:.2f} GiB XLA can use")
        self.needed_gib, self.usable_gib = needed_gib, usable_gib
        self.arguments_gib, self.program_gib = arguments_gib, program_gib


def out_of_memory(error: BaseException) -> OutOfMemory | None:
    """XLA's refusal of a step that does not fit, read from `error`'s message; else None."""
    text = str(error)
    found = _TEMPORARIES.search(text)
    if found:
        return OutOfMemory(_gib(*found.group(1, 2)), _gib(*found.group(3, 4)))
    found = _USED.search(text)
    if not found:
        return None
    parts = {}
    for name in ("arguments", "program"):
        part = re.search(_PART.format(name), text, re.MULTILINE)
        parts[f"{name}_gib"] = _gib(*part.group(1, 2)) if part else None
    return OutOfMemory(_gib(*found.group(1, 2)), _gib(*found.group(3, 4)), **parts)


def compile_step(lowered: Any) -> Any:
    """`lowered.compile()`, with XLA's out-of-memory refusal raised as `OutOfMemory`."""
    import jax

    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        refusal = out_of_memory(error)
        if refusal is None:
            raise
        raise refusal from None


def _chip_share(device: Any) -> tuple[Chip, float] | None:
    chip = CHIPS.get(getattr(device, "device_kind", ""))
    if chip is None:
        return None
    cores = getattr(device, "num_cores", None) or chip.cores
    return chip, min(cores, chip.cores) / chip.cores


def device_memory_bytes(device: Any) -> int | None:
    """A device's memory: what its runtime reports, else the TPU table; None when unknown (a CPU,
    whose "device" is the host's memory, shared with everything else)."""
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # topology devices and some runtimes have no stats
            stats = {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    share = _chip_share(device)
    return int(share[0].hbm_bytes * share[1]) if share else None


def peak_flops(device: Any) -> float | None:
    """A TPU device's peak bf16 FLOP/s; None where the table has no entry."""
    share = _chip_share(device)
    return share[0].peak_bf16_flops * share[1] if share else None


def gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def fit_advice(cfg: Any, num_devices: int) -> str:
    """The flags that lower per-device memory and are not in use yet, biggest lever first."""
    advice = []
    if not cfg.training.gradient_checkpointing:
        advice.append("--gradient_checkpointing (recompute activations in the backward pass)")
    if (cfg.flax.parallelism != "mesh" or cfg.flax.fsdp_size == 1) and num_devices > 1:
        advice.append(
            f"--parallelism mesh --fsdp_size {num_devices} (shard params, AdamW moments "
            "and EMA over the devices)"
        )
    if cfg.flax.adam_moments_dtype == "float32":
        advice.append("--adam_moments_dtype bfloat16 (half the optimizer's memory)")
    if cfg.training.mixed_precision in (None, "no"):
        advice.append("--mixed_precision bf16 (bf16 activations)")
    if cfg.training.train_batch_size > 1:
        advice.append(
            f"a smaller --train_batch_size (now {cfg.training.train_batch_size}) with "
            "--gradient_accumulation_steps to keep the effective batch"
        )
    return "; ".join(advice) or "a smaller --resolution, or devices with more memory"
