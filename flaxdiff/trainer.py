"""The flax trainer: one state pytree, one pure jitted step, the shared run control around it.

The file reads in three parts, as `torchdiff.trainer` does: `setup` builds a `Run` (model, data,
strategy, state placed on the devices, restored from a checkpoint), `make_train_step` builds the
pure `train_step(state, batch) -> (state, metrics)` that the strategy compiles once (pmap or a
jit over a data x fsdp mesh, state donated), and `train` is the loop that handles the events of
`shared.run.events` after each update. Checkpoints, resume rules, signals, the non-finite
policy, the LR and EMA values and the summary are `shared.run`'s, so a flax run and a torch run
of one config fire the same events at the same steps and write the same folder layout.

State: ``{"step", "params", "opt_state", "ema", "ema_step", "rng"}``: `step` counts every update
(it picks the LR and the noise key: ``fold_in(rng, step)``), `ema_step` counts the applied ones.

All three tasks run here: the unconditional `UNet2DModel` on pixels, and Stable Diffusion's
`UNet2DConditionModel` on VAE latents conditioned on CLIP text (text2image, DreamBooth with prior
preservation and generated class images). The VAE and the text encoder are frozen; training the
text encoder (`--train_text_encoder`) is torch-only for now and refused with that message.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from flaxdiff import checkpoint, distributed, optim, parallel, sampling
from flaxdiff.components import (
    CLASS_IMAGE_STEPS,
    Components,
    Prompts,
    export,
    load_components,
    make_text_sampler,
)
from flaxdiff.diffusion import Objective
from flaxdiff.models.layers import ModelOptions
from shared import cli, hub
from shared.config import ConfigError, TrainConfig
from shared.data import build_loader, build_source
from shared.data.class_images import generate_class_images
from shared.errors import TrainingError
from shared.grids import save_grid
from shared.plan import RunPlan, plan_run
from shared.run import checkpoints, events, report, resume
from shared.run import validation as validation_plan
from shared.run.nonfinite import NonFiniteGuard
from shared.run.output import prepare_output_dir
from shared.run.process import ProcessGroup
from shared.run.signals import StopSignal
from shared.run.task import TaskSpec, task_spec

logger = logging.getLogger(__name__)

# Flags whose torch feature has no JAX counterpart, with what to use instead.
_REFUSED = {
    "use_8bit_adam": "flax keeps AdamW moments in fp32 (a bf16 first moment is planned); remove it",
    "train_text_encoder": "the flax trainer keeps the text encoder frozen so far; use --backend "
    "torch to train it",
    "class_labels_conditioning": "DeepFloyd IF's class labels are torch-only; use --backend torch",
}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task module adds: its name (the loop is the same for all)."""

    name: str


@dataclasses.dataclass
class Run:
    """Everything `setup` builds; the step and the event handlers read it."""

    cfg: TrainConfig
    spec: TaskSpec
    group: ProcessGroup
    strategy: parallel.Strategy
    plan: RunPlan
    components: Components
    graphdef: Any
    params_template: Any  # the nnx.State the pure params dict is poured into
    rest: Any  # non-trainable variables (buffers), replicated constants of the step
    state: dict[str, Any]
    step_fn: Callable
    loader: Any
    prompts: Prompts | None
    guard: NonFiniteGuard
    step: int = 0
    step_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.checkpoint.output_dir)


def _check_supported(cfg: TrainConfig) -> None:
    for name, fix in _REFUSED.items():
        if cfg.get(name):
            raise ConfigError(f"--{name} has no flax counterpart: {fix}")


def _pure(state: nnx.State) -> dict:
    return state.to_pure_dict()


def _poured(template: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)  # a copy: the template stays untouched
    nnx.replace_by_pure_dict(state, pure)
    return state


@dataclasses.dataclass(frozen=True)
class Frozen:
    """The frozen models' graph definitions; their weights ride in `state["frozen"]`."""

    vae_def: Any = None
    vae_template: Any = None
    text_def: Any = None
    text_template: Any = None


def _pixels(x: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 1]) NHWC -> float32 in [-1, 1], on the device."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x.astype(jnp.float32) * 2.0 - 1.0


