"""The one torch trainer: every task runs this loop; a `Task` says what differs.

Accelerate owns processes, devices, mixed precision (frozen models in the half dtype, trained
weights fp32) and gradient accumulation. The data comes from the shared loader, one shard per
process, so the data position is two integers in every checkpoint: resume replays nothing.

One optimizer update consumes exactly `--gradient_accumulation_steps` micro-batches from the
loader's endless stream; the LR schedule, EMA, checkpoints and step-based validation advance per
update. Epoch-based events (`--validation_epochs`, `--save_images_epochs`,
`--save_model_epochs`) fire after the update in which the loader finishes an epoch e, when
(e + 1) is a multiple of N; the final export and validation always run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from shared import cli
from shared.config import ConfigError, TrainConfig
from shared.data import build_loader, build_source
from shared.plan import plan_run
from torchdiff import checkpoint, export, memory, models, optim, validation
from torchdiff.conditioning import TextConditioner
from torchdiff.diffusion import Objective

logger = logging.getLogger(__name__)

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task module chooses; the loop is the same for all.

    Attributes:
      name: "unconditional", "text2image" or "dreambooth".
      text_conditioned: encode captions (and class prompts) for cross-attention.
      prepare: runs once after the models load and before the data is read (DreamBooth makes
        its missing class images here).
    """

    name: str
    text_conditioned: bool
    prepare: Callable[[TrainConfig, models.Components, Any], None] | None = None


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
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
    return Accelerator(
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        mixed_precision=cfg.training.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=project,
    )


