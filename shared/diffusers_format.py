"""The diffusers pipeline folder layout, read and written without torch, jax or diffusers.

A folder holds ``model_index.json`` (the pipeline class, one ``[library, class]`` per component,
``[null, null]`` for one left out) and a subfolder per component (models: ``config.json`` and
safetensors; schedulers: ``scheduler_config.json``; tokenizers: vocabulary). Both backends export
via `staging_folder` + `publish_pipeline`: components swapped in by rename, ``model_index.json``
last, so a reader never sees an index naming a half-written folder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

MODEL_INDEX = "model_index.json"
STAGING_PREFIX = ".export-tmp-"
# A component's weight file by the library that saves it (sharded: "<file>.index.json" + shards).
COMPONENT_WEIGHT_FILES = {
    "diffusers": "diffusion_pytorch_model.safetensors",
    "transformers": "model.safetensors",
}
# What a CLIP tokenizer folder may hold (vocab.json + merges.txt, or tokenizer.json).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")  # fmt: skip
PIPELINE_KINDS = ("unconditional", "latent", "pixel_text")
# A hub repo id: "name" or "owner/name" of [A-Za-z0-9_.-] (huggingface_hub's validate_repo_id).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_LAYOUT_HINT = "expected a diffusers pipeline folder with model_index.json, unet/, vae/, ..."


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a pipeline folder (FileNotFoundError if it has none)."""
    path = Path(folder) / MODEL_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MODEL_INDEX} ({_LAYOUT_HINT})")
    return json.loads(path.read_text(encoding="utf-8"))