def make_train_step(
    *, graphdef, params_template, rest, frozen: Frozen, objective: Objective, optimizer,
    strategy, cfg, spec: TaskSpec,
) -> Callable:  # fmt: skip
    """The pure `train_step(state, batch) -> (state, metrics)` of one optimizer update."""
    accumulation = cfg.training.gradient_accumulation_steps
    use_ema = cfg.ema.use_ema
    use_mask = cfg.prompts.text_encoder_use_attention_mask

    def micro_loss(params, frozen_weights, micro, micro_step, key):
        unet = nnx.merge(graphdef, _poured(params_template, params), rest)
        noise_key, vae_key = jax.random.split(jax.random.fold_in(key, micro_step))
        pixels = _pixels(micro["pixel_values"])  # (B, H, W, 3)
        if spec.prior_preservation:  # instance then class examples, each device its own halves
            pixels = jnp.concatenate([pixels, _pixels(micro["class_pixel_values"])])
        if spec.latent:
            vae = nnx.merge(frozen.vae_def, _poured(frozen.vae_template, frozen_weights["vae"]))
            clean = jax.lax.stop_gradient(vae.latents_from_images(pixels, vae_key))
        else:
            clean = pixels
        context = None
        if spec.text_conditioned:
            text = nnx.merge(
                frozen.text_def, _poured(frozen.text_template, frozen_weights["text_encoder"])
            )
            ids, mask = micro["input_ids"], micro["attention_mask"]
            if spec.prior_preservation:
                ids = jnp.concatenate([ids, micro["class_input_ids"]])
                mask = jnp.concatenate([mask, micro["class_attention_mask"]])
            states = text(ids, mask if use_mask else None).last_hidden_state  # (B, L, D)
            context = jax.lax.stop_gradient(states)

        def predict(noisy, timesteps):
            out = unet(noisy, timesteps) if context is None else unet(noisy, timesteps, context)
            # Learned-variance UNets predict (mean, variance): train the mean half.
            return out[..., : clean.shape[-1]] if out.shape[-1] == 2 * clean.shape[-1] else out

        noised = objective.draw(noise_key, clean)
        if spec.dream:
            noised = objective.dream(
                noised, predict, detail_preservation=cfg.diffusion.dream_detail_preservation
            )
        return objective.loss(predict(noised.noisy, noised.timesteps), noised)

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        key = strategy.fold_in_device(key)
        frozen_weights = state.get("frozen", {})

        def value_and_grad(params, micro, micro_step):
            return jax.value_and_grad(micro_loss, has_aux=True)(
                params, frozen_weights, micro, micro_step, key
            )

        (loss, parts), grads = optim.accumulate_gradients(
            value_and_grad, state["params"], batch, accumulation_steps=accumulation
        )
        loss, parts, grads = strategy.mean((loss, parts, grads))
        update = optim.apply_gradients(
            optimizer, grads, state["opt_state"], state["params"], step=state["step"], loss=loss
        )
        new = {
            **state,
            "step": state["step"] + 1,
            "params": update.params,
            "opt_state": update.opt_state,
        }
        if use_ema:
            ema_step = state["ema_step"] + update.finite.astype(jnp.int32)
            moved = optim.ema_update(state["ema"], update.params, step=ema_step, cfg_ema=cfg.ema)
            new["ema"] = optim.select_tree(update.finite, moved, state["ema"])
            new["ema_step"] = ema_step
        metrics = {
            "train/loss": loss,
            "train/grad_norm": update.grad_norm,
            "train/finite": update.finite,
            **{f"train/{k}": v for k, v in parts.items()},
        }
        if use_ema:
            metrics["train/ema_decay"] = optim.ema_decay(new["ema_step"], cfg.ema)
        return new, metrics

    return train_step


# --- setup ------------------------------------------------------------------------------------


