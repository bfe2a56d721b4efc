"""Which files of a hub repo a Flax load reads, so a download fetches those and nothing else.

An SD repo holds far more than a Flax load needs: single-file checkpoints at its root (GBs),
fp16/EMA variants beside the fp32 weights, ``.bin`` copies of safetensors, a safety checker.
`files_to_fetch` picks configs, tokenizer/scheduler files, and for each model flaxdiff converts
the weights of one variant in one format (safetensors when the folder has them, else ``.bin``,
else the msgpack file of the old Flax classes, as in duongna/stable-diffusion-v1-4-flax).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from flaxdiff.models.flax_msgpack import WEIGHT_FILES as FLAX_WEIGHT_FILES
from shared import diffusers_format

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Pipeline parts that are files without weights (everything else is a model).
_WEIGHTLESS = re.compile(r"Scheduler|Tokenizer|ImageProcessor|FeatureExtractor")


def _in_folder(files: Sequence[str], folder: str | None) -> list[str]:
    """Names of the files directly inside `folder` (None: the repo root)."""
    prefix = f"{folder}/" if folder else ""
    return [f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]]


def _is_variant(name: str, variant: str | None) -> bool:
    """Whether a weight file belongs to `variant` (None: the plain files).

    diffusers/transformers name variants ``stem.fp16.safetensors`` and shards
    ``stem-00001-of-00002.fp16.safetensors``; plain files have no such middle part.
    """
    stem = name
    for suffix in _WEIGHT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    parts = stem.split(".")
    return parts[1:] == [variant] if variant else len(parts) == 1


def component_files(files: Sequence[str], folder: str | None, *, weights: bool,
                    variant: str | None = None) -> list[str]:  # fmt: skip
    """Repo paths to fetch for one component folder: its json/txt files, and with `weights`
    the weight files of `variant` in one format (safetensors preferred; the old Flax msgpack
    file, which has no variants, only when there are no PyTorch weights and no `variant`)."""
    prefix = f"{folder}/" if folder else ""
    names = _in_folder(files, folder)
    wanted = [n for n in names if n.endswith((".json", ".txt"))]
    if weights:
        for suffix in _WEIGHT_SUFFIXES:
            chosen = [n for n in names if n.endswith(suffix) and _is_variant(n, variant)]
            if chosen:
                wanted += chosen
                break
        else:
            if variant is None:
                wanted += [n for n in names if n in FLAX_WEIGHT_FILES.values()]
    return [prefix + n for n in wanted]


def files_to_fetch(files: Sequence[str], subfolder: str | None, *, variant: str | None,
                   read_index: Callable[[], dict], is_model: Callable[[str], bool],
                   weights: bool = True) -> list[str]:  # fmt: skip
    """Repo paths a Flax load of `subfolder` (None: the whole repo) reads.

    Args:
      files: every path in the repo.
      subfolder: one component, or None.
      variant: weight variant (``"fp16"``) or None.
      read_index: returns the repo's ``model_index.json`` (called only for a whole pipeline).
      is_model: whether a class name is one flaxdiff converts.
      weights: False fetches the configs only (shapes to plan with, `flaxdiff.plan`).
    """
    if subfolder is not None or diffusers_format.MODEL_INDEX not in files:
        return component_files(files, subfolder, weights=weights, variant=variant)
    wanted = [diffusers_format.MODEL_INDEX]
    for name, entry in diffusers_format.components_of(read_index()).items():
        if entry is None:
            continue
        class_name = entry[1]
        if is_model(class_name):
            wanted += component_files(files, name, weights=weights, variant=variant)
        elif _WEIGHTLESS.search(class_name):  # small files, copied as they are on export
            wanted += component_files(files, name, weights=False)
        # Other models (a safety checker) are left out: the export writes them as null.
    return wanted


def download(repo_id: str, subfolder: str | None, *, revision: str | None,
             variant: str | None, is_model: Callable[[str], bool],
             weights: bool = True) -> Path:  # fmt: skip
    """Fetches what `files_to_fetch` names; returns the local folder of `subfolder`."""
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    files = list_repo_files(repo_id, revision=revision)

    def read_index() -> dict:
        path = hf_hub_download(repo_id, diffusers_format.MODEL_INDEX, revision=revision)
        return json.loads(Path(path).read_text(encoding="utf-8"))

    wanted = files_to_fetch(files, subfolder, variant=variant, read_index=read_index,
                            is_model=is_model, weights=weights)  # fmt: skip
    root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    return root / subfolder if subfolder else root
