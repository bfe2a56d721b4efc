"""diffusers/transformers folders <-> Flax models, both ways, and random init from a config.

``from_diffusers("path/to/sd")`` reads a whole pipeline folder (or hub id) in one call: every
model component (UNet, VAE, CLIP text encoder) becomes a Flax model with its weights; tokenizer,
scheduler and other parts stay files, copied as they are by ``to_diffusers``. One component:
``from_diffusers("path/to/sd", subfolder="unet")`` or a component folder itself.

Folders of the old Flax classes (diffusers <= 0.39, transformers 4.x: ``FlaxUNet2DConditionModel``,
``diffusion_flax_model.msgpack``, ...) read the same way, through `flax_msgpack`, when a component
has no PyTorch weights; their ``Flax`` class names are read as the PyTorch ones.

``to_diffusers`` writes config.json + safetensors that diffusers/transformers ``from_pretrained``
load. A float32 weight survives diffusers -> Flax -> diffusers bit for bit.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from flaxdiff.models import flax_msgpack, hub_files, weights_io
from flaxdiff.models.layers import Buffer, ModelOptions, fill_random
from flaxdiff.models.state_dict import load_torch_state_dict, torch_state_dict
from shared import diffusers_format, model_folders

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """Where a diffusers/transformers class lives in flaxdiff, and how its folder is laid out."""

    library: str  # "diffusers" or "transformers": names the weight file and config keys
    model: str  # "module:Class"
    config: str  # "module:Class" with from_dict / to_dict

    @property
    def weight_stem(self) -> str:
        return "model" if self.library == "transformers" else "diffusion_pytorch_model"

    def load(self) -> tuple[type, type]:
        def resolve(spec):
            module, name = spec.split(":")
            return getattr(importlib.import_module(module), name)

        return resolve(self.model), resolve(self.config)


# The registry: class name in config.json / model_index.json -> Flax implementation.
MODEL_CLASSES: dict[str, ModelEntry] = {
    "UNet2DConditionModel": ModelEntry(
        "diffusers",
        "flaxdiff.models.unet_2d_condition:UNet2DConditionModel",
        "flaxdiff.models.unet_2d_condition:UNet2DConditionConfig",
    ),
    "UNet2DModel": ModelEntry(
        "diffusers", "flaxdiff.models.unet_2d:UNet2DModel", "flaxdiff.models.unet_2d:UNet2DConfig"
    ),
    "AutoencoderKL": ModelEntry(
        "diffusers",
        "flaxdiff.models.autoencoder_kl:AutoencoderKL",
        "flaxdiff.models.autoencoder_kl:AutoencoderKLConfig",
    ),
    "CLIPTextModel": ModelEntry(
        "transformers",
        "flaxdiff.models.clip_text:CLIPTextModel",
        "flaxdiff.models.clip_text:CLIPTextConfig",
    ),
}


def _without_flax(class_name: str) -> str:
    """The PyTorch class name of an old Flax class (``FlaxPNDMScheduler`` -> ``PNDMScheduler``).

    diffusers <= 0.39 and transformers 4.x saved Flax models under the PyTorch class's name with a
    ``Flax`` prefix, holding the same architecture config and the same weights.
    """
    return class_name.removeprefix("Flax")


def is_model_class(class_name: str) -> bool:
    """Whether flaxdiff converts a class named in model_index.json (old ``Flax`` names included)."""
    return _without_flax(class_name) in MODEL_CLASSES


def class_name_of(config: Mapping[str, Any], *, source: str = "config") -> str:
    """The model class a diffusers (``_class_name``) or transformers (``architectures``) config names."""
    name = config.get("_class_name")
    if name is None:
        name = model_folders.architecture_name(config)
        # A text encoder neither backend trains is refused by the shared rule, which names its
        # pipeline family: "use the torch backend" would be no fix for it.
        if name in model_folders.UNSUPPORTED_TEXT_ENCODERS:
            model_folders.text_encoder_class_name(config, source)
    if isinstance(name, str) and is_model_class(name):
        name = _without_flax(name)
    if name not in MODEL_CLASSES:
        known = ", ".join(MODEL_CLASSES)
        raise ValueError(
            f"{source} names model class {name!r}, which flaxdiff does not implement "
            f"(it has: {known}); train this model with the torch backend"
        )
    return name


def build_config(config: Mapping[str, Any], *, source: str = "config") -> Any:
    """The typed config (e.g. ``UNet2DConditionConfig``) of a config.json dict."""
    _, config_cls = MODEL_CLASSES[class_name_of(config, source=source)].load()
    return config_cls.from_dict(config)


def init_model(
    config: Mapping[str, Any] | Any,
    *,
    options: ModelOptions | None = None,
    seed: int = 0,
    abstract: bool = False,
) -> nnx.Module:
    """A randomly initialized model for a config.json dict (or a typed config).

    Args:
      config: e.g. ``configs/models/sd15.yaml``'s ``model.unet_config``, or a config object.
      options: compute options (dtype, attention, remat).
      seed: the init seed.
      abstract: build shapes only (``nnx.eval_shape``): no memory, no compute; for parameter
        counts, sharding plans, or loading weights without a random init first.
    """
    typed = build_config(config) if isinstance(config, Mapping) else config
    model_cls, _ = MODEL_CLASSES[typed.class_name].load()
    options = options or ModelOptions()

    def make():
        return model_cls(typed, options=options, rngs=nnx.Rngs(seed))

    model = nnx.eval_shape(make)
    # Drawn on the host: an eager or jitted JAX init compiles every initializer (minutes for
    # a UNet on a 2-core CPU); numpy draws SD 1.5's 860M weights in seconds.
    return model if abstract else fill_random(model, seed)


def parameter_count(model: nnx.Module) -> int:
    """Number of saved weights (parameters and frozen buffers), as diffusers counts ``parameters()``."""
    state = nnx.state(model, nnx.Param, Buffer)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class FlaxPipeline:
    """A diffusers pipeline folder read into Flax: models converted, other parts left as files.

    Attributes:
      models: component name -> Flax model (``unet``, ``vae``, ``text_encoder``).
      folder: the local folder it was read from (tokenizer/scheduler files are copied from it).
      model_index: the parsed ``model_index.json``.
    """

    models: dict[str, nnx.Module]
    folder: Path
    model_index: dict[str, Any]

    def __getitem__(self, name: str) -> nnx.Module:
        return self.models[name]


def from_diffusers(
    path_or_repo: str | os.PathLike,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    variant: str | None = None,
    options: ModelOptions | None = None,
    abstract: bool = False,
) -> nnx.Module | FlaxPipeline:
    """Reads diffusers/transformers weights into Flax models.

    Args:
      path_or_repo: a pipeline folder (with model_index.json), a component folder (with
        config.json), or a hub repo id.
      subfolder: one component of a pipeline (``"unet"``); None reads the folder itself: the
        whole pipeline when it has model_index.json, else the one model.
      revision: hub revision (branch, tag or commit) for hub ids.
      variant: weight-file variant, e.g. ``"fp16"`` (``*.fp16.safetensors``).
      options: compute options of the built models; their parameters keep
        ``options.param_dtype`` (fp32 by default) whatever the file's dtype.
      abstract: read the configs only and build shapes (``nnx.eval_shape``), no weights (a hub
        id downloads no weight file): what `flaxdiff.plan` compiles a step from.

    Returns:
      The model (one component) or a `FlaxPipeline` (whole folder).
    """
    folder = _local_folder(
        str(path_or_repo), subfolder, revision=revision, variant=variant, weights=not abstract
    )
    if (folder / "config.json").is_file():
        return load_model(folder, variant=variant, options=options, abstract=abstract)
    if not (folder / diffusers_format.MODEL_INDEX).is_file():
        raise FileNotFoundError(
            f"{folder} has neither config.json (a model) nor {diffusers_format.MODEL_INDEX} "
            "(a pipeline); point at a diffusers pipeline or one of its component folders"
        )
    index = diffusers_format.read_model_index(folder)
    models = {}
    for name, entry in diffusers_format.components_of(index).items():
        if entry is None or not is_model_class(entry[1]):
            continue  # tokenizer, scheduler, safety checker...: files, copied on export
        models[name] = load_model(
            folder / name, variant=variant, options=options, abstract=abstract
        )
    return FlaxPipeline(models=models, folder=folder, model_index=index)


def load_model(
    folder: str | os.PathLike,
    *,
    variant: str | None = None,
    options: ModelOptions | None = None,
    abstract: bool = False,
) -> nnx.Module:
    """One model from a component folder (config.json + weights).

    The weights are PyTorch's (`weights_io.read_weights`), or, in a folder that has none, those
    of the old Flax classes (`flax_msgpack`; they have no variants). `abstract`: the config's
    shapes only, no weights read.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a model component folder)")
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    name = class_name_of(raw, source=str(config_path))
    model = init_model(build_config(raw, source=str(config_path)), options=options, abstract=True)
    if abstract:
        return model
    stem = MODEL_CLASSES[name].weight_stem
    msgpack = flax_msgpack.weights_file(folder, stem=stem)
    if msgpack is not None and variant:
        raise FileNotFoundError(
            f"{folder} holds only old Flax weights ({msgpack.name}), which come in no variants; "
            f"load it without variant={variant!r}"
        )
    if msgpack is not None:
        return flax_msgpack.load_msgpack(model, msgpack)
    weights = weights_io.read_weights(folder, stem=stem, variant=variant)
    return load_torch_state_dict(model, weights, source=f"the weights in {folder}")


