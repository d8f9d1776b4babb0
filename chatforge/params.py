"""Typed views of params.yaml sections (one dataclass per stage, as trl does with its configs).

Unknown keys and wrong types stop the stage with one line naming the key and what it expects; a key that was
renamed (a dataclass's `RENAMED = {"old": "new"}`) with one line naming the new one.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chatforge.errors import ChatforgeError

T = TypeVar("T")
PARAMS_FILE = "params.yaml"


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: `5e-05` (as DVC and Hydra write a float) is a number, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """YAML text read as params.yaml is (YAML 1.2's floats)."""
    return yaml.load(text, Loader=_Loader)


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise ChatforgeError(f"{path}: not found; run from the project root (where dvc.yaml is)")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ChatforgeError(f"{where}: invalid YAML ({getattr(error, 'problem', error)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ChatforgeError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None  # before the dataclass option, which would read null as "all defaults"
        for option in args:
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return _check_type(value, option, key)  # a mapping means that section: its own error names the key
        for option in args:
            try:
                return _check_type(value, option, key)
            except ChatforgeError:
                continue
        raise ChatforgeError(f"{key}={value!r}: expected {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ChatforgeError(f"{key}={value!r}: expected null")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ChatforgeError(f"{key}={value!r}: expected one of {list(args)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ChatforgeError(f"{key}={value!r}: expected a list")
        return [_check_type(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ChatforgeError(f"{key}={value!r}: expected a mapping")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, key.removeprefix("params.yaml: "))  # nested: `section.key`
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ChatforgeError(f"{key}={value!r}: expected an integer")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ChatforgeError(f"{key}={value!r}: expected {annotation.__name__}")
    return value


def from_dict(cls: type[T], data: Any, section: str) -> T:
    """Build dataclass `cls` from a params mapping; missing keys take the dataclass defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ChatforgeError(f"params.yaml: {section} must be a mapping, got {type(data).__name__}")
    renamed = getattr(cls, "RENAMED", {})  # old key -> new key, on the dataclass
    for old in data:
        if old in renamed:
            raise ChatforgeError(f"params.yaml: {section}.{old} was renamed to {section}.{renamed[old]}; rename it")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ChatforgeError(
            f"params.yaml: unknown key {section}.{unknown[0]}; known keys are {', '.join(sorted(known))}"
        )
    values = {name: _check_type(value, hints[name], f"params.yaml: {section}.{name}") for name, value in data.items()}
    try:
        config = cls(**values)
    except TypeError as error:
        raise ChatforgeError(f"params.yaml: {section}: {error}") from None
    check = getattr(config, "validate", None)
    if check:
        check(section)
    return config


def section(cls: type[T], name: str, params: dict | None = None) -> T:
    """The typed config of one params.yaml section."""
    params = load_params() if params is None else params
    return from_dict(cls, params.get(name), name)


def require(condition: bool, key: str, message: str) -> None:
    """For dataclass `validate` methods: one clear line when a value is out of range."""
    if not condition:
        raise ChatforgeError(f"params.yaml: {key} {message}")
