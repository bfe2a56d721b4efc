"""The flax trainer: the state on the devices, the pure step of `flaxdiff.step`, the shared run
control around it.

The file reads in two parts, as `torchdiff.trainer` does: `setup` builds a `Run` (models, data,
strategy, the state placed on the devices or restored from a checkpoint, the step compiled ahead
of time for pmap or a data x fsdp mesh, state donated), and `train` is the loop that handles the
events of `shared.run.events` after each update. Checkpoints, resume rules, signals, the
non-finite policy, the LR and EMA values and the summary are `shared.run`'s, so a flax run and a
torch run of one config fire the same events at the same steps and write the same folder layout.

All three tasks run here: the unconditional `UNet2DModel` on pixels, and Stable Diffusion's
`UNet2DConditionModel` on VAE latents conditioned on CLIP text (text2image, DreamBooth with prior
preservation, generated class images, the text encoder trained or its prompts pre-computed).

Before step 1 the compile time is reported once and the step's memory is checked against the
devices' (`flaxdiff.memory`): a run that cannot fit stops with the flags that would make it fit.
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

from flaxdiff import checkpoint, distributed, generate, memory, optim, parallel, sampling
from flaxdiff.components import (
    CLASS_IMAGE_STEPS,
    Components,
    Prompts,
    TextSampler,
    export,
    load_components,
)
from flaxdiff.models.layers import ModelOptions, set_options
from flaxdiff.step import Graph, batch_shapes, build_step, check_attention
from flaxdiff.trackers import Trackers
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
from shared.run.task import TaskSpec, image_channels, task_spec

logger = logging.getLogger(__name__)


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
    graphs: dict[str, Graph]
    state: dict[str, Any]
    step_fn: Callable
    loader: Any
    prompts: Prompts | None
    embeddings: dict[str, np.ndarray] | None  # --pre_compute_text_embeddings: prompt -> (L, D)
    guard: NonFiniteGuard
    trackers: Trackers
    step: int = 0
    step_times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)  # this run's, per update
    compile_seconds: float | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.checkpoint.output_dir)


# --- setup ------------------------------------------------------------------------------------


def _compile(
    cfg: TrainConfig, strategy: parallel.Strategy, step_fn: Callable, state, batch
) -> tuple[Any, float]:
    """The step compiled ahead of time for `state` and `batch`'s shapes, and the seconds taken.

    Raises:
      ConfigError: XLA refused the step for lack of device memory (a TPU checks at compile).
    """
    started = time.perf_counter()
    lowered = step_fn.lower(*strategy.abstract_inputs(state, batch))
    try:
        compiled = memory.compile_step(lowered)
    except memory.OutOfMemory as error:
        raise ConfigError(
            f"the train step does not fit one {strategy.platform} device ({error}): try "
            f"{memory.fit_advice(cfg, strategy.num_devices)}"
        ) from None
    return compiled, time.perf_counter() - started


def check_fits(cfg: TrainConfig, compiled: Any, strategy: parallel.Strategy) -> None:
    """Stops before step 1 when the compiled step needs more memory than a device has."""
    need = memory.step_memory(compiled)
    limit = memory.device_memory_bytes(jax.local_devices()[0])
    logger.info(
        "per device: %s (arguments %s, temporaries %s)%s",
        memory.gib(need.total),
        memory.gib(need.arguments),
        memory.gib(need.temporaries),
        f" of {memory.gib(limit)}" if limit else "",
    )
    if limit and need.total > limit:
        raise ConfigError(
            f"the train step needs {memory.gib(need.total)} per device, more than the "
            f"{memory.gib(limit)} of this {strategy.platform}: try "
            f"{memory.fit_advice(cfg, strategy.num_devices)}"
        )


def encode_prompts(
    cfg: TrainConfig, components: Components, prompts: Prompts, texts: Sequence[str]
) -> dict[str, np.ndarray]:
    """``--pre_compute_text_embeddings``: each distinct prompt's encoder states (L, D), once."""
    use_mask = cfg.prompts.text_encoder_use_attention_mask
    graph, weights, rest = Graph.of(components.text_encoder)

    @jax.jit
    def encode(weights, ids, mask):
        return graph.merge(weights, rest)(ids, mask if use_mask else None).last_hidden_state

    distinct = list(dict.fromkeys(texts))
    tokens = prompts(distinct)
    states = np.asarray(encode(weights, tokens["input_ids"], tokens["attention_mask"]))
    return dict(zip(distinct, states, strict=True))


