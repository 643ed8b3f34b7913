"""The named queries of `sql/queries/`: their documented parameters, and how a value is bound.

A comment block at the top of a query file documents it and its parameters, one line each:
`-- param NAME [TYPE]: description (default VALUE)`. `parse_query` reads that header,
`list_queries` every query of a folder, and `_bind` converts the values given (strings from the
command line, or Python values) to the declared types, fills in the defaults and refuses a
missing or unknown parameter; the SQL then takes them as DuckDB named parameters `$NAME`.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import duckdb

PARAM_TYPES = ("varchar", "integer", "double", "boolean")
_PARAM_LINE = re.compile(
    r"--\s*param\s+(?P<name>[A-Za-z_]\w*)(?:\s+(?P<type>\w+))?\s*:\s*(?P<desc>.*?)\s*$"
)
_DEFAULT = re.compile(r"\(default:?\s*(?P<value>[^()]*)\)\s*$")
# $name outside quotes and comments; good enough to check a query's parameters against its header
_PARAM_USE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\$([A-Za-z_]\w*)")


@dataclass(frozen=True)
class QueryParam:
    """One documented parameter of a named query."""

    name: str
    type: str
    description: str
    default: Any = None
    required: bool = True


class QuerySpec(NamedTuple):
    """A named query: what `saev sql --list` shows, and the SQL it runs."""

    name: str
    description: str
    params: list[QueryParam]


def parse_query(path: str | Path) -> QuerySpec:
    """Read a named query file: its description, documented parameters and SQL."""
    path = Path(path)
    text = path.read_text()
    desc_lines, params = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("--"):
            break
        m = _PARAM_LINE.match(stripped)
        if m is None:
            desc_lines.append(stripped[2:].strip())
            continue
        typ = (m.group("type") or "varchar").lower()
        if typ not in PARAM_TYPES:
            raise ValueError(f"{path}: param {m.group('name')} has type {typ!r}; use {PARAM_TYPES}")
        desc, default, required = m.group("desc"), None, True
        d = _DEFAULT.search(desc)
        if d:
            required = False
            raw = d.group("value").strip()
            default = None if raw.lower() == "null" else _convert(m.group("name"), typ, raw)
            desc = desc[: d.start()].rstrip()
        params.append(QueryParam(m.group("name"), typ, desc, default, required))
    declared = [p.name for p in params]
    if len(set(declared)) != len(declared):
        raise ValueError(f"{path}: a parameter is documented twice: {declared}")
    used = set(_params_used(text))
    if used != set(declared):
        raise ValueError(
            f"{path}: parameters used in the SQL {sorted(used)} differ from those documented "
            f"in its header {sorted(declared)}"
        )
    return QuerySpec(path.stem, " ".join(x for x in desc_lines if x), params)


def _params_used(sql: str) -> list[str]:
    return [m.group(1) for m in _PARAM_USE.finditer(sql) if m.group(1)]


def list_queries(sql_dir: str | Path = "sql") -> list[QuerySpec]:
    """Every named query in `<sql_dir>/queries`, sorted by name."""
    qdir = Path(sql_dir) / "queries"
    if not qdir.is_dir():
        raise FileNotFoundError(f"queries directory not found: {qdir}")
    return [parse_query(p) for p in sorted(qdir.glob("*.sql"))]


def _convert(name: str, typ: str, value: Any) -> Any:
    if value is None or typ == "varchar":
        return value if value is None else str(value)
    try:
        if typ == "integer":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ == "double":
            return float(value)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "y", "t"):
            return True
        if text in ("false", "0", "no", "n", "f"):
            return False
        raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name}: expected {typ}, got {value!r}") from None


def _bind(spec: QuerySpec, params: dict[str, Any]) -> dict[str, Any]:
    known = {p.name: p for p in spec.params}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"query {spec.name}: unknown parameter(s) {unknown}; it takes "
            f"{sorted(known) or 'no parameters'}"
        )
    missing = sorted(n for n, p in known.items() if p.required and n not in params)
    if missing:
        raise ValueError(
            f"query {spec.name}: missing required parameter(s) {missing} "
            f"(pass --param {missing[0]}=VALUE)"
        )
    return {
        n: _convert(n, p.type, params[n]) if n in params else p.default for n, p in known.items()
    }


def _is_run_param(name: str) -> bool:
    return name == "run" or name.startswith("run_") or name.endswith("_run")


def _check_runs(con: duckdb.DuckDBPyConnection, spec: QuerySpec, bound: dict[str, Any]) -> None:
    """Refuse a run name the warehouse does not hold (a parameter `run`, `run_*` or `*_run`),
    instead of answering with no rows."""
    wanted = {n: v for n, v in bound.items() if _is_run_param(n) and v is not None}
    if not wanted:
        return
    # stats runs, and the run names intervention results carry (their queries take those)
    found: set[str] = set()
    checked = False
    for relation in ("runs", "interventions"):
        with contextlib.suppress(duckdb.Error):
            rows = con.execute(f"select distinct run from {relation}").fetchall()
            found.update(r[0] for r in rows)
            checked = True
    if not checked:
        return  # a warehouse without these relations: the query itself says what is missing
    known = sorted(x for x in found if x is not None)
    for name, value in wanted.items():
        if value not in known:
            close = difflib.get_close_matches(str(value), known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"query {spec.name}: unknown run {value!r} (parameter {name}){hint} "
                f"(the warehouse has: {', '.join(known) or 'no runs'})"
            )
