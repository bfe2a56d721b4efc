"""The one torch trainer: every task runs this loop; `shared.run` says what each event means.

The file reads in three parts: `setup` builds a `Run` (models, data, optimizer, restored state),
`train_step` is one optimizer update, and `train` is the loop that handles the events of
`shared.run.events` after each update. Everything that is not tensor math (when to checkpoint or
validate, the checkpoint folder, resume rules, signals, the non-finite policy, the LR and EMA
decay values, class-image planning, the summary) is `shared.run`'s, so the flax trainer means
the same thing.

Accelerate owns processes, devices, mixed precision (frozen models in the half dtype, trained
weights fp32) and gradient accumulation. The data comes from the shared loader, one shard per
process, so the data position is two integers in every checkpoint: resume replays nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from shared import cli, hub
from shared.config import ConfigError, TrainConfig
from shared.data import build_loader, build_source
from shared.model_folders import to_latents
from shared.plan import RunPlan, plan_run
from shared.run import checkpoints, events, report, resume
from shared.run.nonfinite import NonFiniteGuard
from shared.run.output import prepare_output_dir
from shared.run.process import ProcessGroup
from shared.run.signals import StopSignal
from shared.run.task import TaskSpec, image_channels, task_spec
from torchdiff import checkpoint, export, memory, models, optim, validation
from torchdiff.class_images import ensure_class_images
from torchdiff.conditioning import TextConditioner
from torchdiff.diffusion import Objective

logger = logging.getLogger(__name__)

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task module adds: its name (the shared `TaskSpec` says the rest)."""

    name: str


