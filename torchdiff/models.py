"""The models of a run: loaded from a diffusers pipeline, or built at random from configs.

diffusers/transformers models are used as they are (DESIGN.md, Models), written for one device;
Accelerate and `torchdiff.memory` wrap them afterwards. Three ways in:

- unconditional: a randomly initialized `UNet2DModel` (as ``train_unconditional.py``) from the
  model YAML's ``unet_config``, ``--model_config_name_or_path``, or the built-in DDPM config;
- latent tasks with ``--pretrained_model_name_or_path``: scheduler, text encoder, VAE and UNet
  from the pipeline's subfolders (as ``train_text_to_image.py`` / ``train_dreambooth.py``);
- latent tasks without it: random init from ``unet_config``/``vae_config``/
  ``text_encoder_config``/``scheduler_config`` (``configs/models/tiny.yaml``).

Random init is seeded with ``--seed`` in a forked RNG, so it is reproducible and leaves the
global torch RNG (which seeds noise and dropout later) as it was. What a folder or config means
(which UNet config, which tokenizer, which text encoders, the prediction type) is decided in
`shared.model_folders`, for both backends; this module maps those answers to torch classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import diffusers
import torch
import transformers
from safetensors import SafetensorError

from shared import model_folders
from shared.config import TrainConfig, thaw
from shared.diffusers_format import resolve_component
from shared.errors import ConfigError
from shared.model_folders import BASE_FLAG, check_class

logger = logging.getLogger(__name__)

# The torch class of each text encoder `shared.model_folders` supports.
TEXT_ENCODERS: dict[str, type[transformers.PreTrainedModel]] = {
    "CLIPTextModel": transformers.CLIPTextModel,
}

_RANDOM_INIT_CONFIGS = ("unet_config", "vae_config", "text_encoder_config", "scheduler_config")
# What loading a damaged file raises: diffusers wraps the SafetensorError or JSONDecodeError in
# an OSError; transformers lets SafetensorError through. Network and missing-file errors are
# OSErrors too, so only those caused by one of `_DAMAGE` become a ConfigError.
_LOAD_ERRORS = (OSError, SafetensorError)
_DAMAGE = (SafetensorError, json.JSONDecodeError)

T = TypeVar("T")


@dataclasses.dataclass
class Components:
    """Everything a task needs besides data: the networks, the noise schedule, the tokenizer."""

    unet: torch.nn.Module  # UNet2DConditionModel or UNet2DModel
    noise_scheduler: diffusers.DDPMScheduler
    vae: diffusers.AutoencoderKL | None
    text_encoder: transformers.CLIPTextModel | None
    tokenizer_dir: str | None  # a LOCAL folder holding the tokenizer files (vocab.json, ...)
    base: str | None  # --pretrained_model_name_or_path when weights came from it


def load_components(cfg: TrainConfig) -> Components:
    """Loads or builds the models of `cfg`'s task, all in fp32 on the CPU.

    Raises:
      FileNotFoundError: a local folder lacks a component; the message names the flag.
      ConfigError: a damaged weight or config file (the message names it), a text encoder that
        is not a CLIP text model, or no pretrained model and no (complete) model configs.
    """
    if cfg.task == "unconditional":
        components = _unconditional(cfg)
    elif cfg.model.pretrained_model_name_or_path is not None:
        components = _pretrained(cfg)
    else:
        components = _from_configs(cfg)
    scheduler = components.noise_scheduler
    scheduler.register_to_config(
        prediction_type=model_folders.prediction_type(cfg, scheduler.config)
    )
    if components.text_encoder is not None and components.tokenizer_dir is not None:
        model_folders.check_vocab(
            components.tokenizer_dir, components.text_encoder.config.vocab_size
        )
    return components


def _seeded(cfg: TrainConfig, build):
    # devices=[]: random init runs on the CPU; forking CUDA RNGs would initialize CUDA for nothing.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build()


def _warn_ignored(cfg: TrainConfig, names: tuple[str, ...], instead: str) -> None:
    ignored = [name for name in names if getattr(cfg.model, name) is not None]
    if ignored:
        logger.warning("%s ignores %s: it uses %s", cfg.task, ", ".join(ignored), instead)


def _unconditional(cfg: TrainConfig) -> Components:
    _warn_ignored(cfg, ("vae_config", "text_encoder_config", "scheduler_config"), "--ddpm_* flags")
    config = model_folders.unconditional_unet_config(cfg)
    unet = _seeded(cfg, lambda: diffusers.UNet2DModel.from_config(config))
    scheduler = diffusers.DDPMScheduler.from_config(model_folders.ddpm_scheduler_config(cfg))
    return Components(unet, scheduler, vae=None, text_encoder=None, tokenizer_dir=None, base=None)


def _read_text_encoder_config(cfg: TrainConfig, base: str, local: str | None) -> dict[str, Any]:
    if local is not None:
        path = os.path.join(local, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{BASE_FLAG} {base}: text_encoder/ has no config.json")
    else:
        import huggingface_hub

        path = huggingface_hub.hf_hub_download(
            base,
            "config.json",
            subfolder="text_encoder",
            revision=cfg.model.revision,
            cache_dir=cfg.data.cache_dir,
        )
    return model_folders.read_config_file(path)


def text_encoder_class(config: dict[str, Any], where: str) -> type[transformers.PreTrainedModel]:
    """The transformers class of a text encoder config (`model_folders.text_encoder_class_name`).

    Raises:
      ConfigError: an unsupported architecture (T5 of DeepFloyd IF, Roberta of AltDiffusion).
    """
    return TEXT_ENCODERS[model_folders.text_encoder_class_name(config, where)]


def _caused_by_damage(error: BaseException) -> bool:
    # diffusers re-raises inside its own handler, so the cause may sit in __context__.
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, _DAMAGE):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _damaged_files_named(
    flag: str, source: str, subfolder: str | None, *, local: str | None
) -> Iterator[None]:
    """Turns a load that failed on a damaged (truncated, malformed) file into a ConfigError."""
    try:
        yield
    except _LOAD_ERRORS as err:
        if not _caused_by_damage(err):
            raise
        message = model_folders.damaged_component_message(
            flag, source, subfolder, local=local, detail=str(err)
        )
        raise ConfigError(message) from err


def _pretrained(cfg: TrainConfig) -> Components:
    m = cfg.model
    base = m.pretrained_model_name_or_path
    assert base is not None
    # Local folders are checked up front so a missing part names the flag; hub ids go through.
    subfolders = ["scheduler", "text_encoder", "unet"]
    if m.pretrained_vae_name_or_path is None:
        subfolders.append("vae")
    local = {sub: resolve_component(base, sub, flag=BASE_FLAG) for sub in subfolders}
    tokenizer_dir = model_folders.tokenizer_dir(cfg)
    _warn_ignored(cfg, _RANDOM_INIT_CONFIGS, f"the weights of {BASE_FLAG}")
    hub = {"revision": m.revision, "cache_dir": cfg.data.cache_dir}

    def load(subfolder: str, from_pretrained: Callable[..., T], **kwargs: Any) -> T:
        with _damaged_files_named(BASE_FLAG, base, subfolder, local=local[subfolder]):
            return from_pretrained(base, subfolder=subfolder, **{**hub, **kwargs})

    scheduler = load("scheduler", diffusers.DDPMScheduler.from_pretrained)
    te_config = _read_text_encoder_config(cfg, base, local["text_encoder"])
    te_class = text_encoder_class(te_config, f"{BASE_FLAG} {base}")
    text_encoder = load("text_encoder", te_class.from_pretrained, variant=m.variant)
    vae = _pretrained_vae(cfg)
    if vae is None:
        vae = load("vae", diffusers.AutoencoderKL.from_pretrained, variant=m.variant)
    # text2image trains from the non-EMA weights when the base keeps them at another revision.
    unet_revision = (m.non_ema_revision or m.revision) if cfg.task == "text2image" else m.revision
    unet = load(
        "unet",
        diffusers.UNet2DConditionModel.from_pretrained,
        variant=m.variant,
        revision=unet_revision,
    )
    return Components(unet, scheduler, vae, text_encoder, tokenizer_dir, base=base)


def _pretrained_vae(cfg: TrainConfig) -> diffusers.AutoencoderKL | None:
    path = cfg.model.pretrained_vae_name_or_path
    if path is None:
        return None
    flag = "--pretrained_vae_name_or_path"
    local = resolve_component(path, None, flag=flag)
    # As train_text_to_image_sdxl.py: the separate VAE also gets --revision/--variant.
    with _damaged_files_named(flag, path, None, local=local):
        return diffusers.AutoencoderKL.from_pretrained(
            local or path,
            revision=cfg.model.revision,
            variant=cfg.model.variant,
            cache_dir=cfg.data.cache_dir,
        )


def _from_configs(cfg: TrainConfig) -> Components:
    m = cfg.model
    pretrained_vae = _pretrained_vae(cfg)  # then no vae_config is needed
    missing = [
        name
        for name in _RANDOM_INIT_CONFIGS
        if getattr(m, name) is None and not (name == "vae_config" and pretrained_vae is not None)
    ]
    if missing:
        raise ConfigError(
            f"{cfg.task} needs a model: give {BASE_FLAG} (a hub id or a diffusers pipeline "
            "folder), or a model YAML that defines unet_config, vae_config, text_encoder_config "
            f"and scheduler_config, such as configs/models/tiny.yaml (missing: {', '.join(missing)})"
        )
    tokenizer_dir = model_folders.tokenizer_dir(cfg)
    unet_config = check_class(thaw(m.unet_config), "UNet2DConditionModel", "unet_config")
    te_config = thaw(m.text_encoder_config)
    te_class = text_encoder_class(te_config, "text_encoder_config")
    # CLIPTextConfig takes `architectures`; `model_type` is a class attribute, not an argument.
    te_config.pop("model_type", None)
    scheduler = diffusers.DDPMScheduler.from_config(
        check_class(thaw(m.scheduler_config), "DDPMScheduler", "scheduler_config")
    )

    def build():
        # A fixed order, so one seed always gives the same weights for each model.
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
        vae = pretrained_vae
        if vae is None:
            vae_config = check_class(thaw(m.vae_config), "AutoencoderKL", "vae_config")
            vae = diffusers.AutoencoderKL.from_config(vae_config)
        text_encoder = te_class(te_class.config_class(**te_config))
        return unet, vae, text_encoder

    unet, vae, text_encoder = _seeded(cfg, build)
    return Components(unet, scheduler, vae, text_encoder, tokenizer_dir, base=None)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (no dropout) for a model that is not trained."""
    module.requires_grad_(False)
    module.eval()
    return module


def cast_frozen(
    components: Components,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    train_text_encoder: bool,
) -> Components:
    """Moves the models to `device`: frozen ones in `dtype`, trained ones in fp32.

    Frozen models only run forward, so the mixed-precision dtype halves their memory, as the
    reference scripts do with ``weight_dtype``; trained weights stay fp32 masters (AMP casts on
    the fly), which DreamBooth's check on trainable models requires.
    """
    _move(components.unet, device, torch.float32)
    if components.vae is not None:
        _move(freeze(components.vae), device, dtype)
    if components.text_encoder is not None:
        if train_text_encoder:
            _move(components.text_encoder, device, torch.float32)
        else:
            _move(freeze(components.text_encoder), device, dtype)
    return components


def _move(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    # diffusers warns on every `.to(dtype=...)`, even a no-op one: cast only when needed.
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