def _precomputed_prompts(cfg: TrainConfig, spec: TaskSpec) -> list[str]:
    """The prompts a DreamBooth run encodes: instance, class, validation, and "" (guidance)."""
    texts = ["", cfg.prompts.instance_prompt, *cfg.validation_prompt_list]
    if spec.prior_preservation:
        texts.append(cfg.prompts.class_prompt)
    return [t for t in texts if t is not None]


def setup(cfg: TrainConfig, task: Task) -> Run:
    """Checks what can be checked, builds the model, data and state, restores a checkpoint."""
    group = checkpoint.process_group()
    report.setup_logging(is_main=group.is_main)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    output_dir = prepare_output_dir(cfg, is_main=group.is_main)
    group.barrier()
    resume_from = checkpoints.find_resume(output_dir, cfg.checkpoint.resume_from_checkpoint)
    start = 0
    if resume_from is not None:
        start = int(checkpoints.read_trainer_state(resume_from)["global_step"])
        resume.check_resume_config(
            resume_from,
            cfg,
            step=start,
            num_devices=jax.device_count(),
            num_processes=jax.process_count(),
        )
    if cfg.hub.push_to_hub and group.is_main:
        hub.check_access(cfg)
    trackers = Trackers.from_config(cfg, is_main=group.is_main)

    strategy = parallel.strategy_from_config(cfg)
    check_attention(cfg, strategy.devices)
    spec = task_spec(cfg)
    components = load_components(cfg, ModelOptions.from_config(cfg))
    if spec.makes_class_images:
        make_class_images(cfg, components, group)
    prompts = Prompts(cfg, components.tokenizer_dir) if spec.text_conditioned else None
    embeddings = None
    if spec.text_conditioned and cfg.prompts.pre_compute_text_embeddings:
        embeddings = encode_prompts(cfg, components, prompts, _precomputed_prompts(cfg, spec))
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
    parts = build_step(
        cfg, spec, components, strategy,
        learning_rate=plan.learning_rate, total_steps=plan.max_train_steps,
        text_encoder=embeddings is None,
    )  # fmt: skip
    host_state = parts.state
    guard = NonFiniteGuard(cfg.training.max_nonfinite_steps, str(output_dir))
    loader_state = None
    if resume_from is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), host_state)
        # This process's own first device: jax.devices()[0] is process 0's on the other hosts.
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        host_state = checkpoint.restore(resume_from, abstract, one_device, layout="mesh")
        guard.restore(checkpoints.read_trainer_state(resume_from))
        loader_state = checkpoints.read_loader_state(resume_from, group.index)
        logger.info("resumed from %s at step %d", resume_from, start)
    # The frozen weights are the base model's: never checkpointed, placed with the rest.
    state = strategy.place({**host_state, "frozen": parts.frozen})
    shapes = batch_shapes(
        cfg, spec, components,
        rows=plan.per_process_batch_size * cfg.training.gradient_accumulation_steps,
        text_length=prompts.max_length if prompts else 0, embeddings=embeddings is not None,
    )  # fmt: skip
    host_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), {**host_state, "frozen": parts.frozen}
    )
    step_fn, compile_seconds = _compile(
        cfg, strategy, strategy.compile(parts.train_step), host_shapes, shapes
    )
    logger.info("compiled the train step in %.1f s", compile_seconds)
    check_fits(cfg, step_fn, strategy)
    loader = build_loader(
        cfg,
        source,
        batch_size=plan.per_process_batch_size,
        process_index=group.index,
        process_count=group.count,
        state=loader_state,
        channels=image_channels(spec, components.unet.config.in_channels),
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
        graphs=parts.graphs,
        state=state,
        step_fn=step_fn,
        loader=loader,
        prompts=prompts,
        embeddings=embeddings,
        guard=guard,
        trackers=trackers,
        step=start,
        compile_seconds=compile_seconds,
    )