def _local_folder(path_or_repo: str, subfolder: str | None, *, revision: str | None,
                  variant: str | None, weights: bool = True) -> Path:  # fmt: skip
    local = diffusers_format.resolve_component(
        path_or_repo, subfolder, flag="pretrained_model_name_or_path"
    )
    if local is not None:
        return Path(local)
    return hub_files.download(path_or_repo, subfolder, revision=revision, variant=variant,
                              is_model=is_model_class, weights=weights)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Writing


def class_of(model: nnx.Module) -> str:
    """The diffusers/transformers class name of a flaxdiff model (its `MODEL_CLASSES` key)."""
    for name, entry in MODEL_CLASSES.items():
        if type(model) is entry.load()[0]:
            return name
    raise TypeError(f"{type(model).__name__} is not a flaxdiff model")


def write_model(
    model: nnx.Module,
    folder: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes one model as a component folder (config.json + safetensors), crash-safely.

    The folder is assembled beside `folder` and renamed into place, so a reader sees the old
    folder or the new one, never a mix.

    Args:
      dtype: weight dtype in the file (e.g. ``"float16"``); default: the parameters' dtype.
      max_shard_bytes: split the weights into shards of at most this size (with an index).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    entry = MODEL_CLASSES[class_of(model)]
    state = torch_state_dict(model)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        config = model.config.to_dict()
        diffusers_format.atomic_write_text(
            staging / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n"
        )
        weights_io.write_weights(
            staging, state, stem=entry.weight_stem, max_shard_bytes=max_shard_bytes
        )
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _flax_weights_only(folder: Path) -> bool:
    """Whether a component folder's only weights are old Flax msgpack files."""
    return any(flax_msgpack.weights_file(folder, stem=stem) for stem in flax_msgpack.WEIGHT_FILES)


def _swap_in(staging: Path, folder: Path) -> None:
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    try:
        os.replace(staging, folder)
    except BaseException:
        if old.exists():
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def to_diffusers(
    source: nnx.Module | FlaxPipeline,
    output_dir: str | os.PathLike,
    *,
    models: Mapping[str, nnx.Module] | None = None,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes Flax models back as a diffusers folder.

    Args:
      source: one model (written as a component folder: config.json + weights), or a
        `FlaxPipeline` (written as a whole pipeline folder: its models, plus every other
        component copied from the folder it was read from, then ``model_index.json``).
      output_dir: the destination folder.
      models: replacements for the pipeline's models (e.g. the trained UNet).
      dtype: weight dtype in the files; default the parameters' dtype (fp32).
      max_shard_bytes: shard weight files above this size.
    """
    if isinstance(source, nnx.Module):
        if models:
            raise ValueError("models= replaces parts of a pipeline; pass a FlaxPipeline")
        return write_model(source, output_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    chosen = {**source.models, **(models or {})}
    output_dir = Path(output_dir)
    with diffusers_format.staging_folder(output_dir) as staging:
        components = {}
        for name, entry in diffusers_format.components_of(source.model_index).items():
            if name in chosen:
                write_model(chosen[name], staging / name, dtype=dtype,
                            max_shard_bytes=max_shard_bytes)  # fmt: skip
                class_name = class_of(chosen[name])
                components[name] = (MODEL_CLASSES[class_name].library, class_name)
            elif entry is not None and (source.folder / name).is_dir():
                if _flax_weights_only(source.folder / name):
                    # An old Flax safety checker, say: PyTorch cannot load its msgpack weights.
                    components[name] = None
                    continue
                shutil.copytree(source.folder / name, staging / name)
                # A pipeline read from old Flax files names FlaxPNDMScheduler and the like,
                # which diffusers >= 0.40 no longer has.
                components[name] = (entry[0], _without_flax(entry[1]))
            else:
                components[name] = None
        extra = {
            k: v
            for k, v in source.model_index.items()
            if not k.startswith("_") and k not in components
        }
        pipeline_class = source.model_index.get("_class_name", "DiffusionPipeline")
        diffusers_format.write_model_index(
            staging,
            pipeline_class=_without_flax(pipeline_class),
            components=components,
            extra=extra,
        )
        diffusers_format.publish_pipeline(staging, output_dir)
    return output_dir
