"""Read one section of `params.yaml` into a frozen dataclass, with clear errors.

Every stage owns a frozen dataclass (next to the code that uses it) whose fields carry a
one-line docstring and whose `__post_init__` raises `ValueError` on values that cannot work.
`load_section("params.yaml", "train", TrainConfig)` builds it; unknown keys are refused so a
typo in `params.yaml` never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file as a dict (empty if the file is empty)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a dict, refusing unknown keys and coercing lists to tuples."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list) and "tuple" in str(hints.get(name, "")):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required field
        raise ValueError(f"{where or cls.__name__}: {e}") from e


def load_section(path: str | Path, section: str, cls: type[T], **overrides: Any) -> T:
    """Section `section` of the params file as a `cls`; `overrides` win over the file."""
    params = read_params(path)
    values = dict(params.get(section) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, values, where=f"{path}:{section}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a plain JSON-able dict (tuples become lists)."""
    return json_safe(dataclasses.asdict(cfg))


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