_GENERATION_DTYPES = {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}


def make_class_images(cfg: TrainConfig, components: Components, group: ProcessGroup) -> int:
    """DreamBooth's missing class images, sampled with the base model (shared planning), in
    `--prior_generation_precision`'s dtype (default: the run's compute dtype)."""
    models = (components.unet, components.vae, components.text_encoder)
    dtype = _GENERATION_DTYPES.get(cfg.prompts.prior_generation_precision)
    before = [m.options.dtype for m in models]
    if dtype is not None:
        for model in models:
            set_options(model, dtype=dtype)
    try:
        sampler = TextSampler(
            components, cfg, scheduler_name="DPMSolverMultistepScheduler", steps=CLASS_IMAGE_STEPS
        )
        prompts = Prompts(cfg, components.tokenizer_dir)
        unet_state, text_state = nnx.state(components.unet), nnx.state(components.text_encoder)
        base = jax.random.fold_in(jax.random.key(cfg.seed), group.index)
        counter = iter(range(1 << 30))

        def sample(batch_prompts: list[str]) -> list[np.ndarray]:
            images = []
            for prompt in batch_prompts:
                states = sampler.encode(text_state, prompts(["", prompt]))
                keys = jax.random.split(jax.random.fold_in(base, next(counter)), 1)
                out = sampler.draw(unet_state, states, keys)
                images.append((np.asarray(out[0], np.float32) * 255 + 0.5).astype(np.uint8))
            return images

        return generate_class_images(cfg, sample, group=group)
    finally:
        for model, original in zip(models, before, strict=True):
            set_options(model, dtype=original)


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
        trainer_state={
            "global_step": run.step,
            "plan": dataclasses.asdict(run.plan),  # as torch saves it; read by resume
            **run.guard.state(),
        },
        config_text=cli.to_yaml(run.cfg),
        loader_state=run.loader.state(),
        limit=run.cfg.checkpoint.checkpoints_total_limit,
        layout=_layout(run),
    )


def _host_params(run: Run, name: str) -> dict:
    if name == "unet" and run.cfg.ema.use_ema:
        return run.strategy.unreplicate(run.state["ema"])
    if name in run.state["params"]:
        return run.strategy.unreplicate(run.state["params"][name])
    return run.strategy.unreplicate(run.state["frozen"][name]["params"])


def _host_model(run: Run, name: str = "unet") -> nnx.Module:
    """A model on the host with the run's weights (the UNet's EMA weights when kept)."""
    rest = run.strategy.unreplicate(run.state["frozen"][name]["rest"])
    return run.graphs[name].merge(_host_params(run, name), rest)


def _sample_ddpm(run: Run, model: nnx.Module, plan) -> np.ndarray:
    size, channels = run.cfg.data.resolution, model.config.in_channels
    key = jax.random.key(plan.seed)
    noise = jax.random.normal(key, (plan.images_per_prompt, size, size, channels))
    sampler = sampling.sampler_from_config(run.components.scheduler_config, "DDPMScheduler")
    images = generate.denoise(
        model, noise, jax.random.fold_in(key, 1), sampler, plan.num_inference_steps
    )
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _prompt_states(run: Run, sampler: TextSampler, prompt: str) -> np.ndarray:
    """(2, L, D): the empty prompt's and `prompt`'s encoder states (guidance pairs them)."""
    if run.embeddings is not None:
        return np.stack([run.embeddings[""], run.embeddings[prompt]])
    text_state = nnx.state(_host_model(run, "text_encoder"))
    return sampler.encode(text_state, run.prompts(["", prompt]))


