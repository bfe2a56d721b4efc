"""One training config on both backends, fed the same weights, batch and draws (imported by name
by the training parity tests; see test_parity_training.py).

torchdiff runs as its trainer builds it (`torchdiff.trainer.setup`: a `Run`, then `compute_loss`
or `train_step`). flaxdiff runs the pure step of `flaxdiff.step.build_step` (and its
`make_micro_loss`) without `flaxdiff.trainer.setup`, which would compile a second step for the
trainer's batch shapes; its batch is what `flaxdiff.trainer._shard` makes of the same loader
batch. The weights are torch's: a pipeline folder torchdiff wrote (latent tasks, read by
flaxdiff's `--pretrained_model_name_or_path` loader), or the torch run's randomly initialized
UNet2DModel copied into the flax one (the unconditional task loads no weights on either side).

The standard-normal draws (and timesteps) ride in the batch under the keys both steps read:
``noise``, ``timesteps``, ``offset``, ``perturbation``, ``latent_noise`` and their ``class_``
twins, NCHW for torch and NHWC for flax.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from parity_helpers import float64_time_proj

from flaxdiff import diffusion as flax_diffusion
from flaxdiff import parallel
from flaxdiff import trainer as flax_trainer
from flaxdiff.components import Prompts, load_components
from flaxdiff.models.layers import Buffer, ModelOptions
from flaxdiff.models.state_dict import load_torch_state_dict, torch_state_dict
from flaxdiff.step import StepParts, build_step, make_micro_loss
from shared import cli
from shared.config import TrainConfig
from shared.run.task import task_spec
from torchdiff import diffusion as torch_diffusion
from torchdiff import trainer as torch_trainer

REPO = Path(__file__).resolve().parents[2]
TINY_DDPM = REPO / "configs" / "models" / "tiny-ddpm.yaml"
TINY_SD = REPO / "configs" / "models" / "tiny.yaml"
# The loss is float32 by contract on both backends; the float64 runs raise it to float64 on
# both (module constants read at call time), so that nothing but float64 rounding is left.
LOSS_DTYPES = {
    "float64": (jnp.float64, torch.float64),
    "float32": (jnp.float32, torch.float32),
}


def write_tiny_sd(folder: Path, tokenizer_dir: Path) -> Path:
    """A StableDiffusionPipeline folder of tiny.yaml written by torchdiff (random weights, seed 0)."""
    from torchdiff.export import save_pipeline
    from torchdiff.models import load_components as torch_components

    argv = ["--config", str(TINY_SD), "--tokenizer_name", str(tokenizer_dir), "--seed", "0",
            "--train_data_dir", str(folder)]  # fmt: skip
    components = torch_components(cli.parse_args(argv, task="text2image", backend="torch"))
    return save_pipeline(folder, components, unet=components.unet, text_encoder=None)


def set_loss_dtype(monkeypatch, dtype: str) -> None:
    flax_dtype, torch_dtype = LOSS_DTYPES[dtype]
    monkeypatch.setattr(flax_diffusion, "LOSS_DTYPE", flax_dtype)
    monkeypatch.setattr(torch_diffusion, "LOSS_DTYPE", torch_dtype)


def torch_run(task: str, argv: list[str], *, float64: bool) -> torch_trainer.Run:
    """`torchdiff.trainer.setup` of `argv`; float64: every model cast to float64."""
    run = torch_trainer.setup(
        cli.parse_args(argv, task=task, backend="torch"), torch_trainer.Task(task)
    )
    if float64:
        # In place: run.params and the optimizer keep pointing at the same Parameters.
        for model in (run.unet, run.components.vae, run.text_encoder):
            if model is not None:
                model.double()
        if run.ema is not None:  # its shadow weights were copied in float32 by setup
            run.ema.to(dtype=torch.float64)
        run.weight_dtype = torch.float64
        # diffusers computes the timestep embedding in float32 even in a float64 model.
        float64_time_proj(run.unet)
    return run


@dataclasses.dataclass
class FlaxSide:
    cfg: TrainConfig
    parts: StepParts
    micro_loss: Any
    shard: Any  # loader batches -> the step's device batch (flaxdiff.trainer._shard)


def flax_side(task: str, argv: list[str], run: torch_trainer.Run, *, float64: bool) -> FlaxSide:
    """The flax step of `argv` with the torch run's weights.

    float64: float64 models with einsum attention (`jax.nn.dot_product_attention` keeps a float32
    softmax); float32: the options the trainer uses.
    """
    # The mesh strategy on one device: the step is a plain `jax.jit` of the pure function.
    cfg = cli.parse_args([*argv, "--parallelism", "mesh"], task=task, backend="flax")
    spec = task_spec(cfg)
    if float64:
        options = ModelOptions(dtype="float64", param_dtype="float64", attention="einsum")
    else:
        options = ModelOptions.from_config(cfg)
    unconditional = task == "unconditional"
    components = load_components(cfg, options, abstract=unconditional)
    if unconditional:  # torch's random init, converted; copied: a float32 tensor's numpy view
        # shares its memory, which jax may keep and the torch optimizer would then change
        state = {k: v.detach().float().numpy().copy() for k, v in run.unet.state_dict().items()}
        load_torch_state_dict(components.unet, state, source="the torch run's UNet")
    strategy = parallel.strategy_from_config(cfg)
    parts = build_step(
        cfg, spec, components, strategy,
        learning_rate=run.plan.learning_rate, total_steps=run.plan.max_train_steps,
    )  # fmt: skip
    objective = flax_diffusion.Objective.from_config(cfg, components.scheduler_config)
    micro_loss = make_micro_loss(graphs=parts.graphs, objective=objective, cfg=cfg, spec=spec)
    prompts = Prompts(cfg, components.tokenizer_dir) if spec.text_conditioned else None
    stand_in = types.SimpleNamespace(spec=spec, prompts=prompts, embeddings=None, strategy=strategy)
    return FlaxSide(cfg, parts, micro_loss, lambda batches: flax_trainer._shard(stand_in, batches))


def make_draws(
    run: torch_trainer.Run, batch: dict[str, Any], *, dtype: str, seed: int
) -> dict[str, np.ndarray]:
    """Standard-normal draws (and timesteps) for `batch`, NCHW, as `compute_loss` reads them."""
    rng = np.random.default_rng(seed)
    spec, objective = run.spec, run.objective
    rows = len(batch["pixel_values"])
    size = batch["pixel_values"].shape[1]
    if spec.latent:
        vae = run.components.vae.config
        factor = 2 ** (len(vae.block_out_channels) - 1)
        shape = (rows, vae.latent_channels, size // factor, size // factor)
    else:
        shape = (rows, batch["pixel_values"].shape[-1], size, size)
    draws = {"noise": shape, "timesteps": None}
    if objective.noise_offset:
        draws["offset"] = (*shape[:2], 1, 1)
    if objective.input_perturbation:
        draws["perturbation"] = shape
    if spec.latent:
        draws["latent_noise"] = shape
    out = {}
    for prefix in ("", "class_") if spec.prior_preservation else ("",):
        for name, draw_shape in draws.items():
            if draw_shape is None:
                value = rng.integers(0, objective.num_train_timesteps, rows)
            else:
                value = rng.standard_normal(draw_shape).astype(dtype)
            out[prefix + name] = value
    return out


def torch_batch(batch: dict[str, Any], draws: dict[str, np.ndarray]) -> dict[str, Any]:
    return {**batch, **{k: torch.from_numpy(v) for k, v in draws.items()}}


def flax_batch(side: FlaxSide, batch: dict[str, Any], draws: dict[str, np.ndarray]) -> dict:
    device_batch = side.shard([batch])
    for name, value in draws.items():
        device_batch[name] = jnp.asarray(
            value.astype(np.int32) if value.ndim == 1 else value.transpose(0, 2, 3, 1)
        )
    return device_batch


def flax_loss_and_grads(side: FlaxSide, batch: dict) -> tuple[float, dict, dict[str, np.ndarray]]:
    """(loss, its parts, {"<model>.<torch key>": gradient}) of `make_micro_loss` on `batch`."""
    parts = side.parts
    value_and_grad = jax.jit(jax.value_and_grad(side.micro_loss, has_aux=True))
    (loss, metrics), grads = value_and_grad(
        parts.state["params"], parts.frozen, batch, jnp.int32(0), jax.random.key(0)
    )
    return float(loss), {k: float(v) for k, v in metrics.items()}, flax_as_torch(parts, grads)


def flax_as_torch(parts: StepParts, trees: dict) -> dict[str, np.ndarray]:
    """Trained-parameter trees ({"unet": ..., "text_encoder": ...}) keyed as torch's."""
    out = {}
    for name, tree in trees.items():
        model = parts.graphs[name].merge(tree, parts.frozen[name]["rest"])
        frozen = set(torch_state_dict(model, only=Buffer))
        for key, value in torch_state_dict(model, only=nnx.Param).items():
            if key not in frozen:
                out[f"{name}.{_plain(key)}"] = np.asarray(value)
    return out


