"""Typed configuration shared by every stage.

Each stage has one frozen dataclass; YAML recipes hold only data and are loaded with
:func:`from_mapping`, which rejects unknown keys so that a typo in a recipe is an error,
not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from marsctl.errors import ConfigError

T = TypeVar("T")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """A config field with its valid values, checked by :func:`validate_fields` (one place for
    the range and choice checks every stage's config needs)::

        steps: int = setting(100, ge=1)
        clip_eps: float = setting(0.2, gt=0, lt=1)
        baseline: str = setting("group", choices=("group", "moving_average"))

    ``None`` is always accepted for an optional field (``Optional[...] = setting(None, gt=0)``).
    """
    rules = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}.items() if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rules": rules})


_RULE_TEXT = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}"}
_RULE_CHECK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def validate_fields(config: Any) -> None:
    """Check every field declared with :func:`setting`; the first violation is one
    :class:`ConfigError` naming the field, the rule and the value. A subclass that only
    redeclares a field's default keeps the base class's rules for it."""
    declared: dict[str, dict] = {}
    for cls in type(config).__mro__:
        for f in getattr(cls, "__dataclass_fields__", {}).values():
            if f.metadata.get("rules") and f.name not in declared:
                declared[f.name] = f.metadata["rules"]
    for f in dataclasses.fields(config):
        rules = declared.get(f.name)
        value = getattr(config, f.name)
        if not rules or value is None:
            continue
        choices = rules.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        bounds = [(name, bound) for name, bound in rules.items() if name != "choices"]
        if bounds and not all(_RULE_CHECK[name](value, bound) for name, bound in bounds):
            wanted = " and ".join(_RULE_TEXT[name].format(bound) for name, bound in bounds)
            raise ConfigError(f"{f.name} must be {wanted}, got {value!r}")


class ValidatedConfig:
    """Base of the stage configs: ``__post_init__`` checks the :func:`setting` rules.
    A subclass with cross-field checks defines ``__post_init__`` and calls ``super().__post_init__()``."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class SignalConfig(ValidatedConfig):
    """Signal conventions of OmniSep/CLIPSep, so that numbers are comparable with theirs."""

    sample_rate: int = setting(16_000, gt=0)
    #: training window in samples (about 4.1 s at 16 kHz)
    segment_samples: int = 65_535
    n_fft: int = 1024
    hop_length: int = setting(256, ge=1)
    #: number of log-frequency bins the linear STFT bins are warped onto
    n_log_bins: int = setting(256, ge=2)
    #: two-source mixtures: each source is multiplied by this gain and the results summed
    mix_source_gain: float = 0.5

    @property
    def n_linear_bins(self) -> int:
        return self.n_fft // 2 + 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hop_length > self.n_fft:
            raise ConfigError(f"hop_length must be in 1..n_fft, got {self.hop_length}")


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build the dataclass ``cls`` from a mapping (e.g. parsed YAML), recursively.

    Unknown keys raise :class:`ConfigError` naming ``where`` and the key.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, Mapping):
            value = from_mapping(nested, value, f"{where}.{name}")
        kwargs[name] = _number(value, hint, f"{where}: {name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _number(value: Any, hint: Any, what: str) -> Any:
    """``value`` as the int/float that ``hint`` asks for (``5e-4`` is text to YAML 1.1); other hints pass."""
    options = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    if value is None and type(None) in options:
        return value
    wanted = float if float in options else int if int in options else None
    if wanted is None or isinstance(value, bool) and wanted is not bool:
        if wanted is not None:
            raise ConfigError(f"{what} must be a number, got {value!r}")
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if wanted is int:
        if float(value) != int(value):
            raise ConfigError(f"{what} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def to_mapping(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_mapping`: a plain dict ready for JSON or YAML."""
    return dataclasses.asdict(obj)


def load_recipe(cls: type[T], path: str | Path | None, overrides: Mapping[str, Any] | None = None, where: str = "config") -> T:
    """A stage's config from a YAML recipe (or the defaults), with command-line overrides.

    ``None`` override values are ignored (options the user did not give). Errors name the
    recipe file. ``path`` may also name a shipped training recipe (``soundfont-small``).
    """
    import yaml

    from marsctl.recipe_paths import find_recipe

    data: dict[str, Any] = {}
    if path is not None:
        path = find_recipe("train", path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the recipe ({str(exc).splitlines()[0]})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a training recipe must be a mapping")
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_mapping(cls, data, where=str(path or where))
