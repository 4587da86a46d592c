"""YAML files (with `inherit:` and `preset:`), dotted command-line overrides, and typed building of the tree:
every unknown key and every value of the wrong type is named with the fix."""

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_dapo.config.checks import ConfigError
from megatron_dapo.config.presets import PRESETS
from megatron_dapo.config.tree import DapoConfig

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DapoConfig:
    """Build a validated config from an optional YAML file and `section.field=value` overrides.

    A `preset=NAME` override applies the preset over everything the files set, then later overrides apply.
    """
    raw = _load_yaml_tree(Path(path), ()) if path else {}
    for override in overrides or []:
        if override.partition("=")[0].strip() == "preset":
            raw = _merge(raw, _expand_preset({"preset": _override_value(override)}))
        else:
            _apply_override(raw, override)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> DapoConfig:
    """Build a validated config from a nested dict; a top-level `preset` key is expanded first."""
    return _build(DapoConfig, _expand_preset(raw), "")


def _expand_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """Replace a `preset` key by the algorithm values it stands for; the tree's own algorithm values win."""
    tree = dict(tree)
    name = tree.pop("preset", None)
    if name is None:
        return tree
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    tree["algorithm"] = {**PRESETS[name], **(tree.get("algorithm") or {})}
    return tree


def _load_yaml_tree(path: Path, inherited_by: tuple[Path, ...]) -> dict[str, Any]:
    """A file's tree over the tree it inherits; its preset applies at its own level, so it beats the parent's
    algorithm values and loses to its own. `inherited_by`: the files that led here, to refuse a loop."""
    if path in inherited_by:
        chain = " -> ".join(str(p) for p in (*inherited_by, path))
        raise ConfigError(f"inherit: {chain} is a loop: remove one of these inherit keys")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    tree = _parse_yaml(_read_text(path), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop("inherit", None)
    tree = _expand_preset(tree)
    if parent is None:
        return tree
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: inherit must name one YAML file (relative to this one), got {parent!r}")
    return _merge(_load_yaml_tree((path.parent / parent).resolve(), (*inherited_by, path.resolve())), tree)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}): save it as UTF-8 YAML") from None


def _parse_yaml(text: str, source: str) -> Any:
    """YAML text -> value; a syntax error becomes one line saying where."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def _override_value(override: str) -> Any:
    return _parse_yaml(override.partition("=")[2], f"override {override!r}")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_maps else value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, _ = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: write it as section.field=value, e.g. rollout.top_p=0.7")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
    node[leaf] = _override_value(override)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {_join(where, close[0])}?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown key {_join(where, key)}{hint}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], raw[name], _join(where, name)) for name in fields if name in raw}
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], item, where) for item in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-6 (no dot) as text; everyone writes it so
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config type {hint}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
