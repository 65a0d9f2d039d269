"""Typed configuration shared by every stage.

Each stage has one frozen dataclass; YAML recipes hold only data and are loaded with
:func:`from_mapping`, which rejects unknown keys so that a typo in a recipe is an error,
not a silently ignored setting.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
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
    finite: bool = True,
) -> Any:
    """A config field with its valid values, checked by :func:`validate_fields` (one place for
    the range and choice checks every stage's config needs)::

        steps: int = setting(100, ge=1)
        clip_eps: float = setting(0.2, gt=0, lt=1)
        baseline: str = setting("group", choices=("group", "moving_average"))

    ``None`` is always accepted for an optional field (``Optional[...] = setting(None, gt=0)``).
    Every number of every config must be finite (NaN and infinity are refused by
    :func:`from_mapping` and :func:`validate_fields`); ``finite=False`` lets this field hold
    ``inf`` (NaN never).
    """
    rules = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}.items() if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rules": rules, "finite": finite})


def _allows_infinity(field: dataclasses.Field) -> bool:
    return field.metadata.get("finite", True) is False


def check_finite(value: Any, what: str, allow_infinity: bool = False) -> None:
    """Every float in ``value`` (a number, or lists/tuples/mappings of them) is finite: else one
    :class:`ConfigError` naming ``what`` (and the item)."""
    if isinstance(value, (str, int)):  # (bool is an int)
        return
    if isinstance(value, float):
        if math.isnan(value) or (math.isinf(value) and not allow_infinity):
            raise ConfigError(f"{what} must be a finite number, got {value!r}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_finite(item, f"{what}.{key}", allow_infinity)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(item, f"{what}[{i}]", allow_infinity)


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
        if not dataclasses.is_dataclass(value):
            check_finite(value, f.name, _allows_infinity(f))
        if not rules or value is None:
            continue
        choices = rules.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        bounds = [(name, bound) for name, bound in rules.items() if name != "choices"]
        if bounds and not all(_RULE_CHECK[name](value, bound) for name, bound in bounds):
            wanted = " and ".join(_RULE_TEXT[name].format(bound) for name, bound in bounds)
            raise ConfigError(f"{f.name} must be {wanted}, got {value!r}")


#: longest STFT window and training window accepted (larger ones only exhaust memory)
MAX_N_FFT = 1 << 16
MAX_SEGMENT_SAMPLES = 1 << 24


class ValidatedConfig:
    """Base of the stage configs: ``__post_init__`` checks the :func:`setting` rules.
    A subclass with cross-field checks defines ``__post_init__`` and calls ``super().__post_init__()``."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class SignalConfig(ValidatedConfig):
    """Signal conventions of OmniSep/CLIPSep, so that numbers are comparable with theirs."""

    sample_rate: int = setting(16_000, gt=0, le=384_000)
    #: training window in samples (about 4.1 s at 16 kHz); at least one STFT window (n_fft)
    segment_samples: int = setting(65_535, ge=1, le=MAX_SEGMENT_SAMPLES)
    n_fft: int = setting(1024, ge=2, le=MAX_N_FFT)
    hop_length: int = setting(256, ge=1)
    #: number of log-frequency bins the linear STFT bins are warped onto (at most n_fft // 2 + 1)
    n_log_bins: int = setting(256, ge=2)
    #: two-source mixtures: each source is multiplied by this gain and the results summed
    mix_source_gain: float = setting(0.5, gt=0)

    @property
    def n_linear_bins(self) -> int:
        return self.n_fft // 2 + 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hop_length > self.n_fft:
            raise ConfigError(f"hop_length must be in 1..n_fft, got {self.hop_length}")
        if self.segment_samples < self.n_fft:
            raise ConfigError(f"segment_samples (the training window) must be >= n_fft ({self.n_fft}), got {self.segment_samples}")
        if self.n_log_bins > self.n_linear_bins:
            raise ConfigError(f"n_log_bins must be in 2..{self.n_linear_bins} (n_fft // 2 + 1 linear bins), got {self.n_log_bins}")


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build the dataclass ``cls`` from a mapping (e.g. parsed YAML), recursively.

    Unknown keys raise :class:`ConfigError` naming ``where`` and the key. Every value is checked
    against its field's type (:func:`_coerce`: numbers finite and coerced from YAML 1.1 text, text
    where text is wanted, lists and mappings of the right items); the dataclass's own checks
    (:func:`setting` rules, ``__post_init__``) then run, and their error is prefixed with ``where``.
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {_short(data)}")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, Mapping):
            value = from_mapping(nested, value, f"{where}.{name}")
        kwargs[name] = _coerce(value, hint, f"{where}: {name}", _allows_infinity(fields[name]))
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except ConfigError as exc:
        if str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, hint: Any, what: str, allow_infinity: bool = False) -> Any:
    """``value`` checked against the type ``hint`` and coerced where YAML is loose.

    Numbers: int/float as asked (``5e-4`` is text to YAML 1.1), finite (NaN never; infinity
    only where ``allow_infinity``). ``str`` and ``bool`` fields take only text and true/false.
    ``list[X]``, ``tuple[X, ...]`` and ``dict[K, V]`` check each item. Other hints (``Any``,
    classes) pass, with their numbers checked finite."""
    if value is None:
        return value
    if hint is Any:
        check_finite(value, what, allow_infinity)
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], what, allow_infinity)
        if float in options or int in options:
            return _number(value, float if float in options else int, what, allow_infinity)
        check_finite(value, what, allow_infinity)
        return value
    if hint in (int, float):
        return _number(value, hint, what, allow_infinity)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {_short(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be text, got {_short(value)}")
        return value
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what} must be a list, got {_short(value)}")
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{what} must be a list of {len(args)} items, got {_short(value)}")
            items = [_coerce(v, a, f"{what}[{i}]", allow_infinity) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{what}[{i}]", allow_infinity) for i, v in enumerate(value)]
        return tuple(items) if (hint is tuple or origin is tuple) else items
    if hint in (dict, Mapping) or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{what} must be a mapping, got {_short(value)}")
        key_hint, item_hint = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(k, key_hint, f"{what} key {k!r}"): _coerce(v, item_hint, f"{what}.{k}", allow_infinity)
            for k, v in value.items()
        }
    check_finite(value, what, allow_infinity)
    return value


def _number(value: Any, wanted: type, what: str, allow_infinity: bool = False) -> Any:
    """``value`` as the int or float ``wanted`` (``5e-4`` is text to YAML 1.1), finite."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{what} must be a number, got {_short(value)}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {_short(value)}")
    check_finite(value, what, allow_infinity and wanted is float)
    try:
        if wanted is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{what} must be a whole number, got {value!r}")
            return int(value)
        return float(value)
    except OverflowError:  # an integer too large for a float
        raise ConfigError(f"{what} must be a finite number, got {_short(value)}") from None


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


#: recipes, configs and cards are small; a larger file is refused before it is parsed
MAX_YAML_BYTES = 4 << 20


#: the most nodes a YAML document may expand to, aliases counted as copies of what they name
MAX_YAML_NODES = 1_000_000


def load_yaml(text: str, where: str) -> Any:
    """Parse ``text`` (a recipe, a config, a card's front matter) with PyYAML's safe loader; any
    problem is one :class:`ConfigError` line naming ``where``.

    Aliases (``*name``) let a few lines of YAML stand for an exponentially large document ("billion
    laughs"), which the stages then copy and print. PyYAML's own dumper writes them for shared
    objects, so they are allowed, but the document's size with every alias expanded is counted from
    the parser's events before anything is built, and refused above :data:`MAX_YAML_NODES`."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: too large for a recipe ({len(text)} characters; at most {MAX_YAML_BYTES})")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when PyYAML has it (same results)
    try:
        _check_expanded_size(yaml.parse(text, Loader=loader), where)
        return yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML ({detail})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None


def _check_expanded_size(events: Any, where: str) -> None:
    """Count the nodes of the documents in ``events`` with every alias expanded, without expanding
    anything: each anchored node's expanded size is remembered, an alias adds it."""
    import yaml

    sizes: dict[str, int] = {}
    stack: list[list] = [[0, None]]  # [nodes so far, anchor] per open collection
    for event in events:
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([1, event.anchor])
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            count, anchor = stack.pop()
        elif isinstance(event, yaml.ScalarEvent):
            count, anchor = 1, event.anchor
        elif isinstance(event, yaml.AliasEvent):
            count, anchor = sizes.get(event.anchor, 1), None
        else:
            continue
        if anchor is not None:
            sizes[anchor] = count
        stack[-1][0] += count
        if stack[-1][0] > MAX_YAML_NODES or count > MAX_YAML_NODES:
            line = f", line {event.start_mark.line + 1}" if event.start_mark is not None else ""
            raise ConfigError(
                f"{where}: not valid YAML (aliases expand it beyond {MAX_YAML_NODES} nodes{line}; write the values out)"
            )


def read_yaml_file(path: str | Path, what: str = "recipe") -> Any:
    """:func:`load_yaml` of a file; an unreadable or oversized file is one line naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: too large for a {what} ({size} bytes; at most {MAX_YAML_BYTES})")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read the {what} (not UTF-8 text: {exc.reason})") from None
    return load_yaml(text, str(path))


def load_recipe(cls: type[T], path: str | Path | None, overrides: Mapping[str, Any] | None = None, where: str = "config") -> T:
    """A stage's config from a YAML recipe (or the defaults), with command-line overrides.

    ``None`` override values are ignored (options the user did not give). Errors name the
    recipe file. ``path`` may also name a shipped training recipe (``soundfont-small``).
    """
    from marsctl.recipe_paths import find_recipe

    data: dict[str, Any] = {}
    if path is not None:
        path = find_recipe("train", path)
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a training recipe must be a mapping")
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_mapping(cls, data, where=str(path or where))