def setup(cfg: TrainConfig, task: Task) -> Run:
    """Checks what can be checked, builds the model, data and state, restores a checkpoint."""
    _check_supported(cfg)
    group = checkpoint.process_group()
    report.setup_logging(is_main=group.is_main)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    output_dir = prepare_output_dir(cfg, is_main=group.is_main)
    group.barrier()
    resume_from = checkpoints.find_resume(output_dir, cfg.checkpoint.resume_from_checkpoint)
    start = 0
    if resume_from is not None:
        start = int(checkpoints.read_trainer_state(resume_from)["global_step"])
        resume.check_resume_config(resume_from, cfg, step=start)
    if cfg.hub.push_to_hub and group.is_main:
        hub.check_access(cfg)
    if cfg.logging.report_to != "none" and group.is_main:
        logger.warning(
            "--report_to %s: the flax trainer writes no tracker events yet (the progress bar and "
            "train_summary.json report the run)",
            cfg.logging.report_to,
        )

    strategy = parallel.strategy_from_config(cfg)
    spec = task_spec(cfg)
    components = load_components(cfg, ModelOptions.from_config(cfg))
    if spec.makes_class_images:
        make_class_images(cfg, components, group)
    graphdef, params_state, rest = nnx.split(components.unet, nnx.Param, ...)
    frozen, frozen_weights = Frozen(), {}
    if spec.latent:
        vae_def, vae_state = nnx.split(components.vae)
        text_def, text_state = nnx.split(components.text_encoder)
        frozen = Frozen(vae_def, vae_state, text_def, text_state)
        frozen_weights = {"vae": _pure(vae_state), "text_encoder": _pure(text_state)}
    if group.is_main:
        source = build_source(cfg)  # the main process verifies the images; the others reuse it
    group.barrier()
    if not group.is_main:
        source = build_source(cfg)
    plan = plan_run(
        cfg,
        dataset_size=len(source),
        num_devices=strategy.num_devices,
        num_processes=strategy.process_count,
    )
    optimizer = optim.build_optimizer(
        cfg, learning_rate=plan.learning_rate, total_steps=plan.max_train_steps
    )
    params = _pure(params_state)
    host_state = {
        "step": np.int32(0),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": np.asarray(jax.random.key_data(jax.random.key(cfg.seed))),
    }
    if cfg.ema.use_ema:
        host_state["ema"] = jax.tree.map(np.array, params)
        host_state["ema_step"] = np.int32(0)
    guard = NonFiniteGuard(cfg.training.max_nonfinite_steps, str(output_dir))
    loader_state = None
    if resume_from is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), host_state)
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        host_state = checkpoint.restore(resume_from, abstract, one_device, layout="mesh")
        guard.restore(checkpoints.read_trainer_state(resume_from))
        loader_state = checkpoints.read_loader_state(resume_from, group.index)
        logger.info("resumed from %s at step %d", resume_from, start)
    if frozen_weights:
        host_state["frozen"] = frozen_weights  # never checkpointed: it is the base model's
    state = strategy.place(host_state)
    step_fn = strategy.compile(
        make_train_step(
            graphdef=graphdef,
            params_template=params_state,
            rest=rest,
            frozen=frozen,
            objective=Objective.from_config(cfg, components.scheduler_config),
            optimizer=optimizer,
            strategy=strategy,
            cfg=cfg,
            spec=spec,
        )
    )
    prompts = Prompts(cfg, components.tokenizer_dir) if spec.text_conditioned else None
    loader = build_loader(
        cfg,
        source,
        batch_size=plan.per_process_batch_size,
        process_index=group.index,
        process_count=group.count,
        state=loader_state,
    )
    logger.info(
        "%s on %d device(s) (%s): %s; %d updates of %d examples (lr %g)",
        cfg.task,
        strategy.num_devices,
        strategy.name,
        source.describe(),
        plan.max_train_steps,
        plan.effective_batch_size,
        plan.learning_rate,
    )
    return Run(
        cfg=cfg,
        spec=spec,
        group=group,
        strategy=strategy,
        plan=plan,
        components=components,
        graphdef=graphdef,
        params_template=params_state,
        rest=rest,
        state=state,
        step_fn=step_fn,
        loader=loader,
        prompts=prompts,
        guard=guard,
        step=start,
    )


