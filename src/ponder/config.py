"""YAML config + ``key=value`` command-line overrides -> a method's Config dataclass (torchtune's shape).

Errors name the file, the line and the field: ``configs/sft.yaml:7: unknown field 'lerning_rate' in SFTConfig
(did you mean 'learning_rate'?)``. Dotted overrides reach into dict fields: ``lora.r=8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans: `save_strategy: no` must stay the string "no" (YAML 1.1 reads
    yes/no/on/off as booleans, which breaks every TrainingArguments option whose value is "no")."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load(text: str):
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping at the top of a YAML file and the line of each top-level key."""
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = _load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:1: expected a mapping of field: value")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    try:
        parsed = _load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else None
    if tp in (int, float, bool, str):
        return tp
    return None


def _check_type(cls, name: str, value: Any, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = _base_type(hints.get(name))
    if tp is None or value is None:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return tp(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: field '{name}' must be {tp.__name__}, got {value!r}")
    return value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, **defaults):
    """Build `cls` from `defaults`, then the YAML file, then the overrides (later wins)."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = dict(defaults)
    where: dict[str, str] = {k: "defaults" for k in values}
    if path is not None:
        path = Path(path)
        data, lines = _read_yaml(path)
        for k, v in data.items():
            loc = f"{path}:{lines.get(k, 1)}"
            if k not in fields:
                raise ConfigError(_unknown(cls, k, loc, fields))
            values[k] = _check_type(cls, k, v, loc)
            where[k] = loc
    for text in overrides or []:
        keys, v = parse_override(text)
        loc = f"command line ({text})"
        if keys[0] not in fields:
            raise ConfigError(_unknown(cls, keys[0], loc, fields))
        if len(keys) == 1:
            values[keys[0]] = _check_type(cls, keys[0], v, loc)
        else:
            d = values.setdefault(keys[0], {}) or {}
            values[keys[0]] = d
            for k in keys[1:-1]:
                d = d.setdefault(k, {})
            d[keys[-1]] = v
        where[keys[0]] = loc
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        named = [loc for k, loc in where.items() if k in str(e) and loc != "defaults"]
        src = named[0] if named else ", ".join(sorted({v for v in where.values() if v != "defaults"})) or cls.__name__
        raise ConfigError(f"{src}: {e}") from None


def _unknown(cls, key: str, loc: str, fields: set[str]) -> str:
    near = difflib.get_close_matches(key, fields, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"{loc}: unknown field '{key}' in {cls.__name__}{hint}"


def to_yaml(cfg) -> str:
    """Every field of a config, as YAML (what a run records next to its outputs)."""

    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    return yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=True)
