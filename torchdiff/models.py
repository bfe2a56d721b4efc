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
global torch RNG (which seeds noise and dropout later) as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import diffusers
import torch
import transformers

from shared.config import TrainConfig, thaw
from shared.diffusers_format import TOKENIZER_FILES, resolve_component
from shared.prompts import ClipTokenizer

logger = logging.getLogger(__name__)

BASE_FLAG = "--pretrained_model_name_or_path"

# Text-encoder classes by `architectures[0]` of text_encoder/config.json. CLIPTextModelWithProjection
# is left out: its first output is the pooled projection, not the hidden states the UNet attends to.
TEXT_ENCODERS: dict[str, type[transformers.PreTrainedModel]] = {
    "CLIPTextModel": transformers.CLIPTextModel,
}
_KNOWN_UNSUPPORTED = {
    "T5EncoderModel": "DeepFloyd IF",
    "RobertaSeriesModelWithTransformation": "AltDiffusion",
    "CLIPTextModelWithProjection": "SDXL's second text encoder",
}

_RANDOM_INIT_CONFIGS = ("unet_config", "vae_config", "text_encoder_config", "scheduler_config")
# train_unconditional.py's UNet when no config is given (sample_size is --resolution).
DDPM_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": (
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
    ),
}


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
      NotImplementedError: the base model's text encoder is not a CLIP text model.
      ValueError: no pretrained model and no (complete) model configs.
    """
    if cfg.task == "unconditional":
        components = _unconditional(cfg)
    elif cfg.model.pretrained_model_name_or_path is not None:
        components = _pretrained(cfg)
    else:
        components = _from_configs(cfg)
    if cfg.diffusion.prediction_type is not None:
        components.noise_scheduler.register_to_config(prediction_type=cfg.diffusion.prediction_type)
    if components.text_encoder is not None and components.tokenizer_dir is not None:
        _check_vocab(components.tokenizer_dir, components.text_encoder)
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


def _check_class(config: dict[str, Any], expected: str, where: str) -> dict[str, Any]:
    name = config.pop("_class_name", expected)
    if name != expected:
        raise ValueError(f"{where} describes a {name}, but this task needs a {expected}")
    return config


def _unconditional(cfg: TrainConfig) -> Components:
    m, d = cfg.model, cfg.diffusion
    _warn_ignored(cfg, ("vae_config", "text_encoder_config", "scheduler_config"), "--ddpm_* flags")
    if m.unet_config is not None:
        config = _check_class(thaw(m.unet_config), "UNet2DModel", "unet_config")
    elif m.model_config_name_or_path is not None:
        path = m.model_config_name_or_path
        if not os.path.isfile(os.path.expanduser(path)):
            resolve_component(path, None, flag="--model_config_name_or_path")
        config = diffusers.UNet2DModel.load_config(
            os.path.expanduser(path), cache_dir=cfg.data.cache_dir
        )
        config = _check_class(dict(config), "UNet2DModel", f"--model_config_name_or_path {path}")
    else:
        config = {**DDPM_UNET_CONFIG, "sample_size": cfg.data.resolution}
    unet = _seeded(cfg, lambda: diffusers.UNet2DModel.from_config(config))
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=d.ddpm_num_steps,
        beta_schedule=d.ddpm_beta_schedule,
        prediction_type=d.prediction_type or "epsilon",
    )
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
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def text_encoder_class(config: dict[str, Any], where: str) -> type[transformers.PreTrainedModel]:
    """The supported class named by a text encoder config's ``architectures[0]``.

    Raises:
      NotImplementedError: any other architecture (T5 of DeepFloyd IF, Roberta of AltDiffusion).
    """
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else None
    if name is None and config.get("model_type") == "clip_text_model":
        name = "CLIPTextModel"
    if name not in TEXT_ENCODERS:
        family = f" ({_KNOWN_UNSUPPORTED[name]})" if name in _KNOWN_UNSUPPORTED else ""
        raise NotImplementedError(
            f"{where}: text encoder architecture {name!r}{family} is not supported; twindiff "
            f"trains models whose text encoder is one of: {', '.join(TEXT_ENCODERS)}"
        )
    return TEXT_ENCODERS[name]


def _pretrained(cfg: TrainConfig) -> Components:
    m = cfg.model
    base = m.pretrained_model_name_or_path
    assert base is not None
    # Local folders are checked up front so a missing part names the flag; hub ids go through.
    subfolders = ["scheduler", "text_encoder", "unet"]
    if m.pretrained_vae_name_or_path is None:
        subfolders.append("vae")
    local = {sub: resolve_component(base, sub, flag=BASE_FLAG) for sub in subfolders}
    tokenizer_dir = _tokenizer_dir(cfg)
    _warn_ignored(cfg, _RANDOM_INIT_CONFIGS, f"the weights of {BASE_FLAG}")
    hub = {"revision": m.revision, "cache_dir": cfg.data.cache_dir}
    scheduler = diffusers.DDPMScheduler.from_pretrained(base, subfolder="scheduler", **hub)
    te_config = _read_text_encoder_config(cfg, base, local["text_encoder"])
    te_class = text_encoder_class(te_config, f"{BASE_FLAG} {base}")
    text_encoder = te_class.from_pretrained(
        base, subfolder="text_encoder", variant=m.variant, **hub
    )
    vae = _pretrained_vae(cfg)
    if vae is None:
        vae = diffusers.AutoencoderKL.from_pretrained(
            base, subfolder="vae", variant=m.variant, **hub
        )
    # text2image trains from the non-EMA weights when the base keeps them at another revision.
    unet_revision = (m.non_ema_revision or m.revision) if cfg.task == "text2image" else m.revision
    unet = diffusers.UNet2DConditionModel.from_pretrained(
        base, subfolder="unet", variant=m.variant, **{**hub, "revision": unet_revision}
    )
    return Components(unet, scheduler, vae, text_encoder, tokenizer_dir, base=base)


def _pretrained_vae(cfg: TrainConfig) -> diffusers.AutoencoderKL | None:
    path = cfg.model.pretrained_vae_name_or_path
    if path is None:
        return None
    local = resolve_component(path, None, flag="--pretrained_vae_name_or_path")
    # As train_text_to_image_sdxl.py: the separate VAE also gets --revision/--variant.
    return diffusers.AutoencoderKL.from_pretrained(
        local or path,
        revision=cfg.model.revision,
        variant=cfg.model.variant,
        cache_dir=cfg.data.cache_dir,
    )


def _tokenizer_dir(cfg: TrainConfig) -> str:
    """A local folder with the tokenizer files: --tokenizer_name, else the base's tokenizer/."""
    import huggingface_hub

    m, cache_dir = cfg.model, cfg.data.cache_dir
    if m.tokenizer_name is not None:
        local = resolve_component(m.tokenizer_name, None, flag="--tokenizer_name")
        if local is None:
            local = huggingface_hub.snapshot_download(
                m.tokenizer_name,
                allow_patterns=list(TOKENIZER_FILES),
                revision=m.revision,
                cache_dir=cache_dir,
            )
        # A pipeline folder given as --tokenizer_name: its tokenizer/ holds the files.
        has_files = any(os.path.isfile(os.path.join(local, f)) for f in TOKENIZER_FILES[:3])
        nested = os.path.join(local, "tokenizer")
        return nested if not has_files and os.path.isdir(nested) else local
    base = m.pretrained_model_name_or_path
    if base is None:
        raise ValueError(
            f"{cfg.task} without {BASE_FLAG} needs --tokenizer_name (a tokenizer folder or hub "
            "id; `twindiff demo` writes a tiny one)"
        )
    local = resolve_component(base, "tokenizer", flag=BASE_FLAG)
    if local is not None:
        return local
    snapshot = huggingface_hub.snapshot_download(
        base, allow_patterns=["tokenizer/*"], revision=m.revision, cache_dir=cache_dir
    )
    return os.path.join(snapshot, "tokenizer")


