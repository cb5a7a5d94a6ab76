"""Typed configs: dataclasses loaded from YAML, overridden by `key=value` from the CLI.

Every recipe has one config dataclass (nested dataclasses allowed, addressed with dotted
keys: `train.lr=2e-5`). Values from the CLI are parsed as YAML scalars (`1e-4`, `true`,
`[13, 21]`) and then checked against the field's type, so a typo in a key or a value that
cannot be the field's type is a `ConfigError` naming the key, not a crash mid-run.

Locations are resolved where the config is loaded, on the driver: the work runs in Ray
workers whose current directory is a session folder, where `data: runs/local/cache` would
name nothing. A field says it is a location by its type, never by its name:
`InputPath`/`OutputPath` (always made absolute when relative) and `ModelRef` (a hub id like
`roberta-large` or `org/name`, or a path: made absolute only when that relative path exists
here). URIs (`s3://`, `hf://`, ...) and values that start with a sweep placeholder
(`{best:teacher}`, filled with an absolute location) stay as they are. A dict field marked
`Overrides` holds overrides of other config classes (a sweep's `base`/`methods`, a nested
`teacher_config`): the keys those classes declare as locations are resolved in it too.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, TypeVar

import yaml

from rayapp.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Location:
    """The mark of a `str` field that names a file, a folder or a model (module docstring)."""
    kind: Literal["input", "output", "model"]

    def resolve(self, value: Any) -> Any:
        if not isinstance(value, str) or not value or value.startswith("{") or "://" in value:
            return value
        path = os.path.expanduser(value)
        if self.kind == "model" and not os.path.isabs(path) and not os.path.exists(path):
            return value  # a hub id stays one
        return os.path.abspath(path)


InputPath = Annotated[str, Location("input")]      # a file or folder read
OutputPath = Annotated[str, Location("output")]    # a folder written
ModelRef = Annotated[str, Location("model")]       # a hub id, a local model dir or an s3:// URI


class Overrides:
    """The mark of a dict field of overrides of the config classes `classes` (module docstring)."""

    def __init__(self, *classes: type):
        self._classes = classes

    def classes(self) -> Iterable[type]:
        return self._classes

    def resolve(self, value: Any) -> Any:
        table: dict = {}
        for cls in self.classes():
            for key, spec in _locations(cls).items():
                if key not in table or spec == Location("model"):  # where classes disagree, the cautious kind
                    table[key] = spec
        return _resolve_tree(value, table)


class _RecipeOverrides(Overrides):
    """Overrides of whichever recipe's config (a sweep's `base` and `methods`)."""

    def classes(self) -> Iterable[type]:
        from rayapp.recipes import RECIPES, get_recipe  # the recipes import this module

        return [get_recipe(name)[0] for name in RECIPES]


RecipeOverrides = _RecipeOverrides()


def _resolve_tree(value: Any, table: dict) -> Any:
    """`value` with the keys `table` declares resolved, at any depth: a dict under a key that is
    no section of the config (a method or task name, a grid) holds the same keys again."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        spec = table.get(key)
        if isinstance(item, dict):
            out[key] = _resolve_tree(item, spec if isinstance(spec, dict) else table)
        elif isinstance(spec, Location):  # a value, or a grid's list of values
            out[key] = [spec.resolve(v) for v in item] if isinstance(item, list) else spec.resolve(item)
        else:
            out[key] = item
    return out


def _mark(tp: Any) -> Location | Overrides | None:
    """The Location/Overrides mark of a field type, also inside `X | None`."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, (Location, Overrides))), None)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((m for m in map(_mark, typing.get_args(tp)) if m is not None), None)
    return None


def _locations(cls) -> dict:
    """{key: Location} of `cls`'s location fields, and {key: {...}} for its nested sections."""
    table: dict = {}
    for name, tp in _field_types(cls).items():
        mark = _mark(tp)
        section = next((t for t in (tp, *typing.get_args(tp)) if isinstance(t, type) and dataclasses.is_dataclass(t)),
                       None)
        if isinstance(mark, Location):
            table[name] = mark
        elif section is not None and _locations(section):
            table[name] = _locations(section)
    return table


@functools.cache  # get_type_hints evaluates every annotation string: a sweep builds a config per trial
def _field_types(cls) -> types.MappingProxyType:
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: the Location/Overrides marks
    return types.MappingProxyType({f.name: hints[f.name] for f in dataclasses.fields(cls)})


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value to the annotated type `tp` (the subset of typing we use)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = _coerce(value, typing.get_args(tp)[0], key)
        mark = _mark(tp)
        return value if mark is None else mark.resolve(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `seeds=13` means `seeds=[13]`
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid keys: {sorted(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    for f in dataclasses.fields(cls):  # a default location (output_dir: runs) means here, too
        if f.name not in kwargs and isinstance(f.default, str) and isinstance(_mark(types_[f.name]), Location):
            kwargs[f.name] = _mark(types_[f.name]).resolve(f.default)
    try:
        return cls(**kwargs)  # dataclasses check their values in __post_init__
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"{cls.__name__}: {e}; set it in the YAML file or as key=value") from None


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a config section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["a=1", "train.lr=1e-4"]` -> nested dict with YAML-parsed values."""
    data: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from an optional YAML file plus `key=value` overrides (overrides win)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return _build(cls, _merge(data, parse_overrides(list(overrides))))


def build(cls: type[T], data: dict) -> T:
    """Build `cls` from a nested dict, with the same checks as `load_config`."""
    return _build(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def require_counts(cfg, *keys: str) -> None:
    """One ConfigError naming the first of `keys` (fields of `cfg`, None allowed: "as many as
    fit") that is below 1: sizes, counts and actor numbers of a stage config."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
