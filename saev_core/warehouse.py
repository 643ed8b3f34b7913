"""The DuckDB warehouse: build `warehouse/saev.duckdb` from the Parquet outputs, and query it.

Everything the warehouse holds is defined by files in `sql/`:

- `sql/sources.yaml`: each Parquet source (a glob relative to the project root and its columns)
  becomes a view `src_<name>`; a glob that matches no file becomes an empty relation with the
  same columns, so that every later view and query still binds.
- `sql/views/NN_name.sql`: dbt-style CTE chains over the sources, applied in file-name order as
  `create or replace view name as ...` (`runs`, `images`, `features`, ...).
- `sql/queries/name.sql`: named analysis queries. A comment block at the top documents the query
  and its parameters, one line each: `-- param NAME [TYPE]: description (default VALUE)`, TYPE
  one of varchar (the default), integer, double, boolean; no default means required, and
  `(default null)` means optional. The SQL refers to them as DuckDB named parameters `$NAME`,
  which are always bound, never formatted into the text.

Paths stay relative to the project root inside the database, so it keeps working when the
project moves. DuckDB resolves a relative path against `file_search_path` when set, else the
working directory: `build_warehouse` and `run_query` set it to the root, and the duckdb CLI works
as it is when started in the root (`duckdb warehouse/saev.duckdb`). Views read the Parquet files
at query time, so the database is small; rebuild it when a source gains its first file (an empty
source is frozen into its view) or when `sql/` changes.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple

import duckdb
import yaml

DEFAULT_DB = "warehouse/saev.duckdb"
PARAM_TYPES = ("varchar", "integer", "double", "boolean")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VIEW_FILE = re.compile(r"(\d+)_([a-z_][a-z0-9_]*)\.sql")
_PARAM_LINE = re.compile(
    r"--\s*param\s+(?P<name>[A-Za-z_]\w*)(?:\s+(?P<type>\w+))?\s*:\s*(?P<desc>.*?)\s*$"
)
_DEFAULT = re.compile(r"\(default:?\s*(?P<value>[^()]*)\)\s*$")
# $name outside quotes and comments; good enough to check a query's parameters against its header
_PARAM_USE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\$([A-Za-z_]\w*)")


@dataclass(frozen=True)
class WarehouseConfig:
    """params.yaml section `warehouse`."""

    db: str = "warehouse/saev.duckdb"
    """The DuckDB file (rebuilt whole, atomically)."""
    sql_dir: str = "sql"
    """Views (`views/`), named queries (`queries/`) and source schemas (`sources.yaml`)."""


@dataclass(frozen=True)
class Source:
    """One Parquet source from sql/sources.yaml."""

    name: str
    path: str  # glob relative to the project root
    columns: dict[str, str]  # column -> DuckDB type


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


def load_sources(sql_dir: str | Path) -> list[Source]:
    """The sources declared in `<sql_dir>/sources.yaml`."""
    path = Path(sql_dir) / "sources.yaml"
    if not path.exists():
        raise FileNotFoundError(f"warehouse sources file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    sources = []
    for name, spec in data.items():
        if not _NAME.fullmatch(str(name)) or not isinstance(spec, dict):
            raise ValueError(f"{path}: bad source entry {name!r}")
        if not spec.get("path") or not spec.get("columns"):
            raise ValueError(f"{path}: source {name!r} needs 'path' and 'columns'")
        columns = {str(c): str(t) for c, t in spec["columns"].items()}
        for c in columns:
            if not _NAME.fullmatch(c):
                raise ValueError(f"{path}: source {name!r} has a bad column name {c!r}")
        sources.append(Source(str(name), str(spec["path"]), columns))
    return sources


def _source_sql(src: Source, has_files: bool) -> str:
    if has_files:
        cols = ",\n".join(f"    cast({c} as {t}) as {c}" for c, t in src.columns.items())
        path = src.path.replace("'", "''")
        return (
            f"select\n{cols},\n    filename\n"
            f"from read_parquet('{path}', union_by_name = true, filename = true)"
        )
    cols = ",\n".join(f"    cast(null as {t}) as {c}" for c, t in src.columns.items())
    return f"select\n{cols},\n    cast(null as varchar) as filename\nlimit 0"


def _view_files(sql_dir: Path) -> list[tuple[str, Path]]:
    views_dir = sql_dir / "views"
    if not views_dir.is_dir():
        raise FileNotFoundError(f"warehouse views directory not found: {views_dir}")
    out, seen = [], {}
    for path in sorted(views_dir.glob("*.sql")):
        m = _VIEW_FILE.fullmatch(path.name)
        if not m:
            raise ValueError(f"{path}: view files are named NN_name.sql (lower-case name)")
        name = m.group(2)
        if name in seen:
            raise ValueError(f"view {name!r} is defined twice: {seen[name]} and {path}")
        seen[name] = path
        out.append((name, path))
    return out


def _read_sql(path: Path) -> str:
    return path.read_text().strip().rstrip(";").strip()


def build_warehouse(
    db_path: str | Path = DEFAULT_DB, root: str | Path = ".", sql_dir: str | Path = "sql"
) -> dict[str, Any]:
    """(Re)build the warehouse from scratch; returns a report of sources, views and row counts.

    `root` is the project root the source globs are relative to; a relative `sql_dir` is taken
    relative to `root`. The database is built in `<db_path>.tmp` and renamed over `db_path` only
    when complete, so a failed build leaves the previous database untouched; building twice from
    the same files gives the same views with the same rows.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"warehouse root is not a directory: {root}")
    sql_dir = root / sql_dir if not Path(sql_dir).is_absolute() else Path(sql_dir)
    sources = load_sources(sql_dir)
    views = _view_files(sql_dir)
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(db_path.name + ".tmp")
    for stale in (tmp, Path(f"{tmp}.wal")):
        stale.unlink(missing_ok=True)

    report: dict[str, Any] = {"db_path": str(db_path), "root": str(root), "sources": {}}
    try:
        con = duckdb.connect(str(tmp))
        try:
            con.execute("set file_search_path = $root", {"root": str(root)})
            empty = []
            for src in sources:
                n_files = len(glob.glob(str(root / src.path), recursive=True))
                if not n_files:
                    empty.append(src.name)
                _create_view(con, f"src_{src.name}", _source_sql(src, n_files > 0), "sources.yaml")
                report["sources"][src.name] = {"path": src.path, "files": n_files}
            for name, path in views:
                _create_view(con, name, _read_sql(path), str(path))
            con.execute(
                "create table warehouse_info as "
                "select * from (values ('root', $root), ('sql_dir', $sql_dir), "
                "('empty_sources', $empty)) as t(key, value)",
                {"root": str(root), "sql_dir": str(sql_dir), "empty": json.dumps(empty)},
            )
            for src in sources:
                report["sources"][src.name]["rows"] = _count(con, f"src_{src.name}")
            report["views"] = {name: _count(con, name) for name, _ in views}
            report["empty_sources"] = empty
            if any(name == "runs" for name, _ in views):
                dup = con.execute(
                    "select run from runs group by run having count(*) > 1 order by run"
                ).fetchall()
                report["duplicate_runs"] = [r[0] for r in dup]
        finally:
            con.close()
        # a WAL left by an older connection to db_path would be replayed onto the new file
        Path(f"{db_path}.wal").unlink(missing_ok=True)
        os.replace(tmp, db_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
        raise
    return report


def _create_view(con: duckdb.DuckDBPyConnection, name: str, sql: str, where: str) -> None:
    try:
        con.execute(f"create or replace view {name} as\n{sql}")
    except duckdb.Error as e:
        raise ValueError(f"{where}: cannot create view {name}: {e}") from e


def _count(con: duckdb.DuckDBPyConnection, relation: str) -> int:
    return int(con.execute(f"select count(*) from {relation}").fetchall()[0][0])


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


def _recorded(con: duckdb.DuckDBPyConnection, key: str) -> Path | None:
    """A directory recorded in warehouse_info at build time, if it still exists."""
    with contextlib.suppress(duckdb.Error):
        rows = con.execute(
            "select value from warehouse_info where key = $key", {"key": key}
        ).fetchall()
        if rows and Path(rows[0][0]).is_dir():
            return Path(rows[0][0])
    return None


def _resolve_dirs(
    con: duckdb.DuckDBPyConnection, root: str | Path | None, sql_dir: str | Path | None
) -> tuple[Path, Path]:
    """(root, sql_dir): explicit values first, then those recorded at build, then cwd and root/sql."""
    root_dir = Path(root).resolve() if root is not None else _recorded(con, "root") or Path.cwd()
    if sql_dir is None:
        return root_dir, _recorded(con, "sql_dir") or root_dir / "sql"
    sql_dir = Path(sql_dir)
    return root_dir, sql_dir if sql_dir.is_absolute() else root_dir / sql_dir


def run_query(
    db_path: str | Path,
    name_or_sql: str,
    params: dict[str, Any] | None = None,
    fmt: Literal["table", "csv", "json"] = "table",
    root: str | Path | None = None,
    sql_dir: str | Path | None = None,
) -> str:
    """Run a named query (`<sql_dir>/queries/<name>.sql`) or an ad-hoc SQL text, read-only.

    Parameters are bound as DuckDB named parameters, converted from strings with the type the
    query documents (ad-hoc SQL: passed as strings, DuckDB casts them). `root` and `sql_dir`
    default to those recorded at build time (if they still exist), else the working directory
    and `<root>/sql`; a relative `sql_dir` is taken relative to the root. Returns the result as
    an aligned table, CSV or JSON records.
    """
    if fmt not in ("table", "csv", "json"):
        raise ValueError(f"fmt must be table, csv or json, got {fmt!r}")
    params = dict(params or {})
    db_path = Path(db_path)
    if not db_path.exists():
        raise FileNotFoundError(
            f"warehouse not found: {db_path} (build it with `saev warehouse` first)"
        )
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        root_dir, sql_path = _resolve_dirs(con, root, sql_dir)
        con.execute("set file_search_path = $root", {"root": str(root_dir)})
        text = name_or_sql.strip()
        if _NAME.fullmatch(text):
            qdir = sql_path / "queries"
            path = qdir / f"{text}.sql"
            if not path.exists():
                names = sorted(p.stem for p in qdir.glob("*.sql"))
                close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                known = ", ".join(names) or "none found"
                raise ValueError(f"unknown query {text!r} in {qdir}{hint} (known: {known})")
            spec = parse_query(path)
            sql, bound, label = path.read_text(), _bind(spec, params), text
        else:
            used = set(_params_used(text))
            unknown, missing = sorted(set(params) - used), sorted(used - set(params))
            if unknown or missing:
                raise ValueError(
                    f"ad-hoc query: unknown parameter(s) {unknown}, missing {missing}; it uses "
                    f"{sorted(used) or 'no parameters'}"
                )
            sql, bound, label = text, params, "ad-hoc query"
        try:
            cur = con.execute(sql, bound) if bound else con.execute(sql)
            rows = cur.fetchall()
            columns = [d[0] for d in cur.description] if cur.description else []
        except duckdb.Error as e:
            raise ValueError(f"{label} failed: {e}") from e
    finally:
        con.close()
    return format_rows(columns, rows, fmt)


def format_rows(columns: Sequence[str], rows: Sequence[tuple], fmt: str) -> str:
    """Rows as an aligned text table, CSV (header first) or JSON records."""
    import pandas as pd

    if fmt == "json":
        return json.dumps([dict(zip(columns, map(_jsonable, r), strict=True)) for r in rows])
    df = pd.DataFrame([list(r) for r in rows], columns=list(columns), dtype=object)
    if fmt == "csv":
        return df.to_csv(index=False)
    if not rows:
        return "  ".join(columns) + "\n(0 rows)"
    with pd.option_context("display.max_colwidth", 80, "display.width", 1000):
        return df.to_string(index=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not _NAME.fullmatch(key.strip()):
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, got {text!r}")
    return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    """`saev sql`: run a named query or ad-hoc SQL against the warehouse, read-only."""
    parser = argparse.ArgumentParser(
        prog="saev sql",
        description="Query the warehouse read-only: a named query from sql/queries/ or SQL text. "
        "Parameters are bound, never formatted into the SQL.",
    )
    parser.add_argument("name_or_sql", nargs="?", metavar="NAME_OR_SQL")
    parser.add_argument(
        "--param", "-p", action="append", default=[], type=_parse_param, metavar="NAME=VALUE",
        help="query parameter (repeatable)",
    )  # fmt: skip
    parser.add_argument("--format", "-f", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"database (default {DEFAULT_DB})")
    parser.add_argument("--root", default=None, help="project root (default: recorded at build)")
    parser.add_argument(
        "--sql-dir", default=None, help="SQL directory, relative to the root (default: recorded)"
    )
    parser.add_argument("--list", action="store_true", help="list the named queries and exit")
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(_describe_queries(_list_dir(args)))
            return 0
        if not args.name_or_sql:
            parser.error("NAME_OR_SQL is required (or --list)")
        params = dict(args.param)
        print(run_query(args.db, args.name_or_sql, params, args.format, args.root, args.sql_dir))
    except (ValueError, FileNotFoundError) as e:
        print(f"saev sql: error: {e}", file=sys.stderr)
        return 2
    return 0


def _list_dir(args: argparse.Namespace) -> Path:
    if Path(args.db).exists():
        con = duckdb.connect(str(args.db), read_only=True)
        try:
            return _resolve_dirs(con, args.root, args.sql_dir)[1]
        finally:
            con.close()
    root = Path(args.root or ".").resolve()
    return root / (args.sql_dir or "sql")


def _describe_queries(sql_dir: Path) -> str:
    lines = []
    for q in list_queries(sql_dir):
        lines.append(f"{q.name}: {q.description}")
        for p in q.params:
            opt = "" if p.required else f" (default {'null' if p.default is None else p.default})"
            lines.append(f"    --param {p.name}=<{p.type}>  {p.description}{opt}")
    return "\n".join(lines)


def main_build(argv: list[str] | None = None) -> int:
    """`saev warehouse`: rebuild warehouse/saev.duckdb from the Parquet outputs and sql/."""
    parser = argparse.ArgumentParser(
        prog="saev warehouse",
        description="Rebuild the DuckDB warehouse (views over the stats, activations and "
        "interventions Parquet files) from sql/. Idempotent; atomic.",
    )
    parser.add_argument("--db", default=DEFAULT_DB, help=f"database (default {DEFAULT_DB})")
    parser.add_argument("--root", default=".", help="project root the sources are relative to")
    parser.add_argument("--sql-dir", default="sql", help="SQL directory, relative to the root")
    parser.add_argument("--json", action="store_true", help="print the build report as JSON")
    args = parser.parse_args(argv)
    try:
        report = build_warehouse(args.db, args.root, args.sql_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"saev warehouse: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"built {report['db_path']}")
    for name, rows in report["views"].items():
        print(f"  {name:<20} {rows:>10} rows")
    for name in report["empty_sources"]:
        src = report["sources"][name]
        print(f"  note: no file matches {src['path']}: src_{name} is empty")
    if report.get("duplicate_runs"):
        print(
            f"  warning: run names used by more than one stats directory: {report['duplicate_runs']}"
        )
    return 0