def _setup_logging(accelerator) -> None:
    import diffusers
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    if not accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The flat config for the trackers (TensorBoard hparams take scalars only; no secrets)."""
    flat = {}
    for section, values in cli.to_dict(cfg).items():
        for name, value in values.items() if isinstance(values, dict) else [(section, values)]:
            if name in ("hub_token", "unet_config", "vae_config", "text_encoder_config"):
                continue
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _pixels(batch: dict[str, Any], key: str, device: torch.device) -> torch.Tensor:
    """uint8 (or float in [0, 1]) NHWC numpy -> float32 NCHW in [-1, 1] on the device."""
    x = torch.from_numpy(batch[key]).to(device, non_blocking=True).permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float() * 2.0 - 1.0


class _StopSignal:
    """SIGTERM (a preempted VM, a cluster's time limit) asks for a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopSignal:
        # Not in the main thread (a notebook runner, a test harness) there is no handler to set.
        with contextlib.suppress(ValueError):
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        logger.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def any(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.gather(flag).max().item())


def train(cfg: TrainConfig, task: Task) -> Path:
    """Trains as `cfg` says and writes the diffusers folder; returns `--output_dir`."""
    accelerator = make_accelerator(cfg)
    _setup_logging(accelerator)
    output_dir = Path(cfg.checkpoint.output_dir)
    resume_from = checkpoint.resolve_resume(cfg)  # a bad path fails before any heavy work
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    memory.enable_tf32(cfg)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cli.save_config(cfg, output_dir / "config.yaml")
    device = accelerator.device

    components = models.load_components(cfg)
    if task.prepare is not None:
        task.prepare(cfg, components, accelerator)
    source = build_source(cfg)
    n = accelerator.num_processes
    plan = plan_run(cfg, dataset_size=len(source), num_devices=n, num_processes=n)
    weight_dtype = HALF_DTYPES.get(accelerator.mixed_precision, torch.float32)
    train_te = cfg.task == "dreambooth" and cfg.model.train_text_encoder
    models.cast_frozen(components, weight_dtype, device, train_text_encoder=train_te)
    unet, text_encoder = components.unet, components.text_encoder
    unet.train()
    if train_te:
        text_encoder.train()
    memory.apply_memory_options(
        cfg, unet=unet, text_encoder=text_encoder, train_text_encoder=train_te, device=device
    )
    conditioner = None
    if task.text_conditioned:
        conditioner = TextConditioner(
            cfg, tokenizer_dir=components.tokenizer_dir, text_encoder=text_encoder, device=device
        )
        if cfg.prompts.pre_compute_text_embeddings:
            prompts = [cfg.prompts.instance_prompt, cfg.prompts.class_prompt or "", ""]
            conditioner.pre_compute([*prompts, *cfg.validation_prompt_list], offload_to="cpu")

    trained = [unet, text_encoder] if train_te else [unet]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(params, cfg, learning_rate=plan.learning_rate)
    lr_scheduler = optim.build_lr_scheduler(optimizer, cfg, max_train_steps=plan.max_train_steps)
    ema = optim.build_ema(unet, cfg)
    if ema is not None:
        ema.to("cpu" if cfg.torch.offload_ema else device)
    prepared = accelerator.prepare(*trained, optimizer)
    trained, optimizer = list(prepared[:-1]), prepared[-1]
    unet = trained[0]
    if train_te:
        text_encoder = conditioner.text_encoder = trained[1]
    generator = torch.Generator(device=device).manual_seed(cfg.seed + accelerator.process_index)
    objective = Objective.from_config(cfg, components.noise_scheduler.config)
    state = checkpoint.TrainingState(
        models={"unet": unet, **({"text_encoder": text_encoder} if train_te else {})},
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        generator=generator,
        ema=ema,
        ema_state=optim.ema_state_dict,
        load_ema_state=optim.load_ema_state_dict,
        scaler=accelerator.scaler,
    )

    step, loader_state = 0, None
    if resume_from is not None:
        restored = checkpoint.load(accelerator, resume_from, state)
        step, loader_state = restored["global_step"], restored["loader_state"]
        logger.info("resumed from %s at step %d", resume_from, step)
    loader = build_loader(
        cfg,
        source,
        batch_size=plan.per_process_batch_size,
        process_index=accelerator.process_index,
        process_count=n,
        state=loader_state,
    )
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.logging.tracker_project_name, config=_tracker_config(cfg))
    logger.info(
        "%s on %d process(es): %d examples, %d updates of %d examples (lr %g)",
        cfg.task,
        n,
        len(source),
        plan.max_train_steps,
        plan.effective_batch_size,
        plan.learning_rate,
    )

    def compute_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = _pixels(batch, "pixel_values", device)
        prompts = list(batch["captions"])
        if objective.prior_loss_weight is not None:
            # Instance then class examples in one batch, one forward pass (as diffusers).
            pixels = torch.cat([pixels, _pixels(batch, "class_pixel_values", device)])
            prompts += list(batch["class_prompt"])
        with torch.no_grad():
            if components.vae is not None:
                vae = components.vae
                dist = vae.encode(pixels.to(weight_dtype)).latent_dist
                shift = vae.config.get("shift_factor") or 0.0
                latents = dist.sample(generator=generator)
                clean = ((latents - shift) * vae.config.scaling_factor).float()
            else:
                clean = pixels
        noised = objective.sample(clean, generator)
        kwargs: dict[str, Any] = {}
        if conditioner is not None:
            with torch.set_grad_enabled(train_te and not conditioner.pre_computed):
                kwargs["encoder_hidden_states"] = conditioner.encode(prompts).to(device)
        if cfg.task == "dreambooth" and cfg.model.class_labels_conditioning == "timesteps":
            kwargs["class_labels"] = noised.timesteps

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            pred = unet(noisy, timesteps, **kwargs).sample
            # Learned-variance UNets predict (mean, variance): train the mean half.
            return pred[:, : clean.shape[1]] if pred.shape[1] == 2 * clean.shape[1] else pred

        if cfg.task == "text2image" and cfg.diffusion.dream_training:
            noised = objective.dream(
                noised, predict, detail_preservation=cfg.diffusion.dream_detail_preservation
            )
        return objective.loss(predict(noised.noisy, noised.timesteps), noised)

    def save_checkpoint(at: int) -> None:
        checkpoint.save(
            accelerator,
            cfg,
            state,
            step=at,
            loader_state=loader.state(),
            plan_values=dataclasses.asdict(plan),
        )

    def validate(at: int, tag: str = "validation") -> Path | None:
        return validation.run(
            accelerator,
            cfg,
            components,
            unet=unet,
            text_encoder=text_encoder,
            conditioner=conditioner,
            ema=ema,
            step=at,
            tag=tag,
            dtype=weight_dtype,
        )

    def export_pipeline(*, commit: str | None) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            plain = accelerator.unwrap_model(unet)
            with validation.ema_weights(ema, plain):
                export.save_pipeline(
                    output_dir,
                    components,
                    unet=plain,
                    text_encoder=accelerator.unwrap_model(text_encoder) if text_encoder else None,
                    save_text_encoder=not (
                        cfg.task == "dreambooth" and cfg.checkpoint.skip_save_text_encoder
                    ),
                )
            if commit is not None and cfg.hub.push_to_hub:
                from shared import hub

                hub.push(cfg, commit_message=commit)
        accelerator.wait_for_everyone()

    stop = _StopSignal()
    bar = tqdm(
        total=plan.max_train_steps,
        initial=step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    accum = cfg.training.gradient_accumulation_steps
    step_times: list[float] = []
    last_image: Path | None = None
    with loader, stop:
        while step < plan.max_train_steps:
            started = time.perf_counter()
            epoch_before = loader.state()["epoch"]
            losses, parts = [], {}
            for _ in range(accum):
                batch = next(loader)
                with accelerator.accumulate(*trained):
                    loss, metrics = compute_loss(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                        optimizer.step()
                        memory.zero_grad(optimizer, cfg)
                losses.append(loss.detach())
                for key, value in metrics.items():
                    parts.setdefault(key, []).append(value)
            lr_scheduler.step()
            if ema is not None:
                if cfg.torch.offload_ema:
                    ema.to(device)
                ema.step(accelerator.unwrap_model(unet).parameters())
                if cfg.torch.offload_ema:
                    ema.to("cpu")
            step += 1
            logs = {
                "train/loss": accelerator.gather(torch.stack(losses).mean()[None]).mean().item(),
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
            }
            for key, values in parts.items():
                mean = accelerator.gather(torch.stack(values).mean()[None]).mean()
                logs[f"train/{key}"] = mean.item()
            if ema is not None:
                logs["train/ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.3g}")
            step_times.append(time.perf_counter() - started)  # the update alone, no saving

            if step % cfg.checkpoint.checkpointing_steps == 0:
                save_checkpoint(step)
            finished = range(epoch_before, loader.state()["epoch"])
            if _due(cfg.validation.validation_steps, [step]) or (
                cfg.validation.validation_steps is None
                and _due(_epoch_interval(cfg), [e + 1 for e in finished])
            ):
                last_image = validate(step) or last_image
            if cfg.task == "unconditional" and _due(
                cfg.checkpoint.save_model_epochs, [e + 1 for e in finished]
            ):
                export_pipeline(commit=f"Epoch {finished[-1]}")
            if stop.any(accelerator):
                if step % cfg.checkpoint.checkpointing_steps:
                    save_checkpoint(step)
                bar.close()
                _end_training(accelerator)
                logger.warning(
                    "stopped by SIGTERM at step %d; resume with --resume_from_checkpoint latest",
                    step,
                )
                return output_dir
    bar.close()
    export_pipeline(commit=None)
    last_image = validate(step, tag="final") or last_image
    if accelerator.is_main_process:
        _write_summary(output_dir, step_times, device, plan.max_train_steps)
        if cfg.hub.push_to_hub:
            from shared import hub

            images = [str(last_image.relative_to(output_dir))] if last_image else []
            hub.push(cfg, commit_message="End of training", images=images)
    _end_training(accelerator)
    return output_dir


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


def _epoch_interval(cfg: TrainConfig) -> int | None:
    if cfg.task == "unconditional":
        return cfg.validation.save_images_epochs
    return cfg.validation.validation_epochs


def _due(interval: int | None, counts) -> bool:
    return bool(interval) and any(c % interval == 0 for c in counts)


def _write_summary(output_dir: Path, step_times: list[float], device, steps: int) -> None:
    """train_summary.json: the step time (first step, with its warm-up, left out) and memory."""
    timed = step_times[1:] or step_times
    summary = {
        "steps": steps,
        "steps_this_run": len(step_times),
        "mean_step_seconds": sum(timed) / len(timed) if timed else None,
        "peak_memory_bytes": memory.peak_memory_bytes(device),
        "device": str(device),
    }
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("summary: %s", summary)
