"""Read one section of `params.yaml` into a frozen dataclass, with clear errors.

Every stage owns a frozen dataclass (next to the code that uses it) whose fields carry a
one-line docstring and whose `__post_init__` raises `ValueError` on values that cannot work.
`load_section("params.yaml", "train", TrainConfig)` builds it; unknown keys are refused so a
typo in `params.yaml` never silently falls back to a default. Every stage's `-S KEY=VALUE`
(flows/common.py `parse_args`) reaches its section through `load_section`'s overrides, the
same way for every stage (`apply_overrides`: dotted keys such as `sae.k` reach into mappings).
"""

from __future__ import annotations

import copy
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


def load_section(
    path: str | Path,
    section: str,
    cls: type[T],
    sets: dict[str, Any] | None = None,
    **overrides: Any,
) -> T:
    """Section `section` of the params file as a `cls`; `sets` and `overrides` win over the file.

    `sets` are a stage's `-S KEY=VALUE` settings (`args.overrides` of flows/common.py
    `parse_args`), applied as given by `apply_overrides`: `k=32`, or dotted into a mapping,
    `sae.k=32`; a null sets null. `overrides` are keyword options of the same form where None
    means "not given" and leaves the file's value (command-line options left unset).
    """
    params = read_params(path)
    values = dict(params.get(section) or {})
    given = {k: v for k, v in overrides.items() if v is not None}
    where = f"{path}:{section}"
    values = apply_overrides(values, {**given, **(sets or {})}, cls, section, where)
    return from_dict(cls, values, where=where)


def apply_overrides(
    values: dict[str, Any], overrides: dict[str, Any], cls: type, section: str, where: str = ""
) -> dict[str, Any]:
    """`values` (one params section) with `overrides` applied; the input is left as it was.

    A key names a field of `cls` (`out_dir`), or is dotted to reach into a mapping-valued field
    and keep its other keys (`sae.k` sets `k` of `sae`; `sweep.k8.k` one member's `k`); it may
    start with the section's name (`train.sae.k`, as `dvc exp run -S` writes it). A key that is
    not a field of `cls` is refused with the valid ones; keys inside a mapping are checked by
    `cls` itself (e.g. `TrainStage` checks `sae` against `TrainConfig`).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = copy.deepcopy(values)
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) > 1 and parts[0] == section and parts[0] not in fields:
            parts = parts[1:]
        if not all(p.strip() for p in parts) or parts[0] not in fields:
            raise ValueError(
                f"{where or section}: unknown key {key!r} (in override {key}={value!r}); "
                f"valid keys of `{section}`: {sorted(fields)}"
            )
        target = out
        for i, part in enumerate(parts[:-1]):
            if part not in target:
                target[part] = _default_of(fields[part]) if i == 0 else {}
            if target[part] is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise ValueError(
                    f"{where or section}: cannot set {key!r}: {'.'.join(parts[: i + 1])} is "
                    f"{target[part]!r}, not a mapping"
                )
            target = target[part]
        target[parts[-1]] = value
    return out


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default, as a fresh copy (None when it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else copy.deepcopy(f.default)


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