def _from_configs(cfg: TrainConfig) -> Components:
    m = cfg.model
    pretrained_vae = _pretrained_vae(cfg)  # then no vae_config is needed
    missing = [
        name
        for name in _RANDOM_INIT_CONFIGS
        if getattr(m, name) is None and not (name == "vae_config" and pretrained_vae is not None)
    ]
    if missing:
        raise ValueError(
            f"{cfg.task} needs a model: give {BASE_FLAG} (a hub id or a diffusers pipeline "
            "folder), or a model YAML that defines unet_config, vae_config, text_encoder_config "
            f"and scheduler_config, such as configs/models/tiny.yaml (missing: {', '.join(missing)})"
        )
    tokenizer_dir = _tokenizer_dir(cfg)
    unet_config = _check_class(thaw(m.unet_config), "UNet2DConditionModel", "unet_config")
    te_config = thaw(m.text_encoder_config)
    te_class = text_encoder_class(te_config, "text_encoder_config")
    # CLIPTextConfig takes `architectures`; `model_type` is a class attribute, not an argument.
    te_config.pop("model_type", None)
    scheduler = diffusers.DDPMScheduler.from_config(
        _check_class(thaw(m.scheduler_config), "DDPMScheduler", "scheduler_config")
    )

    def build():
        # A fixed order, so one seed always gives the same weights for each model.
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
        vae = pretrained_vae
        if vae is None:
            vae_config = _check_class(thaw(m.vae_config), "AutoencoderKL", "vae_config")
            vae = diffusers.AutoencoderKL.from_config(vae_config)
        text_encoder = te_class(te_class.config_class(**te_config))
        return unet, vae, text_encoder

    unet, vae, text_encoder = _seeded(cfg, build)
    return Components(unet, scheduler, vae, text_encoder, tokenizer_dir, base=None)


def _check_vocab(tokenizer_dir: str, text_encoder: torch.nn.Module) -> None:
    vocab_size = ClipTokenizer.from_pretrained(tokenizer_dir, subfolder=None).vocab_size
    embeddings = text_encoder.config.vocab_size
    if vocab_size > embeddings:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {vocab_size} tokens but the text encoder embeds "
            f"only {embeddings}: use the model's own tokenizer or a text_encoder_config with "
            f"vocab_size >= {vocab_size}"
        )


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
