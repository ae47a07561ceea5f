"""YAML config + ``key=value`` command-line overrides -> a method's Config dataclass (torchtune's shape).

Errors name the file, the line and the field: ``configs/sft.yaml:7: unknown field 'lerning_rate' in SFTConfig
(did you mean 'learning_rate'?)``. Dotted overrides reach into dict fields only: ``lora.r=8``. YAML is read with a
SafeLoader (no Python tags), duplicated keys are an error naming both lines, and the text must be UTF-8.
docs/errors.md lists every bad input and what it gets.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def check_choice(name: str, value: Any, allowed) -> None:
    """The one "must be one of" check: `value` of option `name` is one of `allowed`, or a ValueError naming all."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


#: Old field names that still load, old -> new (a config class may add its own in ``ALIASES``).
ALIASES = {"dataset_size": "n_train", "train_problems": "n_train", "task": "dataset", "eval_task": "eval_dataset",
           "eval_problems": "n_eval", "generation_batch_size": "rollout_batch_size", "dataset_seed": "data_seed",
           "max_rationale_length": "max_new_tokens"}
_NOTED: set[str] = set()


def renamed(cls, values: dict[str, Any], where: dict[str, str] | None = None) -> dict[str, Any]:
    """`values` with deprecated field names of `cls` replaced by the new ones; a one-line notice per old name
    (once per process). Both names at once is an error."""
    aliases = {**ALIASES, **getattr(cls, "ALIASES", {})}
    names = {f.name for f in dataclasses.fields(cls)}
    out = dict(values)
    for old in [k for k in values if k not in names and aliases.get(k) in names]:
        new = aliases[old]
        loc = (where or {}).get(old, cls.__name__)
        if new in values:
            raise ConfigError(f"{loc}: '{old}' is the old name of '{new}'; give only '{new}'")
        out[new] = out.pop(old)
        if where is not None:
            where[new] = where.pop(old)
        note_renamed(old, new)
    return out


def note_renamed(old: str, new: str) -> None:
    """The one-line deprecation notice of an old option name, once per process."""
    if old not in _NOTED:
        _NOTED.add(old)
        print(f"note: '{old}' is deprecated; use '{new}'", file=sys.stderr)


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans: `save_strategy: no` must stay the string "no" (YAML 1.1 reads
    yes/no/on/off as booleans, which breaks every TrainingArguments option whose value is "no")."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load(text: str):
    return yaml.load(text, Loader=_Loader)