def components_of(index: Mapping[str, Any]) -> dict[str, tuple[str, str] | None]:
    """Component name -> (library, class), or None for an entry written as ``[null, null]``."""
    out: dict[str, tuple[str, str] | None] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue  # metadata (_class_name) and pipeline flags (requires_safety_checker)
        out[name] = None if None in value else (value[0], value[1])
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Lets `write` fill a hidden temp file beside `path`, fsyncs it and renames it over `path`.

    A crash leaves either the old file or the new one, never a half-written one; the temp file
    is removed on failure. Its name (``.NAME.XXXXXXXX.tmp``) matches no weight or config file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_model_index(
    folder: str | os.PathLike,
    *,
    pipeline_class: str,
    components: Mapping[str, tuple[str, str] | None],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``model_index.json`` atomically, as diffusers does (sorted keys, indent 2).

    Args:
      folder: the pipeline folder (must exist).
      pipeline_class: e.g. ``"StableDiffusionPipeline"``.
      components: name -> (library, class), e.g. ``("diffusers", "UNet2DConditionModel")``;
        None writes ``[null, null]``, diffusers' entry for a component left out.
      extra: further entries, e.g. ``{"requires_safety_checker": False}``.
    """
    try:  # package metadata names the installed version without importing diffusers
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = "0.35.0"  # the oldest diffusers twindiff supports
    index = {"_class_name": pipeline_class, "_diffusers_version": version, **(extra or {})}
    for name, entry in components.items():
        index[name] = [None, None] if entry is None else [entry[0], entry[1]]
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    return atomic_write_text(Path(folder) / MODEL_INDEX, text)


def _looks_like_path(text: str) -> bool:
    # No hub id starts with "/", ".", "~" or holds "a/b/c", spaces, backslashes, drive letters;
    # and "outputs/run1" where outputs/ exists here is a mistyped path, not a hub repo.
    return not _HUB_ID.match(text) or ("/" in text and os.path.exists(text.split("/")[0]))


def resolve_component(path_or_id: str, subfolder: str | None, *, flag: str) -> str | None:
    """The local folder of one component, or None when `path_or_id` is a hub id.

    Args:
      path_or_id: a local pipeline/component folder or a hub repo id.
      subfolder: the component's subfolder (``"unet"``), or None for the folder itself.
      flag: the flag that named it, for messages (``"--pretrained_model_name_or_path"``).

    Raises:
      FileNotFoundError: a local folder lacks `subfolder`, or a path-like string names nothing
        (never retried as a hub id: a typo in a path must not turn into a download).
      NotADirectoryError: the path is a file, e.g. a single-file checkpoint.
    """
    path = os.path.expanduser(path_or_id)
    if os.path.isdir(path):
        component = path if subfolder is None else os.path.join(path, subfolder)
        if not os.path.isdir(component):
            raise FileNotFoundError(
                f"{flag} {path_or_id} has no {subfolder}/ folder ({_LAYOUT_HINT})"
            )
        return component
    if os.path.exists(path):
        raise NotADirectoryError(f"{flag} {path_or_id} is a file, not a folder ({_LAYOUT_HINT})")
    if _looks_like_path(path_or_id):
        raise FileNotFoundError(
            f"{flag} {path_or_id}: no such folder (it looks like a local path, so it is not "
            "tried as a hub id)"
        )
    return None


def pipeline_kind(folder: str | os.PathLike) -> str:
    """What a pipeline folder trains as: one of `PIPELINE_KINDS`.

    ``latent``: a VAE beside the UNet (Stable Diffusion); ``pixel_text``: a text encoder or
    tokenizer but no VAE (DeepFloyd IF); ``unconditional``: UNet and scheduler only (DDPM).
    """
    present = {n for n, entry in components_of(read_model_index(folder)).items() if entry}
    if "vae" in present:
        return "latent"
    return "pixel_text" if present & {"text_encoder", "tokenizer"} else "unconditional"


def _component_files(library: str, class_name: str) -> tuple[tuple[str, ...], str | None]:
    """(acceptable config files, weight-file stem or None) of a component class."""
    if class_name.endswith("Scheduler"):
        return ("scheduler_config.json",), None
    if "Tokenizer" in class_name:
        return ("tokenizer_config.json", "vocab.json", "tokenizer.json"), None
    if class_name.endswith(("ImageProcessor", "FeatureExtractor")):
        return ("preprocessor_config.json",), None
    weights = COMPONENT_WEIGHT_FILES.get(library, "")
    return ("config.json",), weights.removesuffix(".safetensors") or None


def check_pipeline_folder(
    folder: str | os.PathLike, *, required: tuple[str, ...] = ("unet", "scheduler")
) -> list[str]:
    """Problems that would stop a pipeline folder from loading; empty when it looks complete.

    Checks that model_index.json names every `required` component, and each one it names has its
    folder, config and (models) weights: safetensors, maybe ``.fp16`` or sharded, or ``.bin``.
    """
    folder = Path(folder)
    try:
        entries = components_of(read_model_index(folder))
    except (FileNotFoundError, ValueError) as err:
        return [str(err)]
    problems = [f"{MODEL_INDEX} names no {n} component" for n in required if not entries.get(n)]
    for name, entry in entries.items():
        sub = folder / name
        if entry is not None and not sub.is_dir():
            problems.append(f"{name}/ is missing (named by {MODEL_INDEX} as {entry[1]})")
        if entry is None or not sub.is_dir():
            continue
        configs, stem = _component_files(*entry)
        if not any((sub / c).is_file() for c in configs):
            problems.append(f"{name}/ has no {' or '.join(configs)}")
        if stem and not [*sub.glob(f"{stem}*.safetensors*"), *sub.glob(f"{stem}*.bin")]:
            problems.append(f"{name}/ has no weights ({stem}.safetensors)")
    return problems


@contextlib.contextmanager
def staging_folder(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder in `output_dir` to write a pipeline into; removed on exit.

    On the destination's file system, so parts move by rename. Leftovers of a killed export are
    removed first (only the main process exports into a folder).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_pipeline(staging: str | os.PathLike, output_dir: str | os.PathLike) -> list[str]:
    """Moves a complete pipeline folder from `staging` into `output_dir`, crash-safely.

    Each component folder replaces its old version by rename; if that fails part-way, the old
    folders are put back. ``model_index.json`` is renamed in last; then the replaced folders and
    stale components (named by the old index or null in the new one, and not written now) are
    deleted. Nothing else in `output_dir` (checkpoints, logs) is touched. Returns the component
    folders installed.
    """
    staging, output_dir = Path(staging), Path(output_dir)
    named = set(components_of(read_model_index(staging)))
    with contextlib.suppress(FileNotFoundError, ValueError):
        named |= set(components_of(read_model_index(output_dir)))
    parts = sorted(p.name for p in staging.iterdir() if p.is_dir() and not p.name.startswith("."))
    # Renames are atomic, but without fsync a power loss can leave renamed files empty.
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    replaced = staging / ".replaced"
    replaced.mkdir()
    moved_out: list[str] = []
    installed: list[str] = []
    try:
        for name in parts:
            if (output_dir / name).exists():
                os.replace(output_dir / name, replaced / name)
                moved_out.append(name)
            os.replace(staging / name, output_dir / name)
            installed.append(name)
        _install_model_index(staging, output_dir)
    except BaseException:
        for name in reversed(installed):
            os.replace(output_dir / name, staging / name)
        for name in reversed(moved_out):
            os.replace(replaced / name, output_dir / name)
        raise
    for name in sorted(named - set(parts)):
        if "/" not in name and not name.startswith(".") and (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
    return parts


def _install_model_index(staging: Path, output_dir: Path) -> None:
    # The commit point: a failure before it puts the old folders back (see publish_pipeline).
    os.replace(staging / MODEL_INDEX, output_dir / MODEL_INDEX)
