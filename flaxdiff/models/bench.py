"""Forward-pass timing of a UNet built from a model YAML, in Flax (and diffusers, for reference).

    python -m flaxdiff.models.bench --model tiny            # configs/models/tiny.yaml
    python -m flaxdiff.models.bench --model sd15 --torch    # SD 1.5 shape, both frameworks

Prints one line per framework: parameters, compile time (Flax), median forward time over
``--steps`` runs after one warm-up, and the latent shape. Weights are random (host-side init);
timings do not depend on their values. ``--torch`` needs the torch extra (diffusers).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from flaxdiff.models import convert
from flaxdiff.models.layers import ATTENTION_IMPLEMENTATIONS, ModelOptions

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def _model_yaml(name: str) -> dict:
    path = Path(name) if name.endswith(".yaml") else CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise SystemExit(f"--model {name}: no such model YAML (known: {known}, or a .yaml path)")
    return yaml.safe_load(path.read_text())


def _inputs(unet_config: dict, *, batch: int, size: int, text_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    channels = unet_config.get("in_channels", 4)
    sample = rng.standard_normal((batch, size, size, channels), dtype=np.float32)  # NHWC
    timesteps = rng.integers(0, 1000, batch)
    context = None
    if unet_config["_class_name"] == "UNet2DConditionModel":
        dim = unet_config["cross_attention_dim"]
        dim = dim[0] if isinstance(dim, list) else dim
        context = rng.standard_normal((batch, text_len, dim), dtype=np.float32)
    return sample, timesteps, context


def time_flax(unet_config: dict, inputs, *, options: ModelOptions, steps: int) -> dict:
    start = time.perf_counter()
    model = convert.init_model(unet_config, options=options)
    init_s = time.perf_counter() - start
    graphdef, state = nnx.split(model)
    sample, timesteps, context = (None if a is None else jnp.asarray(a) for a in inputs)

    @jax.jit
    def forward(state, sample, timesteps, context):
        unet = nnx.merge(graphdef, state)
        return unet(sample, timesteps) if context is None else unet(sample, timesteps, context)

    start = time.perf_counter()
    compiled = forward.lower(state, sample, timesteps, context).compile()
    compile_s = time.perf_counter() - start
    compiled(state, sample, timesteps, context).block_until_ready()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        compiled(state, sample, timesteps, context).block_until_ready()
        times.append(time.perf_counter() - start)
    return {
        "framework": f"flax ({jax.devices()[0].platform}, {options.dtype.name}, {options.attention})",
        "params": convert.parameter_count(model),
        "init_s": init_s,
        "compile_s": compile_s,
        "forward_s": statistics.median(times),
    }


def time_torch(unet_config: dict, inputs, *, steps: int, dtype: str) -> dict:
    import diffusers  # reference timing only: needs the torch extra
    import torch

    model_cls = getattr(diffusers, unet_config["_class_name"])
    start = time.perf_counter()
    model = model_cls.from_config(unet_config).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    init_s = time.perf_counter() - start
    sample, timesteps, context = inputs
    args = [
        torch.from_numpy(sample.transpose(0, 3, 1, 2)).to(model.dtype),
        torch.from_numpy(timesteps),
    ]
    if context is not None:
        args.append(torch.from_numpy(context).to(model.dtype))
    times = []
    with torch.inference_mode():
        model(*args)  # warm-up
        for _ in range(steps):
            start = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - start)
    return {
        "framework": f"torch {torch.__version__} (cpu, {dtype}, {torch.get_num_threads()} threads)",
        "params": sum(p.numel() for p in model.parameters()),
        "init_s": init_s,
        "compile_s": 0.0,
        "forward_s": statistics.median(times),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="a configs/models name or a .yaml path")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=None,
                        help="latent/pixel size (default: the model's sample_size)")  # fmt: skip
    parser.add_argument("--text_len", type=int, default=77)
    parser.add_argument("--steps", type=int, default=5, help="timed forward passes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="dot_product", choices=ATTENTION_IMPLEMENTATIONS)
    parser.add_argument("--torch", action="store_true", help="also time diffusers' UNet")
    args = parser.parse_args(argv)

    unet_config = _model_yaml(args.model)["model"]["unet_config"]
    size = args.size or unet_config.get("sample_size") or 64
    inputs = _inputs(unet_config, batch=args.batch, size=size, text_len=args.text_len)
    rows = [
        time_flax(
            unet_config,
            inputs,
            options=ModelOptions(dtype=args.dtype, attention=args.attention),
            steps=args.steps,
        )
    ]
    if args.torch:
        rows.append(time_torch(unet_config, inputs, steps=args.steps, dtype=args.dtype))
    shape = f"batch {args.batch}, {size}x{size}"
    print(f"{unet_config['_class_name']} from --model {args.model}: {shape}")
    for row in rows:
        print(
            f"  {row['framework']}: {row['params']:,} params, init {row['init_s']:.1f} s, "
            f"compile {row['compile_s']:.1f} s, forward {row['forward_s'] * 1000:.1f} ms (median of {args.steps})"
        )


if __name__ == "__main__":
    main()
