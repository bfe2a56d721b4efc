"""What a run's model folders and model configs mean, decided once for both backends.

Each backend turns these answers into its own objects (diffusers/transformers classes in torchdiff,
Flax modules in flaxdiff); the rules themselves need no framework:

- where the tokenizer files are (`tokenizer_dir`) and whether the text encoder embeds all of their
  ids (`check_vocab`);
- which UNet an unconditional run builds (`unconditional_unet_config`, `DDPM_UNET_CONFIG`) and
  whether a config describes the class a task needs (`check_class`);
- which text encoders are supported (`text_encoder_class_name`);
- the prediction type of a run (`prediction_type`);
- how VAE samples become diffusion latents and back (`to_latents`, `from_latents`);
- which file of a component folder is damaged, to name it in an error (`damaged_file`).

``huggingface_hub`` is imported inside the functions that download, so reading local folders
never needs it.
"""

from __future__ import annotations

import json
import os
import struct
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from shared.config import TrainConfig, thaw
from shared.diffusers_format import TOKENIZER_FILES, resolve_component
from shared.errors import ConfigError
from shared.prompts import ClipTokenizer

BASE_FLAG = "--pretrained_model_name_or_path"
REDOWNLOAD_FIX = "re-download or re-export the model"

# train_unconditional.py's UNet2DModel when no config is given (sample_size is --resolution).
DDPM_UNET_CONFIG: Mapping[str, Any] = types.MappingProxyType(
    {
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
)

# Text encoders both backends can train with. CLIPTextModelWithProjection is not one: its first
# output is the pooled projection, not the hidden states the UNet attends to.
SUPPORTED_TEXT_ENCODERS: tuple[str, ...] = ("CLIPTextModel",)
# Text encoders of known pipeline families, refused with the family's name.
UNSUPPORTED_TEXT_ENCODERS: Mapping[str, str] = types.MappingProxyType(
    {
        "T5EncoderModel": "DeepFloyd IF",
        "RobertaSeriesModelWithTransformation": "AltDiffusion",
        "CLIPTextModelWithProjection": "SDXL's second text encoder",
    }
)

# safetensors: an 8-byte little-endian header length, a JSON header, then the tensor bytes.
_SAFETENSORS_LENGTH_BYTES = 8
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the header length

Array = TypeVar("Array")


# --- tokenizer ----------------------------------------------------------------------------------


def tokenizer_dir(cfg: TrainConfig) -> str:
    """A local folder holding the tokenizer files: ``--tokenizer_name``, else the base's tokenizer/.

    Hub ids are downloaded (tokenizer files only) into ``--cache_dir``.

    Raises:
      ConfigError: neither ``--tokenizer_name`` nor ``--pretrained_model_name_or_path`` is given.
      FileNotFoundError: a local folder lacks the tokenizer (the message names the flag).
    """
    m, cache_dir = cfg.model, cfg.data.cache_dir
    if m.tokenizer_name is not None:
        local = resolve_component(m.tokenizer_name, None, flag="--tokenizer_name")
        if local is None:
            import huggingface_hub

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
        raise ConfigError(
            f"{cfg.task} without {BASE_FLAG} needs --tokenizer_name (a tokenizer folder or hub "
            "id; `twindiff demo` writes a tiny one)"
        )
    local = resolve_component(base, "tokenizer", flag=BASE_FLAG)
    if local is not None:
        return local
    import huggingface_hub

    snapshot = huggingface_hub.snapshot_download(
        base, allow_patterns=["tokenizer/*"], revision=m.revision, cache_dir=cache_dir
    )
    return os.path.join(snapshot, "tokenizer")


def check_vocab(tokenizer_dir: str, vocab_size: int) -> None:
    """Refuses a tokenizer whose ids would overflow the text encoder's embedding table.

    Args:
      tokenizer_dir: a local folder with the tokenizer files.
      vocab_size: the number of token embeddings of the text encoder (its config's vocab_size).

    Raises:
      ConfigError: the tokenizer has more tokens than the text encoder embeds.
    """
    tokens = ClipTokenizer.from_pretrained(tokenizer_dir, subfolder=None).vocab_size
    if tokens > vocab_size:
        raise ConfigError(
            f"the tokenizer in {tokenizer_dir} has {tokens} tokens but the text encoder embeds "
            f"only {vocab_size}: use the model's own tokenizer or a text_encoder_config with "
            f"vocab_size >= {tokens}"
        )


# --- model configs ------------------------------------------------------------------------------


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON config file (``config.json``, ``scheduler_config.json``) as a dict.

    Raises:
      ConfigError: the file is not valid JSON or not a JSON object; the message names the file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is not valid JSON ({_one_line(err)}): {REDOWNLOAD_FIX}, or fix the file"
        ) from err
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path} holds a JSON {type(config).__name__}, not a config object: {REDOWNLOAD_FIX}"
        )
    return config


