"""`python -m flaxdiff.plan`: will a config fit a TPU, and how fast would it run, without a TPU.

The real train step of a config (`flaxdiff.step.build_step`: the same models, objective,
optimizer, EMA, accumulation and parallelism a run compiles) is lowered on shapes only
(`jax.ShapeDtypeStruct`s laid out on a TPU topology's devices) and compiled by XLA for that TPU;
libtpu does this on any Linux x86 machine (the dev install has it). No weight is read or
allocated: pretrained folders and hub ids give their configs only.

    python -m flaxdiff.plan dreambooth --topology v3-8 --config configs/models/sd15.yaml \
        --resolution 512 --with_prior_preservation --mixed_precision bf16 ...

prints, per topology, the memory per device (arguments: state and batch; temporaries:
activations, gradients, collectives) against the device's HBM, the FLOPs per device per step,
XLA's estimated step time (its cost model, uncalibrated: use it to compare settings, not to
promise a speed), and the implied images per second per device and model-FLOPs utilization.
`--json PATH` writes the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxdiff import memory, parallel, step
from flaxdiff.components import load_components, text_length
from flaxdiff.models.layers import ModelOptions
from shared import cli
from shared.config import ConfigError, TrainConfig
from shared.run import report
from shared.run.task import task_spec

logger = logging.getLogger(__name__)

# Slice names (as `gcloud compute tpus tpu-vm create --accelerator-type` spells them) -> the
# topology libtpu compiles for. A topology name ("v4:2x2x2") is accepted as it is.
TOPOLOGIES = {
    "v3-8": "v3:2x2",
    "v4-8": "v4:2x2x1",
    "v5p-8": "v5p:2x2x1",
    "v5e-4": "v5e:2x2",
    "v6e-4": "v6e:2x2",
}

_MEGACORE = ("v4", "v5p")

# libtpu looks for a TPU VM's metadata and a lock file at start; compiling for a topology needs
# neither. Set only in this process (the planner never runs a TPU program).
_OFFLINE_LIBTPU = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_ID": "0",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_MIN_LOG_LEVEL": "3",
}


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of a TPU slice (`TOPOLOGIES` key or topology name), to compile for.

    Raises:
      ConfigError: libtpu is missing or does not know the name.
    """
    topology = TOPOLOGIES.get(name, name)
    for key, value in _OFFLINE_LIBTPU.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name if name in TOPOLOGIES else "v3-8")
    from jax.experimental import topologies

    # v4 and v5p chips run as one JAX device each (megacore), as on a real TPU VM of them.
    options = {"chip_config_name": "megacore"} if topology.split(":")[0] in _MEGACORE else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
        return list(desc.devices)
    except Exception as error:  # libtpu raises RuntimeError/XlaRuntimeError with its reason
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"--topology {name}: cannot compile for {topology} ({first}); install libtpu "
            f"(pip install 'libtpu==0.0.42.*' for jax 0.10) and name a slice of "
            f"{', '.join(TOPOLOGIES)} or a topology such as v4:2x2x2"
        ) from None


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one compile of a config's step for one topology says."""

    topology: str
    device_kind: str
    devices: int
    parallelism: str
    fsdp_size: int
    images_per_device: int  # per step through the UNet (instance + class images with prior)
    arguments_bytes: int
    temporaries_bytes: int
    total_bytes: int
    hbm_bytes: int | None
    flops_per_device: float | None  # None: XLA refused to compile (out of memory)
    step_seconds: float | None  # XLA's estimate
    compile_seconds: float
    out_of_memory: str | None = None  # XLA's reason when it refused

    @property
    def fits(self) -> bool | None:
        if self.out_of_memory:
            return False
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    @property
    def images_per_second_per_device(self) -> float | None:
        return self.images_per_device / self.step_seconds if self.step_seconds else None

    def mfu(self, peak: float | None) -> float | None:
        """Model FLOPs utilization by XLA's estimate: FLOPs per second over the device's peak."""
        if not self.step_seconds or not peak or self.flops_per_device is None:
            return None
        return self.flops_per_device / self.step_seconds / peak

    def to_dict(self, peak: float | None) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "fits": self.fits,
            "images_per_second_per_device": self.images_per_second_per_device,
            "mfu": self.mfu(peak),
        }


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older runtimes: one dict per program
        cost = cost[0]
    return dict(cost or {})