def make_class_images(cfg: TrainConfig, components: Components, group: ProcessGroup) -> int:
    """DreamBooth's missing class images, sampled with the base model (shared planning)."""
    draw = make_text_sampler(
        components,
        cfg,
        unet_def=nnx.graphdef(components.unet),
        scheduler_name="DPMSolverMultistepScheduler",
        steps=CLASS_IMAGE_STEPS,
    )
    prompts = Prompts(cfg, components.tokenizer_dir)
    unet_state = nnx.state(components.unet)
    base = jax.random.fold_in(jax.random.key(cfg.seed), group.index)
    counter = iter(range(1 << 30))

    def sample(batch_prompts: list[str]) -> list[np.ndarray]:
        images = []
        for prompt in batch_prompts:
            tokens = prompts(["", prompt])
            keys = jax.random.split(jax.random.fold_in(base, next(counter)), 1)
            out = draw(unet_state, tokens["input_ids"], tokens["attention_mask"], keys)
            images.append((np.asarray(out[0]) * 255 + 0.5).astype(np.uint8))
        return images

    return generate_class_images(cfg, sample, group=group)


# --- events -----------------------------------------------------------------------------------


def _layout(run: Run) -> str:
    return "pmap" if run.strategy.name == "pmap" else "mesh"


def save_checkpoint(run: Run) -> Path:
    # The frozen VAE and text encoder are the base model's: a checkpoint holds what training changed.
    trained = {k: v for k, v in run.state.items() if k != "frozen"}
    return checkpoint.save(
        run.output_dir,
        trained,
        group=run.group,
        step=run.step,
        trainer_state={"global_step": run.step, **run.guard.state()},
        config_text=cli.to_yaml(run.cfg),
        loader_state=run.loader.state(),
        limit=run.cfg.checkpoint.checkpoints_total_limit,
        layout=_layout(run),
    )


def _host_model(run: Run) -> nnx.Module:
    """The trained UNet on the host, EMA weights when kept (for sampling and export)."""
    params = run.strategy.unreplicate(run.state["ema" if run.cfg.ema.use_ema else "params"])
    return nnx.merge(run.graphdef, _poured(run.params_template, params), run.rest)


def _sample_ddpm(run: Run, model: nnx.Module, plan) -> np.ndarray:
    graphdef, state = nnx.split(model)
    size, channels = run.cfg.data.resolution, model.config.in_channels
    key = jax.random.key(plan.seed)
    noise = jax.random.normal(key, (plan.images_per_prompt, size, size, channels))
    sampler = sampling.sampler_from_config(run.components.scheduler_config, "DDPMScheduler")

    @jax.jit
    def draw(state, noise, key):
        net = nnx.merge(graphdef, state)
        return sampling.sample(
            lambda x, t: net(x, t)[..., :channels],
            noise,
            scheduler=sampler,
            num_inference_steps=plan.num_inference_steps,
            key=key,
        )

    images = np.clip(np.asarray(draw(state, noise, jax.random.fold_in(key, 1))) / 2 + 0.5, 0, 1)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _sample_text(run: Run, model: nnx.Module, plan) -> np.ndarray:
    graphdef, state = nnx.split(model)
    draw = make_text_sampler(
        run.components,
        run.cfg,
        unet_def=graphdef,
        scheduler_name=run.cfg.validation.validation_scheduler,
        steps=plan.num_inference_steps,
    )
    key = jax.random.key(plan.seed)
    images = []
    for i, prompt in enumerate(plan.prompts):
        tokens = run.prompts(["", prompt])
        keys = jax.random.split(jax.random.fold_in(key, i), plan.images_per_prompt)
        images.append(np.asarray(draw(state, tokens["input_ids"], tokens["attention_mask"], keys)))
    return np.concatenate(images)


def validate(run: Run, tag: str = "validation") -> Path | None:
    """Samples the validation round of `shared.run.validation` and saves its grid (main process)."""
    cfg = run.cfg
    if not run.group.is_main or not validation_plan.wants_validation(cfg):
        return None
    plan = validation_plan.plan_validation(cfg)
    model = _host_model(run)
    images = _sample_text(run, model, plan) if run.spec.latent else _sample_ddpm(run, model, plan)
    path = save_grid(images, validation_plan.grid_path(cfg, tag=tag, step=run.step), rows=plan.rows)
    logger.info("validation images of step %d: %s", run.step, path)
    return path


