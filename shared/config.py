"""One config for both backends: a `TrainConfig` is the task, the backend and one frozen
dataclass per component of the schema (`shared.schema`).

Parsing (CLI, YAML, `base_config:` inheritance) lives in `shared.cli`, the schema in
`shared.schema`, cross-field checks in `shared.config_checks`, and values derived from a config and
the data (effective batch, total steps, scaled learning rate) in `shared.plan`, never written back
into the config. The schema's names are re-exported here, so `from shared.config import ...` is
the one import a caller needs.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from shared.config_checks import validate
from shared.errors import ConfigError
from shared.schema import (
    ALIASES,
    BACKENDS,
    BETA_SCHEDULES,
    COMPONENTS,
    FIELDS,
    FLAX_ATTENTION,
    INTERPOLATION_MODES,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    PARALLELISM,
    PREDICTION_TYPES,
    PRIOR_PRECISIONS,
    REPORT_TO,
    TASK_DEFAULTS,
    TASKS,
    VALIDATION_SCHEDULERS,
    CheckpointConfig,
    DataConfig,
    DiffusionConfig,
    EMAConfig,
    FlaxConfig,
    HubConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PromptConfig,
    TorchConfig,
    TrainingConfig,
    ValidationConfig,
    defaults_for,
    field_type,
    flag,
)


def _freeze(value):
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value):
    """Plain dicts/lists again (for YAML/JSON output) from frozen mappings and tuples."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run: task, backend, and one sub-config per component."""

    task: str
    backend: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    hub: HubConfig = dataclasses.field(default_factory=HubConfig)
    torch: TorchConfig = dataclasses.field(default_factory=TorchConfig)
    flax: FlaxConfig = dataclasses.field(default_factory=FlaxConfig)

    def __post_init__(self):
        for component in COMPONENTS:
            sub = getattr(self, component)
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                if isinstance(value, (Mapping, list)):
                    object.__setattr__(sub, f.name, _freeze(value))
        validate(self)

    def get(self, name: str) -> Any:
        """A field by its flag name, e.g. `cfg.get("snr_gamma")`."""
        name = ALIASES.get(name, name)
        component, _ = FIELDS[name]
        return getattr(getattr(self, component), name)

    @property
    def seed(self) -> int:
        """The seed actually used: `--seed`, or 0 (data order and noise must be reproducible)."""
        return 0 if self.training.seed is None else self.training.seed

    @property
    def validation_prompt_list(self) -> tuple[str, ...]:
        v = self.validation
        if v.validation_prompts:
            return tuple(v.validation_prompts)
        return (v.validation_prompt,) if v.validation_prompt else ()

    @property
    def noise_offset_scale(self) -> float:
        """The offset-noise scale: `--noise_offset`, or 0.1 for DreamBooth's `--offset_noise`."""
        return 0.1 if self.diffusion.offset_noise else self.diffusion.noise_offset


def build(task: str, backend: str, values: Mapping[str, Any] | None = None) -> TrainConfig:
    """A validated config from the task's defaults updated with `values` (flag name -> value)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    merged = defaults_for(task)
    for name, value in (values or {}).items():
        merged[ALIASES.get(name, name)] = value
    parts = {c: {} for c in COMPONENTS}
    for name, value in merged.items():
        parts[FIELDS[name][0]][name] = value
    return TrainConfig(
        task=task, backend=backend, **{c: COMPONENTS[c](**kw) for c, kw in parts.items()}
    )


__all__ = [
    "ALIASES", "BACKENDS", "BETA_SCHEDULES", "COMPONENTS", "FIELDS", "FLAX_ATTENTION",
    "INTERPOLATION_MODES", "LR_SCHEDULERS", "MIXED_PRECISION", "PARALLELISM", "PREDICTION_TYPES",
    "PRIOR_PRECISIONS", "REPORT_TO", "TASKS", "TASK_DEFAULTS", "VALIDATION_SCHEDULERS",
    "CheckpointConfig", "ConfigError", "DataConfig", "DiffusionConfig", "EMAConfig", "FlaxConfig",
    "HubConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "PromptConfig", "TorchConfig",
    "TrainConfig", "TrainingConfig", "ValidationConfig", "build", "defaults_for", "field_type",
    "flag", "thaw",
]  # fmt: skip