@dataclasses.dataclass
class Run:
    """Everything `setup` builds; `train_step` and the event handlers read it."""

    cfg: TrainConfig
    spec: TaskSpec
    accelerator: Any
    group: ProcessGroup
    plan: RunPlan
    components: models.Components
    unet: torch.nn.Module  # as prepared by Accelerate (maybe DDP-wrapped)
    text_encoder: torch.nn.Module | None
    conditioner: TextConditioner | None
    trained: list[torch.nn.Module]
    params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    objective: Objective
    generator: torch.Generator
    weight_dtype: torch.dtype
    state: checkpoint.TrainingState
    loader: Any
    guard: NonFiniteGuard
    step: int = 0
    step_times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)  # this run's, per update
    last_image: Path | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.checkpoint.output_dir)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def make_accelerator(cfg: TrainConfig):
    """The Accelerator of `cfg`, after the checks that need to know the device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(cfg.checkpoint.output_dir)
    report_to = cfg.logging.report_to
    if report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                f"--report_to {report_to} needs wandb: pip install wandb (or --report_to "
                "tensorboard)"
            ) from err
    project = ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging.logging_dir)
    )
    # One process may train several configs (a notebook, the tests): Accelerate keeps the
    # previous run's mixed precision and accumulation in process-wide singletons and refuses a
    # change. The process group and device (PartialState) are kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        mixed_precision=cfg.training.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=project,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Autocast to fp16 on a CPU fails inside the first step with a dtype error.
        raise ConfigError(
            "--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 (or no)"
        )
    return accelerator


def _library_verbosity(accelerator) -> None:
    if not accelerator.is_local_main_process:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _pixels(batch: dict[str, Any], key: str, device: torch.device) -> torch.Tensor:
    """uint8 (or float in [0, 1]) NHWC numpy -> float32 NCHW in [-1, 1] on the device."""
    x = torch.from_numpy(batch[key]).to(device, non_blocking=True).permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float() * 2.0 - 1.0


# --- setup ------------------------------------------------------------------------------------


def setup(cfg: TrainConfig, task: Task) -> Run:
    """Checks everything that can be checked, loads the models and data, restores a checkpoint.

    Raises:
      UserError subclasses for anything the user can fix, before any training happens.
    """
    accelerator = make_accelerator(cfg)
    report.setup_logging(is_main=accelerator.is_local_main_process)
    _library_verbosity(accelerator)
    group = checkpoint.process_group(accelerator)
    spec = task_spec(cfg)
    output_dir = prepare_output_dir(cfg, is_main=group.is_main)
    group.barrier()
    resume_from = checkpoints.find_resume(output_dir, cfg.checkpoint.resume_from_checkpoint)
    start = 0
    if resume_from is not None:
        start = int(checkpoints.read_trainer_state(resume_from)["global_step"])
        resume.check_resume_config(resume_from, cfg, step=start)
    if cfg.hub.push_to_hub and group.is_main:
        hub.check_access(cfg)  # before any heavy work: a bad token costs seconds, not a run
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    memory.enable_tf32(cfg)
    memory.steady_host_allocations()
    device = accelerator.device

    components = models.load_components(cfg)
    if spec.makes_class_images:  # before the data is read: the source lists them
        ensure_class_images(cfg, components, accelerator)
    with accelerator.main_process_first():  # the main process verifies images, the rest reuse it
        source = build_source(cfg)
    n = accelerator.num_processes
    plan = plan_run(cfg, dataset_size=len(source), num_devices=n, num_processes=n)
    weight_dtype = HALF_DTYPES.get(accelerator.mixed_precision, torch.float32)
    models.cast_frozen(components, weight_dtype, device, train_text_encoder=spec.train_text_encoder)
    unet, text_encoder = components.unet, components.text_encoder
    unet.train()
    if spec.train_text_encoder:
        text_encoder.train()
    memory.apply_memory_options(
        cfg,
        unet=unet,
        text_encoder=text_encoder,
        train_text_encoder=spec.train_text_encoder,
        device=device,
    )
    conditioner = None
    if spec.text_conditioned:
        conditioner = TextConditioner(
            cfg, tokenizer_dir=components.tokenizer_dir, text_encoder=text_encoder, device=device
        )
        if cfg.prompts.pre_compute_text_embeddings:
            prompts = [cfg.prompts.instance_prompt, cfg.prompts.class_prompt or "", ""]
            conditioner.pre_compute([*prompts, *cfg.validation_prompt_list], offload_to="cpu")

    trained = [unet, text_encoder] if spec.train_text_encoder else [unet]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(params, cfg, learning_rate=plan.learning_rate)
    ema = optim.build_ema(unet, cfg)
    if ema is not None:
        ema.to("cpu" if cfg.torch.offload_ema else device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + accelerator.process_index)
    state = checkpoint.TrainingState(
        models={
            "unet": unet,
            **({"text_encoder": text_encoder} if spec.train_text_encoder else {}),
        },
        optimizer=optimizer,
        generator=generator,
        ema=ema,
        ema_state=optim.ema_state_dict,
        load_ema_state=optim.load_ema_state_dict,
    )
    guard = NonFiniteGuard(cfg.training.max_nonfinite_steps, str(output_dir))
    loader_state = None
    if resume_from is not None:
        restored = checkpoint.load(resume_from, state, rank=accelerator.process_index)
        guard.restore(restored["trainer_state"])
        loader_state = restored["loader_state"]
        logger.info("resumed from %s at step %d", resume_from, start)
    # After a restore: the resumed run's own flags take effect (shared.run.resume).
    optim.apply_hyperparameters(optimizer, cfg, learning_rate=plan.learning_rate)
    if ema is not None:
        optim.apply_ema_settings(ema, cfg)
    lr_scheduler = optim.build_lr_scheduler(
        optimizer, cfg, max_train_steps=plan.max_train_steps, start_step=start
    )
    prepared = accelerator.prepare(*trained, optimizer)
    trained, optimizer = list(prepared[:-1]), prepared[-1]
    state.optimizer, state.scaler = optimizer, accelerator.scaler
    if resume_from is not None and accelerator.scaler is not None:
        checkpoint.load_scaler(resume_from, accelerator.scaler)
    unet = trained[0]
    if spec.train_text_encoder:
        text_encoder = conditioner.text_encoder = trained[1]
    loader = build_loader(
        cfg,
        source,
        batch_size=plan.per_process_batch_size,
        process_index=accelerator.process_index,
        process_count=n,
        state=loader_state,
        channels=image_channels(spec, components.unet.config.in_channels),
    )
    if group.is_main:
        accelerator.init_trackers(
            cfg.logging.tracker_project_name, config=report.tracker_config(cfg)
        )
    logger.info(
        "%s on %d process(es): %s; %d updates of %d examples (lr %g)",
        cfg.task,
        n,
        source.describe(),
        plan.max_train_steps,
        plan.effective_batch_size,
        plan.learning_rate,
    )
    return Run(
        cfg=cfg,
        spec=spec,
        accelerator=accelerator,
        group=group,
        plan=plan,
        components=components,
        unet=unet,
        text_encoder=text_encoder,
        conditioner=conditioner,
        trained=trained,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema=ema,
        objective=Objective.from_config(cfg, components.noise_scheduler.config),
        generator=generator,
        weight_dtype=weight_dtype,
        state=state,
        loader=loader,
        guard=guard,
        step=start,
    )


# --- the step ---------------------------------------------------------------------------------


def _given_draw(run: Run, batch: dict[str, Any], name: str) -> torch.Tensor | None:
    """A standard-normal draw (or the timesteps) that `batch` carries, NCHW, class rows after
    instance rows as the pixels; None when the batch has none."""
    if name not in batch:
        return None
    rows = [batch[name], batch[f"class_{name}"]] if run.spec.prior_preservation else [batch[name]]
    return torch.cat([torch.as_tensor(r) for r in rows]).to(run.device)


def compute_loss(run: Run, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch and its parts (prior preservation: instance and prior).

    The noise, timesteps and VAE posterior draws come from `run.generator`, unless the batch
    carries them (NCHW, per example like the pixels; ``class_<name>`` for the class rows):
    ``noise``, ``timesteps``, ``offset`` (``--noise_offset``), ``perturbation``
    (``--input_perturbation``), ``latent_noise`` (latent tasks). The parity tests feed both
    backends the same draws that way (flaxdiff's step reads the same keys, NHWC).
    """
    spec, device = run.spec, run.device
    pixels = _pixels(batch, "pixel_values", device)
    prompts = list(batch["captions"])
    if spec.prior_preservation:
        # Instance then class examples in one batch, one forward pass (as diffusers).
        pixels = torch.cat([pixels, _pixels(batch, "class_pixel_values", device)])
        prompts += list(batch["class_prompt"])
    with torch.no_grad():
        if spec.latent:
            vae = run.components.vae
            posterior = vae.encode(pixels.to(run.weight_dtype)).latent_dist
            latent_noise = _given_draw(run, batch, "latent_noise")
            if latent_noise is None:
                z = posterior.sample(generator=run.generator)
            else:  # DiagonalGaussianDistribution.sample's reparameterization
                z = posterior.mean + posterior.std * latent_noise
            clean = to_latents(
                z,
                scaling_factor=vae.config.scaling_factor,
                shift_factor=vae.config.get("shift_factor"),
            )
            # The objective draws in the latents' dtype: float32 at least (a half VAE gives
            # half latents); a float64 VAE (the parity tests) keeps float64.
            clean = clean.to(torch.promote_types(clean.dtype, torch.float32))
        else:
            clean = pixels
    noise = _given_draw(run, batch, "noise")
    if noise is None:
        noised = run.objective.sample(clean, run.generator)
    else:
        # The draws' dtype is the objective's: float64 draws (parity tests) noise float64
        # samples, where float32 pixels would round the schedule to float32.
        clean = clean.to(noise.dtype)
        noised = run.objective.noised(
            clean,
            noise,
            _given_draw(run, batch, "timesteps"),
            offset=_given_draw(run, batch, "offset"),
            perturbation=_given_draw(run, batch, "perturbation"),
        )
    kwargs: dict[str, Any] = {}
    if run.conditioner is not None:
        with torch.set_grad_enabled(spec.train_text_encoder and not run.conditioner.pre_computed):
            kwargs["encoder_hidden_states"] = run.conditioner.encode(prompts).to(device)
    if spec.class_labels == "timesteps":
        kwargs["class_labels"] = noised.timesteps

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        pred = run.unet(noisy, timesteps, **kwargs).sample
        # Learned-variance UNets predict (mean, variance): train the mean half.
        return pred[:, : clean.shape[1]] if pred.shape[1] == 2 * clean.shape[1] else pred

    if spec.dream:
        noised = run.objective.dream(
            noised, predict, detail_preservation=run.cfg.diffusion.dream_detail_preservation
        )
    return run.objective.loss(predict(noised.noisy, noised.timesteps), noised)


