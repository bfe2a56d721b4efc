"""The trained models as a diffusers pipeline folder that `DiffusionPipeline.from_pretrained` loads.

Unconditional runs export a `DDPMPipeline` (``model_index.json``, ``unet/``, ``scheduler/``), latent
runs a `StableDiffusionPipeline` (plus ``vae/``, ``text_encoder/``, ``tokenizer/``), weights in
fp32 safetensors. The output folder also holds checkpoints and logs, and a run may export many
times (unconditional: every ``--save_model_epochs``), so the pipeline is written into a hidden
staging folder inside it and then published with `shared.diffusers_format.publish_pipeline`:
folders swapped in by rename, ``model_index.json`` last.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import accelerate
import diffusers
import torch
import transformers

from shared.diffusers_format import publish_pipeline, staging_folder
from torchdiff.models import Components

# Tensors saved as they are; any other dtype (fp16, bf16, fp64) is exported as fp32.
_KEPT_DTYPES = (torch.float32, torch.int64, torch.int32, torch.bool)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Wrappers Accelerate may leave on: DistributedDataParallel (.module), torch.compile (_orig_mod).
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def cpu_fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself when all its weights are fp32 on the CPU, else an fp32 CPU copy.

    The copy is built on the meta device and takes converted tensors by assignment, so it costs
    one CPU copy of the weights and no accelerator memory; the training module is not changed.
    """
    model = _unwrap(model)
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" and t.dtype in _KEPT_DTYPES for t in tensors):
        return model
    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
        for k, v in model.state_dict().items()
    }
    # Buffers stay real (include_buffers=False): non-persistent ones (CLIP's position_ids) are
    # not in the state dict and come, on the CPU, from the constructor.
    with accelerate.init_empty_weights():
        if isinstance(model, diffusers.ModelMixin):
            clone = type(model).from_config(model.config)
        else:
            clone = type(model)(copy.deepcopy(model.config))
    clone.load_state_dict(state, strict=True, assign=True)
    return clone.requires_grad_(False).eval()


def save_model_folder(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Saves one model in its library's format (config + fp32 safetensors), e.g. for checkpoints."""
    folder = Path(folder)
    cpu_fp32_copy(model).save_pretrained(folder, safe_serialization=True)
    return folder


def _scheduler_copy(scheduler: diffusers.SchedulerMixin) -> diffusers.SchedulerMixin:
    return type(scheduler).from_config(scheduler.config)


def build_pipeline(
    components: Components,
    *,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    save_text_encoder: bool = True,
) -> diffusers.DiffusionPipeline:
    """The pipeline to export, on fp32 CPU copies of the models (validation can use it too).

    Args:
      components: what `load_components` gave (scheduler, VAE, tokenizer folder, ...).
      unet: the trained UNet (EMA weights already swapped in, unwrapped from Accelerate).
      text_encoder: the trained text encoder, or None to export `components.text_encoder`.
      save_text_encoder: False leaves the text encoder out (DreamBooth's
        ``--skip_save_text_encoder``): model_index.json gets ``"text_encoder": [null, null]``.
    """
    if components.vae is None:
        return diffusers.DDPMPipeline(
            unet=cpu_fp32_copy(unet), scheduler=_scheduler_copy(components.noise_scheduler)
        )
    if components.tokenizer_dir is None:
        raise ValueError("a latent pipeline needs components.tokenizer_dir to save the tokenizer")
    encoder = None
    if save_text_encoder:
        encoder = text_encoder if text_encoder is not None else components.text_encoder
        if encoder is None:
            raise ValueError(
                "no text encoder to export: pass the text encoder, or save_text_encoder=False "
                "(--skip_save_text_encoder)"
            )
        encoder = cpu_fp32_copy(encoder)
    # StableDiffusionPipeline.__init__ rewrites an "outdated" scheduler config (steps_offset=1,
    # clip_sample=False) with a FutureWarning; the export keeps the schedule the model was trained
    # with, so the rewritten copy is replaced and the warning is moot.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipeline = diffusers.StableDiffusionPipeline(
            vae=cpu_fp32_copy(components.vae),
            text_encoder=encoder,
            tokenizer=transformers.CLIPTokenizer.from_pretrained(components.tokenizer_dir),
            unet=cpu_fp32_copy(unet),
            scheduler=_scheduler_copy(components.noise_scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.scheduler = _scheduler_copy(components.noise_scheduler)
    return pipeline


def save_pipeline(
    output_dir: str | os.PathLike,
    components: Components,
    *,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    save_text_encoder: bool = True,
) -> Path:
    """Writes the diffusers pipeline folder into `output_dir`, crash-safely.

    Component folders of an older export are replaced, stale ones (a text encoder no longer
    saved) removed; checkpoints and logs in `output_dir` are left alone. If anything fails
    before the new ``model_index.json`` is in place, the previous export is still loadable.

    Args:
      output_dir: the run's output folder (created if missing).
      components: what `load_components` gave.
      unet: the trained UNet (unwrapped, EMA weights swapped in when EMA is used).
      text_encoder: the trained text encoder, or None for `components.text_encoder`.
      save_text_encoder: False writes a null text_encoder entry (``--skip_save_text_encoder``).

    Returns:
      `output_dir` as a Path.
    """
    output_dir = Path(output_dir)
    pipeline = build_pipeline(
        components, unet=unet, text_encoder=text_encoder, save_text_encoder=save_text_encoder
    )
    with staging_folder(output_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        publish_pipeline(staging, output_dir)
    return output_dir