def read_text(path: Path, what: str = "file") -> str:
    """A file's text as UTF-8; a bad byte is reported with the file, line and column."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what}")
    if not path.exists():
        raise ConfigError(f"{path}: no such {what}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col})") from None


def _duplicate_keys(node, path: Path) -> None:
    """A key given twice in one mapping (YAML would silently keep the last): an error naming both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                line = k.start_mark.line + 1
                if k.value in seen:
                    raise ConfigError(f"{path}:{line}: duplicated key '{k.value}' (also on line {seen[k.value]}); "
                                      "YAML would silently keep the last one")
                seen[k.value] = line
            _duplicate_keys(v, path)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _duplicate_keys(v, path)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping at the top of a YAML file and the line of each top-level key."""
    text = read_text(path, "config file")
    try:
        node = yaml.compose(text, Loader=_Loader)
        _duplicate_keys(node, path)
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
    if tp in (int, float, bool, str, dict, list):
        return tp
    if origin in (dict, list):
        return origin
    return None


def _allows_mapping(tp) -> bool:
    """Can the field hold a dict (``lora``, ``lr_scheduler_kwargs: dict | str``, ...)?"""
    if tp is dict or typing.get_origin(tp) is dict:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(_allows_mapping(a)
                                                                          for a in typing.get_args(tp))


#: The LoRA options ponder documents, with their types (PEFT's `LoraConfig`; `models.apply_lora` checks the
#: names of the others against it).
LORA_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,), "alpha": (int, float), "lora_alpha": (int, float), "dropout": (int, float),
    "lora_dropout": (int, float), "target_modules": (list, str), "modules_to_save": (list,), "bias": (str,),
    "use_rslora": (bool,), "use_dora": (bool,), "trainable_token_indices": (list, dict), "layers_to_transform": (list, int),
}


def _check_lora(value: dict, where: str) -> dict:
    for k, v in value.items():
        types_ = LORA_TYPES.get(k)
        if types_ is None or v is None:
            continue
        if int in types_ and float not in types_ and isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
            v = value[k] = int(v)
        if isinstance(v, bool) and bool not in types_ or not isinstance(v, types_):
            names = " or ".join(t.__name__ for t in types_)
            raise ConfigError(f"{where}: lora.{k} must be {names}, got {v!r}")
        if k == "r" and v < 1:
            raise ConfigError(f"{where}: lora.r must be >= 1, got {v}")
    return value


def _check_type(cls, name: str, value: Any, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = _base_type(hints.get(name))
    if tp is None or value is None:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: field '{name}' is a mapping of options (e.g. {name}.r=8 on the command "
                              f"line, or '{name}: {{r: 8}}' in YAML), got {value!r}")
        return _check_lora(value, where) if name == "lora" else value
    if tp is list:  # a single item is accepted: the configs wrap it (one stop string, samples=8)
        if isinstance(value, dict):
            raise ConfigError(f"{where}: field '{name}' must be a list, got {value!r}")
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
        locs = {k: f"{path}:{n}" for k, n in lines.items()}
        data = renamed(cls, data, locs)
        for k, v in data.items():
            loc = locs.get(k, f"{path}:1")
            if k not in fields:
                raise ConfigError(_unknown(cls, k, loc, fields))
            values[k] = _check_type(cls, k, v, loc)
            where[k] = loc
    for text in overrides or []:
        keys, v = parse_override(text)
        loc = f"command line ({text})"
        keys[0] = next(iter(renamed(cls, {keys[0]: None}, {keys[0]: loc})))
        if keys[0] not in fields:
            raise ConfigError(_unknown(cls, keys[0], loc, fields))
        if len(keys) == 1:
            values[keys[0]] = _check_type(cls, keys[0], v, loc)
        else:
            if not _allows_mapping(typing.get_type_hints(cls).get(keys[0])):
                raise ConfigError(f"{loc}: field '{keys[0]}' is not a mapping, so '{'.'.join(keys)}' has no "
                                  f"meaning; write {keys[0]}=VALUE")
            d = values.get(keys[0]) or {}
            if not isinstance(d, dict):
                raise ConfigError(f"{loc}: field '{keys[0]}' is {d!r}, not a mapping")
            d = values[keys[0]] = dict(d)
            for k in keys[1:-1]:
                d = d.setdefault(k, {})
                if not isinstance(d, dict):
                    raise ConfigError(f"{loc}: '{k}' in '{'.'.join(keys)}' is not a mapping")
            d[keys[-1]] = v
            _check_type(cls, keys[0], values[keys[0]], loc)
        where[keys[0]] = loc
    for k, (lo, what) in _BOUNDS.items():
        v = values.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < lo:
            raise ConfigError(f"{where.get(k, cls.__name__)}: {k} must be {what}, got {v!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        named = [loc for k, loc in where.items() if k in str(e) and loc != "defaults"] or \
            [where[k] for k, v in values.items() if where.get(k, "defaults") != "defaults" and
             isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v) and
             re.search(rf"(?<![\w.]){re.escape(str(v))}(?![\w.])", str(e))]
        src = named[0] if named else ", ".join(sorted({v for v in where.values() if v != "defaults"})) or cls.__name__
        raise ConfigError(f"{src}: {e}") from None


#: Settings no run can use below a bound, checked where they are read (TrainingArguments checks them only when
#: the optimizer or dataloader is built, long after the model is loaded).
_BOUNDS = {"learning_rate": (0, ">= 0"), "per_device_train_batch_size": (1, ">= 1"),
           "gradient_accumulation_steps": (1, ">= 1"), "num_train_epochs": (0, ">= 0"), "max_length": (1, ">= 1")}


def _unknown(cls, key: str, loc: str, fields: set[str]) -> str:
    near = difflib.get_close_matches(key, fields, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"{loc}: unknown field '{key}' in {cls.__name__}{hint}"


def to_yaml(cfg) -> str:
    """Every field of a config, as YAML (what a run records next to its outputs)."""

    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    return yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=True)


def _one_line(text: str, width: int = 110) -> str:
    """The first sentence (or line) of a help text, cut to `width` characters."""
    text = " ".join(str(text or "").split())
    m = re.match(r"(.+?[a-z0-9)`])\.\s+[A-Z`]", text)  # a sentence's end, not "e.g. x"
    text = m.group(1) if m else text[:-1] if text.endswith(".") and not text.endswith("..") else text
    return text if len(text) <= width else text[: width - 1] + "…"


def _own_doc(cls) -> str:
    """A class's own docstring (not the one `dataclass` generates from the signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def describe_fields(cls) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """A config's fields for ``ponder <method> --help``: groups ``(title, [(name, type, default, help)])``, one per
    class of the config's MRO that declares fields (the method's own first, TrainingArguments last), titled with
    the class's name and the first line of its docstring. Inherited fields are listed under the class that
    declares them, once."""
    seen: set[str] = set()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    groups = []
    for klass in cls.__mro__:
        own = [n for n in klass.__dict__.get("__annotations__", {}) if n in fields and n not in seen]
        if not own:
            continue
        rows = []
        for name in own:
            seen.add(name)
            f = fields[name]
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            tp = re.sub(r"\b(?:[a-z_]\w*\.)+(\w+)", r"\1", str(tp))  # transformers.x.SchedulerType -> SchedulerType
            rows.append((name, tp, default, _one_line(f.metadata.get("help", ""))))
        doc = _one_line(_own_doc(klass), 90)
        groups.append((f"{klass.__name__}" + (f": {doc}" if doc else ""), rows))
    return groups