def _plain(key: str) -> str:
    """A parameter name without the ``text_model.`` prefix of the CLIP checkpoint files, which
    flaxdiff's names keep and transformers 5's in-memory names drop."""
    return key.removeprefix("text_model.")


def torch_trained(run: torch_trainer.Run) -> dict[str, torch.nn.Parameter]:
    """The trained parameters, keyed "<model>.<torch key>" as `flax_as_torch` keys them."""
    models = {"unet": run.unet}
    if run.spec.train_text_encoder:
        models["text_encoder"] = run.text_encoder
    return {
        f"{name}.{_plain(key)}": p
        for name, model in models.items()
        for key, p in run.accelerator.unwrap_model(model).named_parameters()
        if p.requires_grad
    }


def torch_ema(run: torch_trainer.Run) -> dict[str, np.ndarray]:
    """The EMA (shadow) weights of the UNet, keyed as `torch_trained` keys them."""
    unet = run.accelerator.unwrap_model(run.unet)
    return {
        f"unet.{key}": shadow.detach().numpy().copy()
        for (key, _), shadow in zip(unet.named_parameters(), run.ema.shadow_params, strict=True)
    }


def torch_loss_and_grads(
    run: torch_trainer.Run, batch: dict[str, Any]
) -> tuple[float, dict, dict[str, np.ndarray]]:
    loss, metrics = torch_trainer.compute_loss(run, batch)
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in torch_trained(run).items()}
    return loss.item(), {k: v.item() for k, v in metrics.items()}, grads