def export_pipeline(run: Run, *, commit: str | None = None) -> None:
    """Writes the diffusers folder (EMA weights with --use_ema); refuses non-finite weights."""
    if not checkpoint.all_finite(run.state):
        raise TrainingError(
            f"the weights are not finite at step {run.step}: no export written; resume from the "
            "last good checkpoint with a lower --learning_rate"
        )
    if not run.group.is_main:
        return
    export(
        run.components,
        _host_model(run),
        run.output_dir,
        save_text_encoder=run.spec.save_text_encoder,
    )
    if commit is not None and run.cfg.hub.push_to_hub:
        hub.push(run.cfg, commit_message=commit)


def _shard(run: Run, batches: list[dict[str, Any]]) -> Any:
    """The micro-batches of one update as one device batch (accumulation x B rows per key)."""
    device_batch = {"pixel_values": np.concatenate([b["pixel_values"] for b in batches])}
    if run.spec.prior_preservation:
        device_batch["class_pixel_values"] = np.concatenate(
            [b["class_pixel_values"] for b in batches]
        )
    if run.prompts is not None:
        captions = [c for b in batches for c in b["captions"]]
        device_batch.update(run.prompts(captions))
        if run.spec.prior_preservation:
            class_prompts = [c for b in batches for c in b["class_prompt"]]
            tokens = run.prompts(class_prompts)
            device_batch["class_input_ids"] = tokens["input_ids"]
            device_batch["class_attention_mask"] = tokens["attention_mask"]
    return run.strategy.shard_batch(device_batch)


def train(cfg: TrainConfig, task: Task) -> Path:
    """Trains as `cfg` says and writes the diffusers folder; returns `--output_dir`."""
    accumulation = cfg.training.gradient_accumulation_steps
    with StopSignal() as stop:
        run = setup(cfg, task)
        lrs = optim.learning_rate_schedule(
            cfg, base_lr=run.plan.learning_rate, total_steps=run.plan.max_train_steps
        )
        bar = tqdm(
            total=run.plan.max_train_steps,
            initial=run.step,
            desc="steps",
            disable=not run.group.is_main,
        )
        handlers = events.Handlers(
            checkpoint=lambda: save_checkpoint(run),
            validate=lambda: validate(run),
            export=lambda commit: export_pipeline(run, commit=commit),
            stop_requested=lambda: stop.requested_anywhere(run.group),
        )
        with run.loader, bar:
            stop.start_training()
            while run.step < run.plan.max_train_steps:
                started = time.perf_counter()
                epoch_before = run.loader.state()["epoch"]
                batch = _shard(run, [next(run.loader) for _ in range(accumulation)])
                run.state, metrics = run.step_fn(run.state, batch)
                metrics = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}
                run.step_times.append(time.perf_counter() - started)  # includes the compile once
                lr = float(lrs(run.step))
                run.step += 1
                finite = bool(metrics.pop("train/finite"))
                run.guard.record(
                    step=run.step,
                    finite=finite,
                    loss=metrics["train/loss"],
                    grad_norm=metrics["train/grad_norm"],
                    lr=lr,
                )
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{lr:.3g}")
                due = events.after_update(
                    cfg,
                    step=run.step,
                    epoch_before=epoch_before,
                    epoch_after=run.loader.state()["epoch"],
                )
                if events.handle(due, handlers, step=run.step):
                    return run.output_dir
        export_pipeline(run)
        image = validate(run, tag="final")
        if run.group.is_main:
            report.write_summary(
                run.output_dir,
                steps=run.plan.max_train_steps,
                step_times=run.step_times,
                peak_memory_bytes=report.peak_rss_bytes(),
                device=f"{jax.devices()[0].platform} x{run.strategy.num_devices}",
                skipped_steps=run.guard.skipped,
                extra={"parallelism": run.strategy.name},
            )
            if cfg.hub.push_to_hub:
                images = [str(image.relative_to(run.output_dir))] if image else []
                hub.push(cfg, commit_message="End of training", images=images)
    return run.output_dir


def main(task: Task, argv: Sequence[str] | None = None) -> int:
    """`python -m flaxdiff.<task> ARGV`: parse the flags (and `--config` files), train."""
    distributed.initialize()  # before anything asks JAX for its devices
    train(cli.parse_args(argv, task=task.name, backend="flax"), task)
    sys.stdout.flush()
    return 0
