"""`run_query`: a named query or typed SQL on the warehouse, in a sandbox, and its answer.

The connection is read-only, cannot read or write any other file (`COPY ... TO`,
`read_csv('/etc/passwd')`, `read_text`, `glob`, `ATTACH`, `EXPORT DATABASE`), install or load an
extension, and its configuration is locked, so no `SET`, `RESET` or `PRAGMA` turns any of that
back on (`_sandbox`). Only the directories the sources read stay readable (`build.source_dirs`), and
only when the sources are views that read them at query time. `format_rows` writes the answer as
a table, CSV or JSON.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import duckdb

from saev_core.warehouse.build import _NAME, load_sources, source_dirs
from saev_core.warehouse.queries import _bind, _check_runs, _params_used, parse_query

# connection options that must be set before the database starts (the rest: `_sandbox`)
_SANDBOX_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def _sandbox(con: duckdb.DuckDBPyConnection, root: Path, sql_dir: Path) -> None:
    """Lock a connection down for SQL a user typed: no file outside the warehouse can be read or
    written (`COPY ... TO`, `read_csv`, `read_text`, `glob`, `ATTACH`, `EXPORT`), no extension
    installed or loaded, and the configuration locked so that no `SET`, `RESET` or `PRAGMA` can
    switch any of it back on.

    A materialised warehouse reads only its own file. When the sources are views over Parquet
    (`materialize=False`) the directories their globs start in stay readable, and only those,
    resolved against the root (DuckDB checks every file it found), plus the DVC cache when DVC
    links outputs as symlinks (DuckDB checks a link's target). DuckDB checks a relative entry,
    and the views' relative globs, against the process's working directory, so the relative
    spelling is allowed only where it cannot name another folder: the working directory is the
    root, or holds no folder of that name (files are then found through `file_search_path`, in
    the root). Run where a folder of that name exists elsewhere, the views are refused rather
    than that folder opened. A source directory that is the root itself (a glob with no fixed
    folder) is never allowed."""
    allowed: list[str] = []
    views = con.execute(
        "select count(*) from duckdb_views() where not internal and view_name like 'src\\_%' "
        "escape '\\'"
    ).fetchall()[0][0]
    if views:
        dirs = _recorded_json(con, "source_dirs")
        if dirs is None:  # a warehouse built before source_dirs was recorded
            dirs = source_dirs(load_sources(sql_dir)) if (sql_dir / "sources.yaml").exists() else []
        for d in dirs:
            absolute = Path(d) if Path(d).is_absolute() else root / d
            if absolute.resolve() == root.resolve():
                continue  # a glob with no fixed folder would open the whole project
            spellings = [os.path.abspath(absolute), str(absolute.resolve())]
            here = Path.cwd() / d
            if not Path(d).is_absolute() and (
                not here.exists() or here.resolve() == absolute.resolve()
            ):
                spellings.insert(0, d)
            for path in spellings:
                entry = path.rstrip("/") + "/"
                if entry not in allowed:
                    allowed.append(entry)
        cache = root / ".dvc" / "cache"
        if cache.is_dir():
            allowed.append(str(cache.resolve()).rstrip("/") + "/")
    literal = ", ".join("'" + a.replace("'", "''") + "'" for a in allowed)
    con.execute(f"set allowed_directories = [{literal}]")
    con.execute("set enable_external_access = false")
    con.execute("set lock_configuration = true")


def _only_selects(con: duckdb.DuckDBPyConnection, sql: str, label: str) -> None:
    """Refuse every statement but a query (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW,
    SUMMARIZE): `COPY`, `EXPORT`, `ATTACH`, `SET`, `PRAGMA`, `INSTALL`, `LOAD`, `CALL` and
    `EXPLAIN` (whose ANALYZE runs its statement) never reach the engine. The sandbox's locked
    settings hold without this; it also keeps a `COPY ... TO` out of the directories that
    views mode leaves readable (DuckDB's allowed directories allow writing too)."""
    for st in con.extract_statements(sql):
        if st.type != duckdb.StatementType.SELECT:
            kind = str(st.type).rsplit(".", 1)[-1]
            raise ValueError(
                f"{label} refused: only queries (SELECT, WITH, FROM, DESCRIBE, SHOW) run in the "
                f"warehouse, not {kind}: {st.query.strip()[:80]!r}"
            )


def _recorded_json(con: duckdb.DuckDBPyConnection, key: str) -> Any:
    """A JSON value recorded in warehouse_info at build time (None if absent)."""
    with contextlib.suppress(duckdb.Error):
        rows = con.execute(
            "select value from warehouse_info where key = $key", {"key": key}
        ).fetchall()
        if rows:
            return json.loads(rows[0][0])
    return None


def _recorded(con: duckdb.DuckDBPyConnection, key: str, base: Path) -> Path | None:
    """A directory recorded in warehouse_info at build time (relative to `base`, or absolute in
    a database built before paths were kept relative), if it still exists."""
    with contextlib.suppress(duckdb.Error):
        rows = con.execute(
            "select value from warehouse_info where key = $key", {"key": key}
        ).fetchall()
        if rows and (base / rows[0][0]).is_dir():
            return (base / rows[0][0]).resolve()
    return None


def _resolve_dirs(
    con: duckdb.DuckDBPyConnection,
    root: str | Path | None,
    sql_dir: str | Path | None,
    db_path: str | Path,
) -> tuple[Path, Path]:
    """(root, sql_dir): explicit values first, then those recorded at build, then cwd and root/sql."""
    db_dir = Path(db_path).resolve().parent
    root_dir = (
        Path(root).resolve() if root is not None else _recorded(con, "root", db_dir) or Path.cwd()
    )
    if sql_dir is None:
        return root_dir, _recorded(con, "sql_dir", root_dir) or root_dir / "sql"
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
    """Run a named query (`<sql_dir>/queries/<name>.sql`) or an ad-hoc SQL text, read-only and
    sandboxed (`_sandbox`: no other file read or written, no extension, no `SET` to undo it).

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
    con = duckdb.connect(str(db_path), read_only=True, config=_SANDBOX_CONFIG)
    try:
        root_dir, sql_path = _resolve_dirs(con, root, sql_dir, db_path)
        con.execute("set file_search_path = $root", {"root": str(root_dir)})
        _sandbox(con, root_dir, sql_path)
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
            _check_runs(con, spec, bound)
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
            _only_selects(con, sql, label)
            cur = con.execute(sql, bound) if bound else con.execute(sql)
            rows = cur.fetchall()
            columns = [d[0] for d in cur.description] if cur.description else []
        except duckdb.Error as e:
            hint = ""
            if (
                isinstance(e, duckdb.PermissionException)
                and Path.cwd().resolve() != Path(root_dir).resolve()
            ):
                hint = (
                    f" (a warehouse whose sources are views reads their Parquet relative to the "
                    f"working directory: run from {root_dir})"
                )
            raise ValueError(f"{label} failed: {e}{hint}") from e
    finally:
        con.close()
    return format_rows(columns, rows, fmt)


def format_rows(columns: Sequence[str], rows: Sequence[tuple], fmt: str) -> str:
    """Rows as an aligned text table, CSV (header first) or JSON records."""
    if fmt == "json":
        records = [dict(zip(columns, r, strict=True)) for r in rows]
        try:
            # fast path: plain values; NaN/inf make it raise and take the careful one
            return json.dumps(records, allow_nan=False, default=_jsonable_default)
        except ValueError:
            return json.dumps([dict(zip(columns, map(_jsonable, r), strict=True)) for r in rows])
    import pandas as pd  # only for CSV and tables: a JSON answer starts faster without it

    df = pd.DataFrame([list(r) for r in rows], columns=list(columns), dtype=object)
    if fmt == "csv":
        return df.to_csv(index=False)
    if not rows:
        return "  ".join(columns) + "\n(0 rows)"
    with pd.option_context("display.max_colwidth", 80, "display.width", 1000):
        return df.to_string(index=False)


def _jsonable_default(value: Any) -> Any:
    """What json.dumps cannot write by itself (decimals, dates, bytes, ...)."""
    out = _jsonable(value)
    if out is value:
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")
    return out


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