def relative_error(actual, reference) -> float:
    """max |actual - reference| / max |reference| (the reference must not be all zeros)."""
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, f"shape {actual.shape} != {reference.shape}"
    scale = float(np.abs(reference).max())
    assert scale > 0, "the reference is all zeros: a relative error means nothing"
    return float(np.abs(actual - reference).max()) / scale


# Some gradients are zero in exact arithmetic: an attention key bias shifts every logit of a
# query row by one number, which the softmax removes; a bias added right before a group norm with
# one channel per group (tiny.yaml's last up block: 32 channels, 32 groups) is removed by the
# mean. Each backend returns rounding noise there, so a tensor whose reference gradient is below
# this fraction of the largest gradient is measured against the largest one instead of itself.
NEGLIGIBLE = 1e-6


def worst_relative_error(
    actual: dict, reference: dict, *, gradients: bool = False
) -> tuple[float, str]:
    """The largest per-tensor `relative_error` over matching keys, and its key.

    `gradients`: tensors below `NEGLIGIBLE` of the largest reference magnitude (true gradient
    zero) are measured against that largest magnitude.
    """
    assert set(actual) == set(reference), sorted(set(actual) ^ set(reference))[:8]
    magnitudes = {k: float(np.abs(np.asarray(v, np.float64)).max()) for k, v in reference.items()}
    overall = max(magnitudes.values())
    errors = {}
    for key, value in reference.items():
        diff = np.asarray(actual[key], np.float64) - np.asarray(value, np.float64)
        scale = magnitudes[key]
        if gradients and scale < NEGLIGIBLE * overall:
            scale = overall
        assert scale > 0, f"{key}: the reference is all zeros"
        errors[key] = float(np.abs(diff).max()) / scale
    key = max(errors, key=errors.get)
    return errors[key], key


def negligible_keys(reference: dict) -> list[str]:
    """The tensors `worst_relative_error(..., gradients=True)` measures against the largest."""
    magnitudes = {k: float(np.abs(np.asarray(v, np.float64)).max()) for k, v in reference.items()}
    overall = max(magnitudes.values())
    return sorted(k for k, m in magnitudes.items() if m < NEGLIGIBLE * overall)
