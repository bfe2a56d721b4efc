"""`twindiff`: one command for both backends.

    twindiff demo [--backend flax|torch] [flags...]        digits: train, sample, score (quick start)
    twindiff demo dreambooth [--backend B] [flags...]      DreamBooth on the tiny model, offline
    twindiff TASK [--backend flax|torch] [--config F.yaml] [flags...]
                                     train TASK (unconditional, text2image, dreambooth) on a backend
    twindiff TASK --help                                   every flag, its default and its backends
    twindiff bench [--preset tiny|ddpm-128|sd15] [...]     time one config on both backends
    twindiff config TASK [--backend B] [flags...]          print the resolved config as YAML

The backend comes from --backend, else the config file's `backend:`, else the first installed
(flax, then torch). With --num_processes N (N > 1), torch re-runs under `accelerate launch`.
The launcher is one of the places (with `shared.api` and the parity tests) that know both backends;
it reaches them by module name only, so `shared` still imports neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from shared import cli
from shared import config as C
from shared.api import check_backend, default_backend
from shared.config import ConfigError
from shared.run.report import setup_logging

logger = logging.getLogger("twindiff")
DEMO_CONFIG = "demo.yaml"


def _pop_option(args: list[str], name: str, default: str | None) -> str | None:
    """Removes `--name value` / `--name=value` from args and returns the value."""
    for i, token in enumerate(args):
        if token == f"--{name}":
            if i + 1 >= len(args):
                raise ConfigError(f"--{name} needs a value")
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if token.startswith(f"--{name}="):
            del args[i]
            return token.split("=", 1)[1]
    return default


def _backend_module(backend: str, task: str) -> str | None:
    name = f"{backend}diff.{task}"
    return name if importlib.util.find_spec(name) is not None else None


def run_task(task: str, backend: str, args: Sequence[str]) -> None:
    """Runs `python -m {backend}diff.{task} args` in this process."""
    check_backend(backend)
    module = _backend_module(backend, task)
    if module is None:
        raise ConfigError(f"this twindiff has no {backend}diff.{task} module to run")
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:  # the task's own exit: success goes on, failure propagates
        if done.code not in (0, None):
            raise


def demo_args(assets, flags: Sequence[str]) -> list[str]:
    """The demo's command line: demo.yaml, the generated asset paths, then the user's flags."""
    return [
        "--config", DEMO_CONFIG,
        "--instance_data_dir", str(assets.instance_dir),
        "--class_data_dir", str(assets.class_dir),
        "--tokenizer_name", str(assets.tokenizer_dir),
        *flags,
    ]  # fmt: skip


def _print_training_report(report: dict) -> None:
    out = Path(report["output_dir"])
    summary_path = out / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    images = sorted((out / "validation").glob("*.png"))
    lines = [
        f"twindiff demo dreambooth: trained with {report['trained_with']}",
        f"  model     {out} (diffusers format: DiffusionPipeline.from_pretrained({str(out)!r}))",
        *(f"  images    {path}" for path in images[-2:]),
    ]
    if summary.get("mean_step_seconds") is not None:
        lines.append(
            f"  speed     {summary['mean_step_seconds']:.3f} s per step on {summary['device']}, "
            f"peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    print("\n".join(lines))


def config_backend(args: Sequence[str]) -> str | None:
    """The `backend:` of the --config files among `args`, the last one that names one."""
    configs, _ = cli.parse_cli(args)
    backend = None
    for path in configs:
        backend = cli.load_yaml(path).get("backend", backend)
    return backend


def launch_processes(task: str, backend: str, processes: int, args: list[str]) -> int:
    """`accelerate launch --num_processes N -m torchdiff.TASK args` (gloo on a CPU machine)."""
    if backend != "torch":
        raise ConfigError(
            "--num_processes is for --backend torch; flaxdiff runs one process per host and "
            "uses every local device (see tpu/README.md for several hosts)"
        )
    check_backend(backend)
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", f"torchdiff.{task}", *args,
    ]  # fmt: skip
    env = dict(os.environ)
    torch = importlib.import_module("torch")  # by name: shared imports no framework itself
    if torch.cuda.device_count() < processes:
        env["ACCELERATE_USE_CPU"] = "1"  # several CPU processes over gloo
    return subprocess.call(command, env=env)


def run_demo(args: list[str]) -> dict:
    """The offline demos: the digits quick start (default), or `dreambooth`."""
    if args and args[0] == "dreambooth":
        return run_dreambooth_demo(args[1:])
    from shared import quickstart

    backend = _pop_option(args, "backend", None) or default_backend()
    check_backend(backend)
    return quickstart.run(backend, args)


def run_dreambooth_demo(args: list[str]) -> dict:
    """Builds the assets, then trains DreamBooth on the tiny model."""
    from shared.demo import build_demo_assets

    backend = _pop_option(args, "backend", None) or default_backend()
    check_backend(backend)
    assets_dir = _pop_option(args, "assets", None)
    _, cli_values = cli.parse_cli(args)
    output_dir = cli_values.get("output_dir") or cli.load_yaml(DEMO_CONFIG)["output_dir"]
    assets = build_demo_assets(assets_dir or str(Path(output_dir) / "assets"))
    run_task("dreambooth", backend, demo_args(assets, args))
    report = {"trained_with": f"{backend}diff.dreambooth", "output_dir": output_dir}
    _print_training_report(report)
    return report


# XLA on a CPU allocates a step's temporaries (hundreds of MB for the tiny models) afresh every
# step; glibc maps so large a block anew each time, and touching it costs one page fault per 4 KiB
# page: 160,000 faults and 0.3 s of kernel time per step of `twindiff bench`'s tiny preset. With
# huge pages (2 MiB) the flax step took 0.57 s instead of 0.79 s there, the torch step the same.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def _reexec_with_malloc_tunables(args: list[str]) -> None:
    """Runs this command again with `MALLOC_TUNABLES` set, once, on Linux. glibc reads its
    tunables at process start only; a user's own GLIBC_TUNABLES, or TWINDIFF_MALLOC_TUNABLES=0,
    is left alone."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return
    if os.environ.get("TWINDIFF_MALLOC_TUNABLES") == "0":
        return
    env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "shared.launcher", *args], env)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the console script; a caller passing argv keeps its process
        _reexec_with_malloc_tunables(sys.argv[1:])
    # Quiet by default; a trainer started from here sets up logging again for its process.
    setup_logging(default="WARNING")
    args = list(sys.argv[1:] if argv is None else argv)
    usage = __doc__.split("\n\n")[1]
    if not args or args[0] in ("-h", "--help"):
        print(f"usage:\n{usage}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "demo":
            run_demo(rest)
        elif command == "config":
            if not rest:
                raise ConfigError("usage: twindiff config TASK [--backend B] [flags...]")
            task, flags = rest[0], rest[1:]
            backend = _pop_option(flags, "backend", "flax")
            print(cli.to_yaml(cli.parse_args(flags, task=task, backend=backend)), end="")
        elif command == "bench":
            return importlib.import_module("shared.bench").main(rest)
        elif command in C.TASKS:
            backend = _pop_option(rest, "backend", None)
            if "-h" in rest or "--help" in rest:
                print(cli.format_help(command, backend))
                return 0
            backend = backend or config_backend(rest) or default_backend()
            processes = int(_pop_option(rest, "num_processes", "1"))
            if processes > 1:
                return launch_processes(command, backend, processes, rest)
            run_task(command, backend, rest)
        else:
            raise ConfigError(
                f"unknown command {command!r}; commands: demo, bench, config, {', '.join(C.TASKS)}"
            )
    except ConfigError as err:
        print(f"twindiff: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