def check_class(config: Mapping[str, Any], expected: str, where: str) -> dict[str, Any]:
    """`config` without its ``_class_name``, after checking that it names `expected` (if any).

    Args:
      config: a diffusers config dict (``_class_name`` may be absent).
      expected: the class the task builds, e.g. ``"UNet2DModel"``.
      where: what gave the config, for the message (``"unet_config"``, a flag and path).

    Raises:
      ConfigError: the config describes another class.
    """
    config = dict(config)
    name = config.pop("_class_name", expected)
    if name != expected:
        raise ConfigError(
            f"{where} describes a {name}, but this task needs a {expected}: give a {expected} "
            "config"
        )
    return config


def ddpm_scheduler_config(cfg: TrainConfig) -> dict[str, Any]:
    """The noise schedule of `train_unconditional.py` as a diffusers `scheduler_config.json`
    dict: `--ddpm_num_steps`, `--ddpm_beta_schedule`, `--prediction_type`, and DDPMScheduler's
    defaults written out (so a backend without diffusers reads the same schedule)."""
    d = cfg.diffusion
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": d.ddpm_num_steps,
        "beta_schedule": d.ddpm_beta_schedule,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": prediction_type(cfg, {}),
        "variance_type": "fixed_small",
        "clip_sample": True,
    }


