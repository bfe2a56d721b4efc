"""Command lines and YAML files into a `TrainConfig`.

    python -m flaxdiff.dreambooth --config configs/demo.yaml --learning_rate 2e-6 --center_crop

Flags are the diffusers flag names: `--name value`, `--name=value`, a bare `--flag` for booleans
(`--flag=false` turns one off), and lists as `--validation_prompts "a" "b"`. A YAML file holds the
same names, flat or grouped by component (`optim: {learning_rate: 1e-5}`), and may name
`base_config:` files (a path or a list, relative to the file) whose values it overrides. The command
line overrides the YAML. Every unknown name is an error that suggests the closest valid one.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from shared import config as C
from shared.config import ConfigError, TrainConfig
from shared.diffusers_format import atomic_write_text
from shared.errors import EXIT_USER_ERROR, UserError, debug_enabled

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
_RESERVED = ("base_config", "task", "backend")


def _suggest(name: str) -> str:
    candidates = [*C.FIELDS, *C.ALIASES, *C.COMPONENTS, *_RESERVED]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; see --help for the valid names"


def _canonical(name: str, source: str) -> str:
    name = C.ALIASES.get(name, name)
    if name not in C.FIELDS:
        raise ConfigError(f"unknown config key {name!r} in {source}{_suggest(name)}")
    return name


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(name: str, value: Any, source: str) -> Any:
    """Converts a CLI string or YAML value to the type of field `name`; errors name the source."""
    tp, optional = _strip_optional(C.field_type(name))
    where = f"--{name} (from {source})"
    if optional and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    if value is None:
        raise ConfigError(f"{where} cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (Mapping, list, tuple)):
                raise ValueError
            if isinstance(value, bool):
                # YAML 1.1 reads a bare `no` as False: `mixed_precision: no` means "no".
                if value is False and "no" in (C.FIELDS[name][1].metadata["choices"] or ()):
                    return "no"
                raise ValueError
            return str(value)
        if typing.get_origin(tp) is tuple:
            items = [value] if isinstance(value, str) else list(value)
            return tuple(str(v) for v in items)
        if typing.get_origin(tp) is Mapping or tp is Mapping:
            return _mapping(value)
    except (TypeError, ValueError, OSError, json.JSONDecodeError) as err:
        expected = getattr(tp, "__name__", str(tp))
        detail = f": {err}" if str(err) else ""
        raise ConfigError(f"{where}: expected {expected}, got {value!r}{detail}") from None
    raise TypeError(f"no coercion for field {name} of type {tp}")


def _mapping(value: Any) -> dict:
    """A config dict given inline (YAML mapping or JSON text) or as a .json/.yaml file path."""
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value)
    if text.lstrip().startswith("{"):
        return json.loads(text)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    with open(path) as f:
        loaded = yaml.safe_load(f)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} does not hold a mapping")
    return dict(loaded)


def resolve_config_path(path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Finds a YAML config: as given, relative to the including file, or under the repo's configs/."""
    p = Path(path)
    candidates = (
        [p]
        if p.is_absolute()
        else [*([relative_to / p] if relative_to else []), p, CONFIG_ROOT / p]
    )
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"config file {str(path)!r} not found (looked at: {tried})")


def load_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Flat values (flag name -> value, plus 'task'/'backend') of a YAML file and its bases."""
    path = resolve_config_path(path, _chain[-1].parent if _chain else None)
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"base_config cycle: {cycle}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(raw).__name__}")
    values: dict[str, Any] = {}
    bases = raw.get("base_config") or []
    for base in [bases] if isinstance(bases, str) else bases:
        values.update(load_yaml(base, (*_chain, path)))
    values.update(flatten(raw, str(path)))
    return values


def flatten(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Flat typed values of a config mapping, nested by section as the YAML files are
    (``{"optim": {"learning_rate": 1e-4}}``) or flat (``{"learning_rate": 1e-4}``); the
    ``base_config`` key is left to `load_yaml`, ``task``/``backend`` are kept as given."""
    values: dict[str, Any] = {}
    path = source
    for key, value in raw.items():
        if key == "base_config":
            continue
        if key in ("task", "backend"):
            values[key] = value
        elif key in C.COMPONENTS and isinstance(value, Mapping):
            for sub, v in value.items():
                name = _canonical(sub, f"{path} [{key}]")
                owner = C.FIELDS[name][0]
                if owner != key:
                    raise ConfigError(f"{path}: {name!r} belongs under {owner!r}, not {key!r}")
                values[name] = coerce(name, v, str(path))
        else:
            name = _canonical(key, str(path))
            values[name] = coerce(name, value, str(path))
    return values


def parse_cli(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Splits argv into (--config paths, flag values); values are typed, names canonical."""
    configs: list[str] = []
    values: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: flags look like --name value")
        key, eq, inline = token[2:].partition("=")
        i += 1
        if key == "config":
            if not eq:
                if i >= len(args):
                    raise ConfigError("--config needs a YAML file path")
                inline, i = args[i], i + 1
            configs.append(inline)
            continue
        name = _canonical(key, "the command line")
        tp, _ = _strip_optional(C.field_type(name))
        if eq:
            raw: Any = inline
        elif tp is bool:
            raw = True
        elif typing.get_origin(tp) is tuple:
            raw = []
            while i < len(args) and not args[i].startswith("--"):
                raw.append(args[i])
                i += 1
            if not raw:
                raise ConfigError(f"--{name} needs at least one value")
        else:
            if i >= len(args) or args[i].startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            raw, i = args[i], i + 1
        values[name] = coerce(name, raw, "the command line")
    return configs, values


def parse_args(argv: Sequence[str] | None, *, task: str, backend: str) -> TrainConfig:
    """The config of `python -m {backend}diff.{task} ARGV`. Prints help and exits on -h/--help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(task, backend))
        raise SystemExit(0)
    configs, cli_values = parse_cli(argv)
    values: dict[str, Any] = {}
    for path in configs:
        values.update(load_yaml(path))
    for key, wanted in (("task", task), ("backend", backend)):
        given = values.pop(key, None)
        if given is not None and given != wanted:
            raise ConfigError(
                f"the config file is for {key} {given!r}, but this command runs {wanted!r}"
            )
    values.update(cli_values)
    return C.build(task, backend, values)