def state_bytes_per_device(strategy: parallel.Strategy, abstract_state: Any) -> int:
    """Bytes of the state one device keeps: all of it under pmap, its shards on the mesh (the
    logical size; TPU layouts pad small dimensions)."""
    if isinstance(strategy, parallel.MeshStrategy):
        return parallel.bytes_per_device(abstract_state, strategy.shardings(abstract_state))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def estimate(cfg: TrainConfig, devices: Sequence[jax.Device], *, topology: str) -> Estimate:
    """Compiles `cfg`'s train step for `devices` (shapes only) and reads XLA's analyses."""
    spec = task_spec(cfg)
    components = load_components(cfg, ModelOptions.from_config(cfg), abstract=True)
    strategy = parallel.strategy_from_config(cfg, devices)
    step.check_attention(cfg, strategy.devices)
    precomputed = spec.text_conditioned and cfg.prompts.pre_compute_text_embeddings
    parts = step.build_step(
        cfg, spec, components, strategy,
        learning_rate=cfg.optim.learning_rate,
        total_steps=max(cfg.training.max_train_steps or 1, 1),
        text_encoder=not precomputed,
    )  # fmt: skip
    accumulation = cfg.training.gradient_accumulation_steps
    length = text_length(cfg, components) if spec.text_conditioned else 0
    shapes = step.batch_shapes(
        cfg, spec, components,
        rows=strategy.local_batch_size * accumulation, text_length=length, embeddings=precomputed,
    )  # fmt: skip
    state = {**parts.state, "frozen": parts.frozen}
    started = time.perf_counter()
    lowered = strategy.compile(parts.train_step).lower(*strategy.abstract_inputs(state, shapes))
    images = cfg.training.train_batch_size * accumulation * (2 if spec.prior_preservation else 1)
    layout = {
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "parallelism": strategy.name,
        "fsdp_size": cfg.flax.fsdp_size if strategy.name == "mesh" else 1,
        "images_per_device": images,
        "hbm_bytes": memory.device_memory_bytes(devices[0]),
    }
    try:
        compiled = memory.compile_step(lowered)
    except memory.OutOfMemory as error:
        batch = sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize // strategy.local_device_count
            for x in jax.tree.leaves(shapes)
        )
        if error.arguments_gib is None:  # XLA named the temporaries alone
            arguments = state_bytes_per_device(strategy, state) + batch
            temporaries = int(error.needed_gib * memory.GIB)
            total = arguments + temporaries
        else:
            arguments = int(error.arguments_gib * memory.GIB)
            temporaries = int((error.program_gib or 0.0) * memory.GIB)
            total = int(error.needed_gib * memory.GIB)
        return Estimate(
            **layout,
            arguments_bytes=arguments,
            temporaries_bytes=temporaries,
            total_bytes=total,
            flops_per_device=None,
            step_seconds=None,
            compile_seconds=time.perf_counter() - started,
            out_of_memory=str(error),
        )
    seconds = time.perf_counter() - started
    need = memory.step_memory(compiled)
    cost = _cost(compiled)
    return Estimate(
        **layout,
        arguments_bytes=need.arguments,
        temporaries_bytes=need.temporaries,
        total_bytes=need.total,
        flops_per_device=float(cost.get("flops", 0.0)),
        step_seconds=float(cost["optimal_seconds"]) if cost.get("optimal_seconds") else None,
        compile_seconds=seconds,
    )


def _row(e: Estimate, peak: float | None) -> list[str]:
    fits = {True: "yes", False: "NO", None: "?"}[e.fits]
    ips, mfu = e.images_per_second_per_device, e.mfu(peak)
    return [
        e.topology,
        f"{e.parallelism}" + (f" fsdp={e.fsdp_size}" if e.parallelism == "mesh" else ""),
        str(e.images_per_device),
        f"{e.arguments_bytes / memory.GIB:.2f}",
        f"{e.temporaries_bytes / memory.GIB:.2f}",
        f"{e.total_bytes / memory.GIB:.2f} / "
        + ("?" if e.hbm_bytes is None else f"{e.hbm_bytes / memory.GIB:.0f}"),
        fits,
        "?" if e.flops_per_device is None else f"{e.flops_per_device / 1e12:.2f}",
        "?" if e.step_seconds is None else f"{e.step_seconds:.3f}",
        "?" if ips is None else f"{ips:.1f}",
        "?" if mfu is None else f"{100 * mfu:.0f}%",
    ]


HEADER = [
    "topology", "layout", "img/dev/step", "args GiB", "temp GiB", "total/HBM GiB", "fits",
    "TFLOP/dev", "est. s/step", "img/s/dev", "est. MFU",
]  # fmt: skip


def format_table(estimates: Sequence[tuple[Estimate, float | None]]) -> str:
    rows = [HEADER, *(_row(e, peak) for e, peak in estimates)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxdiff.plan",
        description="Compile a config's train step for a TPU topology (no TPU needed) and print "
        "its memory per device, FLOPs and XLA's step-time estimate. Other flags are the "
        "training flags of the task.",
    )
    parser.add_argument("task", choices=("unconditional", "text2image", "dreambooth"))
    parser.add_argument(
        "--topology", action="append", required=True,
        help=f"a slice ({', '.join(TOPOLOGIES)}) or a topology name (v4:2x2x2); repeatable",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the estimates here")
    args, rest = parser.parse_known_args(argv)
    jax.config.update("jax_platforms", "cpu")  # the planner runs nothing on a device
    report.setup_logging(is_main=True)
    cfg = cli.parse_args(rest, task=args.task, backend="flax")
    estimates = []
    for name in args.topology:
        devices = topology_devices(name)
        logger.info("compiling the %s step for %s (%d devices)", args.task, name, len(devices))
        e = estimate(cfg, devices, topology=name)
        estimates.append((e, memory.peak_flops(devices[0])))
    print(format_table(estimates))
    print("est.: XLA's cost model for the compiled step, uncalibrated; compare settings with it.")
    for e, _ in estimates:
        if e.out_of_memory:
            print(
                f"{e.topology}: XLA refused the step ({e.out_of_memory}); arguments are the "
                f"state and batch each device keeps. To fit: {memory.fit_advice(cfg, e.devices)}"
            )
    if args.json:
        records = [e.to_dict(peak) for e, peak in estimates]
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