def unconditional_unet_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config of the UNet2DModel an unconditional run builds (as ``train_unconditional.py``).

    In order: the model YAML's ``unet_config``; ``--model_config_name_or_path`` (a JSON file, a
    folder holding ``config.json``, or a hub id whose root holds one); else `DDPM_UNET_CONFIG`
    with ``sample_size = --resolution``. The result has no ``_class_name``.

    Raises:
      ConfigError: the config describes another class, a local folder has no config.json, or
        the file is not valid JSON.
      FileNotFoundError: a path-like ``--model_config_name_or_path`` names nothing.
    """
    m = cfg.model
    if m.unet_config is not None:
        return check_class(thaw(m.unet_config), "UNet2DModel", "unet_config")
    path = m.model_config_name_or_path
    if path is None:
        return {**DDPM_UNET_CONFIG, "sample_size": cfg.data.resolution}
    flag = "--model_config_name_or_path"
    file = os.path.expanduser(path)
    if not os.path.isfile(file):
        folder = resolve_component(path, None, flag=flag)
        if folder is None:  # a hub id: its config.json, as UNet2DModel.load_config(id) reads
            import huggingface_hub

            file = huggingface_hub.hf_hub_download(
                path, "config.json", cache_dir=cfg.data.cache_dir
            )
        else:
            file = os.path.join(folder, "config.json")
            if not os.path.isfile(file):
                raise ConfigError(
                    f"{flag} {path} has no config.json: give a UNet2DModel config.json file or "
                    "a folder holding one"
                )
    return check_class(read_config_file(file), "UNet2DModel", f"{flag} {path}")


def architecture_name(config: Mapping[str, Any]) -> str | None:
    """The class a transformers config names: ``architectures[0]``, else by its model_type."""
    architectures = config.get("architectures") or []
    if architectures:
        return architectures[0]
    return "CLIPTextModel" if config.get("model_type") == "clip_text_model" else None


def text_encoder_class_name(config: Mapping[str, Any], where: str) -> str:
    """The supported text-encoder class a transformers config names (one of SUPPORTED_TEXT_ENCODERS).

    Args:
      config: a text encoder's ``config.json`` (or a model YAML's ``text_encoder_config``).
      where: what gave the config, for the message.

    Raises:
      ConfigError: any other architecture; T5 (DeepFloyd IF), Roberta (AltDiffusion) and
        CLIPTextModelWithProjection (SDXL) are named with their pipeline family.
    """
    name = architecture_name(config)
    if name not in SUPPORTED_TEXT_ENCODERS:
        family = (
            f" ({UNSUPPORTED_TEXT_ENCODERS[name]})" if name in UNSUPPORTED_TEXT_ENCODERS else ""
        )
        raise ConfigError(
            f"{where}: text encoder architecture {name!r}{family} is not supported; use a base "
            f"model whose text encoder is one of: {', '.join(SUPPORTED_TEXT_ENCODERS)}"
        )
    return name


def prediction_type(cfg: TrainConfig, scheduler_config: Mapping[str, Any]) -> str:
    """What the model predicts: ``--prediction_type``, else the scheduler config's, else epsilon.

    The order of diffusers' training scripts; "epsilon" is DDPMScheduler's default.
    """
    return cfg.diffusion.prediction_type or scheduler_config.get("prediction_type") or "epsilon"


# --- latents ------------------------------------------------------------------------------------


def to_latents(z: Array, *, scaling_factor: float, shift_factor: float | None) -> Array:
    """VAE samples -> the latents the diffusion model sees: ``(z - shift_factor) * scaling_factor``.

    Plain arithmetic with Python floats, so it works on numpy arrays, torch tensors and jax arrays
    alike and keeps their dtype and device. A None shift_factor (SD 1.x/2.x) counts as 0.0.
    """
    return (z - (shift_factor or 0.0)) * scaling_factor


def from_latents(latents: Array, *, scaling_factor: float, shift_factor: float | None) -> Array:
    """The inverse of `to_latents`: ``latents / scaling_factor + shift_factor``, for decoding."""
    return latents / scaling_factor + (shift_factor or 0.0)


# --- damaged files ------------------------------------------------------------------------------


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a safetensors file cannot be read (cut short, bad header), or None if its layout is whole.

    Checks what safetensors checks before reading a tensor: the header length, the header JSON,
    and that the tensors' byte ranges end exactly at the end of the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(_SAFETENSORS_LENGTH_BYTES)
        if len(prefix) < _SAFETENSORS_LENGTH_BYTES:
            return f"it is {size} bytes, too short for a safetensors header"
        (length,) = struct.unpack("<Q", prefix)
        if length > _HEADER_LIMIT or _SAFETENSORS_LENGTH_BYTES + length > size:
            return f"it is {size} bytes, shorter than its {length}-byte header: it was cut short"
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, AttributeError, KeyError, IndexError, TypeError):  # JSON or layout
        return "its header is not a valid safetensors header"
    expected = _SAFETENSORS_LENGTH_BYTES + length + max(ends, default=0)
    if size < expected:
        return f"it is {size} bytes but its tensors end at byte {expected}: it was cut short"
    if size > expected:
        return f"it is {size} bytes but its tensors end at byte {expected}"
    return None


def damaged_file(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """The first file of a component folder that cannot be read, and why; None if none is found.

    Looks at the JSON files (configs, shard indexes) and safetensors files directly in `folder`,
    in name order; other files (``.bin`` pickles, tokenizer text) are not checked.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                return path, f"it is not valid JSON: {_one_line(err)}"
        elif path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            if problem is not None:
                return path, problem
    return None


def damaged_component_message(
    flag: str, source: str, subfolder: str | None, *, local: str | None, detail: str
) -> str:
    """The one-line error for a component whose files failed to load as damaged.

    Args:
      flag: the flag that named the model (``"--pretrained_model_name_or_path"``).
      source: its value (a folder or hub id).
      subfolder: the component (``"unet"``), or None when `source` is the component folder.
      local: the component's local folder, where the damaged file is looked for; None for a hub
        id (the file then lies in the Hugging Face cache).
      detail: what the loader said, shown when no damaged file is found.
    """
    found = damaged_file(local) if local is not None else None
    part = f"{subfolder}/" if subfolder else ""
    if found is not None:
        path, why = found
        return f"{flag} {source}: {part}{path.name} is damaged ({why}); {REDOWNLOAD_FIX}"
    if local is None:  # a hub download: the damaged copy is in the cache, not on the hub
        where = f"its {part or 'files'} in the Hugging Face cache (--cache_dir)"
        fix = "delete that copy from the cache and load again, or re-export the model"
    else:
        where = local
        fix = REDOWNLOAD_FIX
    return (
        f"{flag} {source}: a file of {where} is damaged or incomplete ({_one_line(detail)}); {fix}"
    )


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())