def to_dict(cfg: TrainConfig, *, redact: bool = True) -> dict[str, Any]:
    """Nested plain dict of a config; secrets (the hub token) are replaced unless redact=False."""
    out: dict[str, Any] = {"task": cfg.task, "backend": cfg.backend}
    for component in C.COMPONENTS:
        section = {}
        for name, (owner, f) in C.FIELDS.items():
            if owner == component:
                value = C.thaw(cfg.get(name))
                if redact and f.metadata["secret"] and value is not None:
                    value = "<redacted>"
                section[name] = value
        out[component] = section
    return out


def to_yaml(cfg: TrainConfig, *, redact: bool = True) -> str:
    header = (
        f"# twindiff resolved config: python -m {cfg.backend}diff.{cfg.task} --config <this file>\n"
    )
    return header + yaml.safe_dump(to_dict(cfg, redact=redact), sort_keys=False, allow_unicode=True)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Writes the resolved config atomically (temp file + rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, to_yaml(cfg))


def load_saved_config(path: str | os.PathLike) -> TrainConfig:
    """A config saved by `save_config` (a redacted hub token comes back as None)."""
    values = load_yaml(path)
    if values.get("hub_token") == "<redacted>":
        values["hub_token"] = None
    task, backend = values.pop("task", None), values.pop("backend", None)
    if task is None or backend is None:
        raise ConfigError(f"{path} names no task/backend; it is not a saved twindiff config")
    return C.build(task, backend, values)


def format_help(task: str, backend: str | None) -> str:
    """The --help text: every flag that applies to `task`, with its default; on one `backend`,
    or (None, the launcher's ``twindiff TASK --help``) on both, each flag marked with the
    backends that read it."""
    defaults = C.defaults_for(task)
    command = (
        f"python -m {backend}diff.{task}" if backend else f"twindiff {task} --backend flax|torch"
    )
    lines = [
        f"usage: {command} [--config FILE.yaml] [--flag value ...]",
        "",
        "Flags are those of the diffusers training scripts. --config reads a YAML file "
        "(see configs/); flags override it.",
    ]
    for component, cls in C.COMPONENTS.items():
        rows = []
        for f in cls.__dataclass_fields__.values():
            tasks, only = f.metadata["tasks"], f.metadata["backend"]
            if (tasks and task not in tasks) or (backend and only and only != backend):
                continue
            where = "" if backend else f" [{only or 'flax, torch'}]"
            rows.append(
                f"  --{f.name:<44} {f.metadata['help']} (default: {defaults[f.name]!r}){where}"
            )
        if rows:
            lines += ["", f"{component}:", *rows]
    return "\n".join(lines)


_TASK_SHORT = {"unconditional": "uncond", "text2image": "t2i", "dreambooth": "db"}


def format_flag_table() -> str:
    """The README's flag table (Markdown), generated from the schema so the two never drift."""
    rows = [
        "| flag | default | tasks | backend | meaning |",
        "|---|---|---|---|---|",
    ]
    per_task = {task: C.defaults_for(task) for task in C.TASKS}
    for cls in C.COMPONENTS.values():
        for f in cls.__dataclass_fields__.values():
            tasks = f.metadata["tasks"] or C.TASKS
            values = {t: per_task[t][f.name] for t in tasks}
            if len({repr(v) for v in values.values()}) == 1:
                default = _md(next(iter(values.values())))
            else:
                default = "; ".join(f"{_TASK_SHORT[t]}: {_md(v)}" for t, v in values.items())
            scope = (
                "all" if f.metadata["tasks"] is None else ", ".join(_TASK_SHORT[t] for t in tasks)
            )
            backend = f.metadata["backend"] or "both"
            rows.append(
                f"| `--{f.name}` | {default} | {scope} | {backend} | {f.metadata['help']} |"
            )
    return "\n".join(rows)


def _md(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return f"`{value}`"


if __name__ == "__main__":  # python -m shared.cli: print the README flag table
    print(format_flag_table())


def run_main(main: Callable[[], int]) -> int:
    """Runs a task entry point; what the user can fix ends with one line and exit status 2.

    A `UserError` (a config, data, checkpoint or training error), or a file or folder that a
    flag names but that is missing or not writable, is printed as one line without a traceback
    (``TWINDIFF_DEBUG=1`` shows it); anything else is a bug and keeps its traceback. A stop
    signal before training exits with 128 + the signal number and says so; a second Ctrl-C
    aborts with 130.
    """
    from shared.run.signals import StopRequested

    try:
        return main()
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        if debug_enabled():
            traceback.print_exc()
        # Our messages may list files after their first line; an OSError's is one line already.
        print(f"error: {err if isinstance(err, UserError) else _one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StopRequested as stop:
        print(f"twindiff: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        if debug_enabled():
            traceback.print_exc()
        print("twindiff: aborted by Ctrl-C; resume from the newest checkpoint with "
              "--resume_from_checkpoint latest", file=sys.stderr)  # fmt: skip
        return 130


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
