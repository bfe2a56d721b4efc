"""Every reference flag is honoured by the flax backend or refused with a reason.

A flag is honoured when code outside the flag table reads it (flaxdiff/ or the shared layer both
backends run on): the audit fails on a new flag nobody reads. A torch-only flag is refused on
flax in one line that names it and says what to do instead.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from shared import cli
from shared.config import ConfigError
from shared.schema import COMPONENTS

REPO = Path(__file__).resolve().parents[2]
# The flag table, its checks and its parser mention every flag: they are not evidence of use.
_DECLARATIONS = {"schema.py", "config_checks.py", "cli.py"}
FLAGS = [
    (f.name, f.metadata.get("backend")) for c in COMPONENTS.values() for f in dataclasses.fields(c)
]


def _reading_code() -> str:
    files = [*(REPO / "flaxdiff").rglob("*.py"), *(REPO / "shared").rglob("*.py")]
    return "\n".join(p.read_text() for p in files if p.name not in _DECLARATIONS)


@pytest.mark.parametrize(("name", "backend"), FLAGS, ids=[name for name, _ in FLAGS])
def test_each_flag_is_read_by_flax_code_or_refused(name, backend):
    if backend == "torch":
        return  # refused: the next test
    if name == "validation_images":
        return  # refused on both backends: see below
    assert re.search(rf"\b{name}\b", _reading_code()), f"--{name}: no flax or shared code reads it"


_BASE = [
    "--config", str(REPO / "configs" / "models" / "tiny.yaml"), "--tokenizer_name", "tok",
    "--instance_data_dir", "data", "--instance_prompt", "a sks dog", "--output_dir", "out",
]  # fmt: skip
_SAMPLE_VALUES = {"offload_ema": None, "foreach_ema": None}  # store_true flags need no value


@pytest.mark.parametrize("name", [n for n, b in FLAGS if b == "torch"])
def test_torch_only_flags_are_refused_on_flax_in_one_line(name):
    field = next(f for c in COMPONENTS.values() for f in dataclasses.fields(c) if f.name == name)
    value = _SAMPLE_VALUES.get(name, None if field.type in (bool, "bool") else "1")
    argv = [*_BASE, f"--{name}", *([] if value is None else [value])]
    with pytest.raises(ConfigError) as error:
        cli.parse_args(argv, task="dreambooth", backend="flax")
    message = str(error.value)
    assert f"--{name}" in message and "torch-only" in message and "\n" not in message


def test_validation_images_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"--validation_images.*DeepFloyd IF"):
        cli.parse_args([*_BASE, "--validation_images", "a.png"], task="dreambooth", backend="flax")