def train_step(run: Run, batches: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One optimizer update over `--gradient_accumulation_steps` micro-batches; its metrics.

    A non-finite loss or gradient skips the update (`shared.run.nonfinite`): the weights,
    optimizer moments and EMA stay as they were; the LR schedule still advances.
    """
    accelerator, cfg = run.accelerator, run.cfg
    lr = run.lr_scheduler.get_last_lr()[0]  # the LR this update uses
    losses, parts = [], {}
    loss_value, grad_norm, finite = math.nan, math.nan, False
    for batch in batches:
        with accelerator.accumulate(*run.trained):
            loss, metrics = compute_loss(run, batch)
            accelerator.backward(loss)
            losses.append(loss.detach())
            for key, value in metrics.items():
                parts.setdefault(key, []).append(value)
            if accelerator.sync_gradients:
                grad_norm = float(accelerator.clip_grad_norm_(run.params, cfg.optim.max_grad_norm))
                loss_value = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
                # fp16: the GradScaler skips an overflowing step itself and lowers its scale.
                fp16 = accelerator.mixed_precision == "fp16"
                finite = math.isfinite(loss_value) and (fp16 or math.isfinite(grad_norm))
                if finite:
                    run.optimizer.step()
                memory.zero_grad(run.optimizer, cfg)
    run.lr_scheduler.step()
    if finite and run.ema is not None:
        if cfg.torch.offload_ema:
            run.ema.to(run.device)
        run.ema.step(accelerator.unwrap_model(run.unet).parameters())
        if cfg.torch.offload_ema:
            run.ema.to("cpu")
    run.step += 1
    run.guard.record(step=run.step, finite=finite, loss=loss_value, grad_norm=grad_norm, lr=lr)
    logs = {
        "train/loss": loss_value,
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/skipped_steps": run.guard.skipped,
    }
    for key, values in parts.items():
        logs[f"train/{key}"] = accelerator.gather(torch.stack(values).mean()[None]).mean().item()
    if run.ema is not None:
        logs["train/ema_decay"] = run.ema.cur_decay_value
    return logs


# --- events -----------------------------------------------------------------------------------


def save_checkpoint(run: Run) -> Path:
    return checkpoint.save(
        run.output_dir,
        run.state,
        group=run.group,
        step=run.step,
        trainer_state={
            "global_step": run.step,
            "plan": dataclasses.asdict(run.plan),
            **run.guard.state(),
        },
        config_text=cli.to_yaml(run.cfg),
        loader_state=run.loader.state(),
        limit=run.cfg.checkpoint.checkpoints_total_limit,
    )


def validate(run: Run, tag: str = "validation") -> None:
    path = validation.run(
        run.accelerator,
        run.cfg,
        run.components,
        unet=run.unet,
        text_encoder=run.text_encoder,
        conditioner=run.conditioner,
        ema=run.ema,
        step=run.step,
        tag=tag,
        dtype=run.weight_dtype,
    )
    run.last_image = path or run.last_image


def export_pipeline(run: Run, *, commit: str | None) -> None:
    """Writes the diffusers folder (EMA weights with --use_ema); refuses non-finite weights."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if run.group.is_main:
        if not run.state.finite():
            from shared.errors import TrainingError

            raise TrainingError(
                f"the weights are not finite at step {run.step}: no export written; "
                f"resume from the last good checkpoint with a lower --learning_rate"
            )
        plain = accelerator.unwrap_model(run.unet)
        text_encoder = accelerator.unwrap_model(run.text_encoder) if run.text_encoder else None
        with validation.ema_weights(run.ema, plain):
            export.save_pipeline(
                run.output_dir,
                run.components,
                unet=plain,
                text_encoder=text_encoder,
                save_text_encoder=run.spec.save_text_encoder,
            )
        if commit is not None and run.cfg.hub.push_to_hub:
            hub.push(run.cfg, commit_message=commit)
    accelerator.wait_for_everyone()


def _next_batches(run: Run) -> list[dict[str, Any]]:
    return [next(run.loader) for _ in range(run.cfg.training.gradient_accumulation_steps)]


def train(cfg: TrainConfig, task: Task) -> Path:
    """Trains as `cfg` says and writes the diffusers folder; returns `--output_dir`."""
    with StopSignal() as stop:
        run = setup(cfg, task)
        bar = tqdm(
            total=run.plan.max_train_steps,
            initial=run.step,
            desc="steps",
            disable=not run.accelerator.is_local_main_process,
        )
        handlers = events.Handlers(
            checkpoint=lambda: save_checkpoint(run),
            validate=lambda: validate(run),
            export=lambda commit: export_pipeline(run, commit=commit),
            stop_requested=lambda: stop.requested_anywhere(run.group),
        )
        with run.loader, bar:  # the bar ends its line even when the run stops with an error
            stop.start_training()
            while run.step < run.plan.max_train_steps:
                started = time.perf_counter()
                epoch_before = run.loader.state()["epoch"]
                logs = train_step(run, _next_batches(run))
                run.step_times.append(time.perf_counter() - started)  # the update alone
                run.accelerator.log(logs, step=run.step)
                run.losses.append(logs["train/loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.3g}")
                epoch_after = run.loader.state()["epoch"]
                if events.after_step(
                    cfg, handlers, step=run.step, epoch_before=epoch_before, epoch_after=epoch_after
                ):
                    bar.close()
                    _end_training(run.accelerator)
                    return run.output_dir
        export_pipeline(run, commit=None)
        validate(run, tag="final")
        if run.group.is_main:
            report.write_summary(
                run.output_dir,
                steps=run.plan.max_train_steps,
                step_times=run.step_times,
                peak_memory_bytes=memory.peak_memory_bytes(run.device),
                device=str(run.device),
                skipped_steps=run.guard.skipped,
                losses=run.losses,
            )
            if cfg.hub.push_to_hub:
                image = run.last_image
                images = [str(image.relative_to(run.output_dir))] if image else []
                hub.push(cfg, commit_message="End of training", images=images)
        _end_training(run.accelerator)
    return run.output_dir


def _end_training(accelerator) -> None:
    """Finishes the trackers. The process group stays up until the process exits (`main`).

    ``accelerator.end_training()`` would destroy it while the DDP-wrapped models still hold it;
    freeing them afterwards runs gloo's destructor, which joins its worker threads while holding
    the GIL that a worker may need to free a finished collective's tensors: a deadlock (seen
    under CPU load in the 2-process tests).
    """
    if accelerator.num_processes == 1:
        accelerator.end_training()
        return
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.wait_for_everyone()  # every process is done with collectives


def main(task: Task, argv: Sequence[str] | None = None) -> int:
    """`python -m torchdiff.<task> ARGV`: parse the flags (and `--config` files), train."""
    train(cli.parse_args(argv, task=task.name, backend="torch"), task)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Everything is written and every process has passed the last barrier; exiting without
        # tearing down the gloo/NCCL process group avoids its destructor deadlock (see
        # _end_training).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
