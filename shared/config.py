"""Configs as nested dataclasses, loaded from TOML, validated, overridable with `key=value`.

An unknown key, a value of the wrong type or an impossible combination raises `ConfigError`,
which the scripts print as one line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


ENV_REF = re.compile(r"\$\{(\w+)\}")


def expand_env(value: str, key: str) -> str:
    """`${NAME}` in a path-valued setting replaced by the environment variable, so that a committed
    preset can name data that lives elsewhere on each machine (configs/llm/cpu-16m.toml)."""
    def lookup(m: re.Match) -> str:
        if not os.environ.get(m.group(1)):
            raise ConfigError(f"{key} = {value!r} needs the environment variable {m.group(1)}, which is not set: "
                              f"export {m.group(1)}=<folder> or set {key} to a path")
        return os.environ[m.group(1)]

    return ENV_REF.sub(lookup, value)


def _check_type(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name} = {value!r}: must be one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{name} = {value!r}: expected {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{name} = {value!r}: expected None")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} = {value!r}: expected a list")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_check_type(name, v, item) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{name} = {value!r}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")


def _table_class(tp: Any) -> type | None:
    """The dataclass a field holds as a table: `X`, or `X | None` (None when the table is absent)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _rename(cls: type, data: dict) -> dict:
    """One table's old keys moved to their new places. A config class lists them in its RENAMED
    class attribute, {old key: new dotted key under it} (moe_experts -> moe.experts), so old runs'
    config.toml files still load. Files are renamed when read (`renamed`), so an old name still
    here came later, as an override, and its value wins over the new name's."""
    moves = getattr(cls, "RENAMED", {})
    if not any(k in data for k in moves):
        return data
    data = copy.deepcopy(data)
    for old, new in moves.items():
        if old in data:
            *path, leaf = new.split(".")
            node = data
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{old} is now {new}, but {part!r} is not a table of settings")
            node[leaf] = data.pop(old)
    return data


def renamed(cls: type, data: dict) -> dict:
    """A (nested) dict for dataclass `cls` with every table's old keys under their new names."""
    data = _rename(cls, data)
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        table = _table_class(hints[f.name])
        if table is not None and isinstance(data.get(f.name), dict):
            out[f.name] = renamed(table, data[f.name])
    return out


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys and wrong types."""
    data = _rename(cls, data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = _drop_retired(cls, data, fields, prefix)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' in {where}; known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        table = _table_class(tp)
        if table is not None and value is None and table is not tp:
            kwargs[name] = None  # an optional table left out, as to_dict writes it
        elif table is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a table of settings")
            kwargs[name] = from_dict(table, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, tp)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    return obj


def _drop_retired(cls: type, data: dict, fields: dict, prefix: str) -> dict:
    """`data` without the keys `cls` lists in its RETIRED class attribute ({key: old default}) and
    no longer has: older runs saved them in their config.toml, and at the old default they changed
    nothing. Another value would train differently than any setting now can, so it is refused."""
    retired = {k: v for k, v in getattr(cls, "RETIRED", {}).items() if k not in fields}
    for key, value in data.items():
        if key in retired and value != retired[key]:
            raise ConfigError(f"config key '{prefix}{key}' = {value!r} is retired; only its old default "
                              f"{retired[key]!r} still loads")
    return {k: v for k, v in data.items() if k not in retired}


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare words are strings: data=builtin


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (TOML values) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        *path, leaf = key.strip().split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[leaf] = _parse_value(text.strip())
    return data


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    data = renamed(cls, load_toml(path)) if path else {}  # before the overrides, which may use old names too
    return from_dict(cls, apply_overrides(data, list(overrides)))


def dump_toml(data: dict) -> str:
    """Write a nested dict of scalars, lists and tables as TOML (enough for resolved configs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if v is None:
            raise ConfigError("None cannot be written to TOML")
        # JSON string escapes are valid TOML basic-string escapes (newlines in prompts included)
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")

    def table(d: dict, header: str) -> list[str]:
        out = [f"\n[{header}]"] if header else []
        # TOML has no null: a None (an absent optional table, as a dense model's moe) is left out
        out += [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
        for k, v in d.items():
            if isinstance(v, dict):
                out += table(v, f"{header}.{k}" if header else k)
        return out

    return "\n".join(table(data, "")).lstrip() + "\n"
