"""diffusers ``config.json`` <-> frozen dataclasses of the Flax models' architectures."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def _thawed(value: Any) -> Any:
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class DiffusersConfig:
    """Base of a model's config: the fields are the diffusers constructor arguments.

    Subclasses set `class_name` (``_class_name`` in config.json) and check their values in
    `validate`. Lists become tuples so configs are hashable (static under jit).
    """

    class_name: ClassVar[str] = ""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _frozen(getattr(self, field.name)))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError for values flaxdiff does not implement (subclasses override)."""

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Self:
        """Builds the config from a diffusers config.json dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) and keys this class
        does not know are ignored, as diffusers ignores them (configs saved by newer versions).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict that diffusers' ``from_config``/``from_pretrained`` read."""
        try:
            version = importlib.metadata.version("diffusers")
        except importlib.metadata.PackageNotFoundError:
            version = "0.35.0"  # the oldest diffusers twindiff writes for
        out: dict[str, Any] = {"_class_name": self.class_name, "_diffusers_version": version}
        for field in dataclasses.fields(self):
            out[field.name] = _thawed(getattr(self, field.name))
        return out

    def per_block(self, name: str, count: int) -> tuple:
        """A field given as one value or one per block, as a tuple of `count` values."""
        value = getattr(self, name)
        if isinstance(value, tuple):
            if len(value) != count:
                raise ValueError(
                    f"{type(self).__name__}: {name} has {len(value)} entries but the model has "
                    f"{count} blocks (give one value, or one per entry of down_block_types)"
                )
            return value
        return (value,) * count

    def check_levels(self, down_types: tuple[str, ...], up_types: tuple[str, ...], *,
                     normalize: Callable[[str], str] = str) -> None:  # fmt: skip
        """One down block, one up block and one channel count per level, of supported types."""
        levels = len(self.block_out_channels)
        for name, known in (("down_block_types", down_types), ("up_block_types", up_types)):
            blocks = getattr(self, name)
            if len(blocks) != levels:
                raise ValueError(
                    f"{type(self).__name__}: {name} has {len(blocks)} entries but "
                    f"block_out_channels has {levels}; give one per resolution level"
                )
            for block in blocks:
                if normalize(block) not in known:
                    raise ValueError(
                        f"{type(self).__name__}: {name} entry {block!r} is not supported by "
                        f"flaxdiff (supported: {', '.join(known)}); train this model with the "
                        "torch backend"
                    )

    def check_supported(self, rules: Mapping[str, tuple[bool, Any]]) -> None:
        """`rules`: field name -> (its value is supported, what is supported)."""
        for name, (ok, supported) in rules.items():
            if not ok:
                self.refuse(name, supported)

    def refuse(self, name: str, supported: tuple | str) -> None:
        """Raises a ValueError: field `name` has a value this implementation lacks."""
        raise ValueError(
            f"{type(self).__name__}: {name}={getattr(self, name)!r} is not supported by flaxdiff "
            f"(supported: {supported}); train this model with the torch backend"
        )