def _sample_text(run: Run, model: nnx.Module, plan) -> np.ndarray:
    sampler = TextSampler(
        run.components,
        run.cfg,
        scheduler_name=run.cfg.validation.validation_scheduler,
        steps=plan.num_inference_steps,
    )
    unet_state = nnx.state(model)
    key = jax.random.key(plan.seed)
    images = []
    for i, prompt in enumerate(plan.prompts):
        keys = jax.random.split(jax.random.fold_in(key, i), plan.images_per_prompt)
        states = _prompt_states(run, sampler, prompt)
        images.append(np.asarray(sampler.draw(unet_state, states, keys)))
    return np.concatenate(images)


def validate(run: Run, tag: str = "validation") -> Path | None:
    """Samples the validation round of `shared.run.validation`, saves its grid and sends the
    images to the trackers (main process)."""
    cfg = run.cfg
    if not run.group.is_main or not validation_plan.wants_validation(cfg):
        return None
    plan = validation_plan.plan_validation(cfg)
    model = _host_model(run)
    images = _sample_text(run, model, plan) if run.spec.latent else _sample_ddpm(run, model, plan)
    path = save_grid(images, validation_plan.grid_path(cfg, tag=tag, step=run.step), rows=plan.rows)
    run.trackers.log_images(tag, images, run.step)
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
    text_encoder = _host_model(run, "text_encoder") if run.spec.train_text_encoder else None
    export(
        run.components,
        _host_model(run),
        run.output_dir,
        save_text_encoder=run.spec.save_text_encoder,
        text_encoder=text_encoder,
    )
    if commit is not None and run.cfg.hub.push_to_hub:
        hub.push(run.cfg, commit_message=commit)


def _text_inputs(run: Run, texts: list[str], prefix: str = "") -> dict[str, np.ndarray]:
    if run.embeddings is not None:
        return {f"{prefix}encoder_hidden_states": np.stack([run.embeddings[t] for t in texts])}
    tokens = run.prompts(texts)
    return {f"{prefix}{name}": value for name, value in tokens.items()}


def _shard(run: Run, batches: list[dict[str, Any]]) -> Any:
    """The micro-batches of one update as one device batch (accumulation x B rows per key);
    `batch_shapes` gives its shapes."""
    device_batch = {"pixel_values": np.concatenate([b["pixel_values"] for b in batches])}
    if run.spec.prior_preservation:
        device_batch["class_pixel_values"] = np.concatenate(
            [b["class_pixel_values"] for b in batches]
        )
    if run.prompts is not None:
        device_batch.update(_text_inputs(run, [c for b in batches for c in b["captions"]]))
        if run.spec.prior_preservation:
            class_prompts = [c for b in batches for c in b["class_prompt"]]
            device_batch.update(_text_inputs(run, class_prompts, prefix="class_"))
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
        with run.trackers:  # closed (flushed) however the run ends
            with run.loader, bar:
                stop.start_training()
                while run.step < run.plan.max_train_steps:
                    started = time.perf_counter()
                    epoch_before = run.loader.state()["epoch"]
                    batch = _shard(run, [next(run.loader) for _ in range(accumulation)])
                    run.state, metrics = run.step_fn(run.state, batch)
                    metrics = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}
                    run.step_times.append(time.perf_counter() - started)  # compiled in setup
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
                    metrics |= {"train/lr": lr, "train/skipped_steps": run.guard.skipped}
                    run.trackers.log(metrics, run.step)
                    run.losses.append(metrics["train/loss"])
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{lr:.3g}")
                    epoch_after = run.loader.state()["epoch"]
                    if events.after_step(
                        cfg,
                        handlers,
                        step=run.step,
                        epoch_before=epoch_before,
                        epoch_after=epoch_after,
                    ):
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
                losses=run.losses,
                extra={
                    "parallelism": run.strategy.name,
                    "compile_seconds": run.compile_seconds,
                },
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
