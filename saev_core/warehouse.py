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
as it is when started in the root (`duckdb warehouse/saev.duckdb`). `warehouse_info` records the
root relative to the database's directory and `sql/` relative to the root, so the file holds no
absolute path.

`run_query` (and so `saev sql`) runs what a user typed in a sandbox (`_sandbox`): the connection
is read-only, cannot read or write any other file (`COPY ... TO`, `read_csv('/etc/passwd')`,
`read_text`, `glob`, `ATTACH`, `EXPORT DATABASE`), install or load an extension, and its
configuration is locked, so no `SET`, `RESET` or `PRAGMA` turns any of that back on. Only the
directories the sources read stay readable, and only when the sources are views
(`materialize=False`) that read them at query time. Two stats directories that give the same
run name fail the build (every join on `run` would multiply their rows).

By default (`materialize=True`) every source and every file in `views/` becomes a table holding
its rows, sorted by (run, feature, ...) where it has those columns, so that a query reads DuckDB's
own storage rather than re-scanning Parquet (at 24,576 features x 100 labels that is the
difference between milliseconds and seconds); the database then reflects the files as of the
build, so rebuild after the stats change (the `warehouse` stage does). `materialize=False`
creates views that read the Parquet at query time instead (a small file that follows the
Parquet, slower queries; an empty source is still frozen until the next build).

A source glob may also name objects in an S3-compatible store (`s3://bucket/stats/*/run.parquet`,
`saev_core.object_store`): the build registers an s3fs filesystem on its DuckDB connection (the
httpfs extension cannot be downloaded here) and reads through it. Such sources are always
materialised: a query connection is sandboxed and never reaches the network.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import glob
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple

import duckdb
import yaml

from saev_core import object_store

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
    n_matches: int = 3
    """`feature_matches`: partners kept per feature and other run, by each of decoder cosine and
    exemplar overlap (0: no matching)."""
    materialize: bool = True
    """Store every relation as a table (fast queries) instead of views over the Parquet."""

    def __post_init__(self) -> None:
        if self.n_matches < 0:
            raise ValueError(f"warehouse.n_matches must be >= 0, got {self.n_matches}")


@dataclass(frozen=True)
class Source:
    """One Parquet source from sql/sources.yaml."""

    name: str
    path: str  # glob relative to the project root, or an s3:// glob
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


def _source_sql(src: Source, has_files: bool, present: set[str] | None = None) -> str:
    """The `src_<name>` view: declared columns cast to their types; a declared column that no
    file has yet (written by an older version of its stage) is a typed null."""
    if has_files:
        cols = ",\n".join(
            f"    cast({c} as {t}) as {c}"
            if present is None or c in present
            else f"    cast(null as {t}) as {c}"
            for c, t in src.columns.items()
        )
        return (
            f"select\n{cols},\n    {_RELATIVE_FILENAME} as filename\n"
            f"from read_parquet({_parquet_glob(src)}, union_by_name = true, filename = true)"
        )
    cols = ",\n".join(f"    cast(null as {t}) as {c}" for c, t in src.columns.items())
    return f"select\n{cols},\n    cast(null as varchar) as filename\nlimit 0"


# DuckDB names a file found through `file_search_path` by its absolute path: keep it relative to
# the root (the search path), as the glob was written
_RELATIVE_FILENAME = (
    "case when starts_with(filename, current_setting('file_search_path') || '/') "
    "then filename[length(current_setting('file_search_path')) + 2:] else filename end"
)


def _relative_to(path: Path, base: Path) -> str:
    """`path` relative to `base` when inside it (what the database records), else absolute."""
    # not resolved: `sql` may be a link out of the root, and is still spelled `sql` inside it
    path, base = Path(os.path.abspath(path)), Path(os.path.abspath(base))
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _root_from(db_dir: Path, root: Path) -> str:
    """The root as seen from the database's directory: `..` segments when the database lies
    inside the root (it then moves with the project), else absolute."""
    db_dir, root = db_dir.resolve(), root.resolve()
    return os.path.relpath(root, db_dir) if db_dir.is_relative_to(root) else str(root)


def _parquet_glob(src: Source) -> str:
    return "'" + src.path.replace("'", "''") + "'"


def _columns_present(con: duckdb.DuckDBPyConnection, src: Source) -> set[str]:
    """The columns the source's files hold (their union)."""
    rows = con.execute(
        f"describe select * from read_parquet({_parquet_glob(src)}, union_by_name = true)"
    ).fetchall()
    return {r[0] for r in rows}


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
    db_path: str | Path = DEFAULT_DB,
    root: str | Path = ".",
    sql_dir: str | Path = "sql",
    n_matches: int = 3,
    materialize: bool = True,
    sources: Sequence[Source] | None = None,
    views: Sequence[tuple[str, Path]] | None = None,
) -> dict[str, Any]:
    """(Re)build the warehouse from scratch; returns a report of sources, views and row counts.

    `sources` and `views` (name, file) replace those of `sql_dir` (`build_compare_warehouse`
    passes the comparison's own); named queries stay in `<sql_dir>/queries`.

    `root` is the project root the source globs are relative to; a relative `sql_dir` is taken
    relative to `root`. The database is built in `<db_path>.tmp` and renamed over `db_path` only
    when complete, so a failed build leaves the previous database untouched; building twice from
    the same files gives the same views with the same rows.

    `feature_matches` is the one table computed in Python (`saev_core.matches`) and stored in
    the database: `n_matches` partners per feature for every ordered pair of runs.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"warehouse root is not a directory: {root}")
    sql_dir = root / sql_dir if not Path(sql_dir).is_absolute() else Path(sql_dir)
    sources = load_sources(sql_dir) if sources is None else list(sources)
    views = _view_files(sql_dir) if views is None else list(views)
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(db_path.name + ".tmp")
    for stale in (tmp, Path(f"{tmp}.wal")):
        stale.unlink(missing_ok=True)

    remote = [src.name for src in sources if object_store.is_url(src.path)]
    if remote and not materialize:
        raise ValueError(
            f"sources {remote} read an object store: build with materialize=True (a query's "
            "sandboxed connection cannot reach the bucket)"
        )
    report: dict[str, Any] = {"db_path": str(db_path), "root": str(root), "sources": {}}
    try:
        con = duckdb.connect(str(tmp))
        try:
            con.execute("set file_search_path = $root", {"root": str(root)})
            fs = None
            if remote:
                fs = object_store.filesystem()
                con.register_filesystem(fs)
            empty, seconds = [], {}
            for src in sources:
                t = time.perf_counter()
                if object_store.is_url(src.path):
                    n_files = len(object_store.glob(fs, src.path))
                else:
                    n_files = len(glob.glob(str(root / src.path), recursive=True))
                if not n_files:
                    empty.append(src.name)
                read = src
                if materialize and not object_store.is_url(src.path):
                    # read from the root itself: DuckDB looks in the working directory before
                    # file_search_path, so a relative glob could read another project's files
                    read = dataclasses.replace(src, path=f"{root}/{src.path}")
                present = _columns_present(con, read) if n_files else None
                sql = _source_sql(read, n_files > 0, present)
                _create_relation(con, f"src_{src.name}", sql, "sources.yaml", materialize)
                seconds[f"src_{src.name}"] = round(time.perf_counter() - t, 3)
                report["sources"][src.name] = {"path": src.path, "files": n_files}
            for name, path in views:
                t = time.perf_counter()
                _create_relation(con, name, _read_sql(path), str(path), materialize)
                seconds[name] = round(time.perf_counter() - t, 3)
            if any(src.name == "runs" for src in sources):
                _check_unique_runs(con)
            t = time.perf_counter()
            _create_feature_matches(con, root, n_matches)
            seconds["feature_matches"] = round(time.perf_counter() - t, 3)
            report["seconds"] = seconds
            con.execute(
                "create table warehouse_info as "
                "select * from (values ('root', $root), ('sql_dir', $sql_dir), "
                "('empty_sources', $empty), ('source_dirs', $dirs)) as t(key, value)",
                {  # relative to the database's directory and to the root, when inside them
                    "root": _root_from(db_path.parent, root),
                    "sql_dir": _relative_to(sql_dir, root),
                    "empty": json.dumps(empty),
                    "dirs": json.dumps(source_dirs(sources)),
                },
            )
            for src in sources:
                report["sources"][src.name]["rows"] = _count(con, f"src_{src.name}")
            report["views"] = {name: _count(con, name) for name, _ in views}
            report["views"]["feature_matches"] = _count(con, "feature_matches")
            report["empty_sources"] = empty
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


def _check_unique_runs(con: duckdb.DuckDBPyConnection) -> None:
    """Refuse two stats directories that give the same run name: every join on `run` would
    multiply their rows."""
    dup = con.execute(
        "select run, list(distinct filename order by filename) from src_runs "
        "group by run having count(*) > 1 order by run"
    ).fetchall()
    if dup:
        detail = "; ".join(f"{run!r} in {', '.join(files)}" for run, files in dup)
        raise ValueError(
            f"run names used by more than one stats directory: {detail} "
            "(give each stats run its own name, or remove the stale directory)"
        )


def _create_feature_matches(con: duckdb.DuckDBPyConnection, root: Path, n_matches: int) -> None:
    """The `feature_matches` table: every ordered pair of runs, matched in Python."""
    import pyarrow as pa

    from saev_core.matches import MATCH_SCHEMA, load_decoder, match_runs

    runs = con.execute("select run, sae_dir, d_sae from src_runs order by run").fetchall()
    tables = [MATCH_SCHEMA.empty_table()]
    if n_matches > 0 and len(runs) > 1:
        top = con.sql(
            "select run, feature, image_id from src_top_examples order by run, feature, rank"
        ).to_arrow_table()
        run_col = top.column("run").to_numpy(zero_copy_only=False)
        feats = top.column("feature").to_numpy()
        ids = top.column("image_id").to_numpy()
        exemplars = {r: (feats[run_col == r], ids[run_col == r]) for r, _, _ in runs}
        decoders = {}
        for run, sae_dir, _ in runs:
            path = (
                Path(sae_dir) if sae_dir and Path(sae_dir).is_absolute() else root / (sae_dir or "")
            )
            decoders[run] = load_decoder(path) if sae_dir else None
        sizes = {
            run: int(d_sae) if d_sae is not None else int(exemplars[run][0].max(initial=-1)) + 1
            for run, _, d_sae in runs
        }
        for a, _, _ in runs:
            for b, _, _ in runs:
                if a != b:
                    tables.append(
                        match_runs(
                            a, b, decoders[a], decoders[b], exemplars[a], exemplars[b],
                            sizes[a], sizes[b], n_matches,
                        )
                    )  # fmt: skip
    matches = pa.concat_tables(tables)
    con.register("feature_matches_arrow", matches)
    try:
        con.execute(
            "create table feature_matches as select * from feature_matches_arrow "
            "order by run_a, run_b, feature_a, feature_b"
        )
    finally:
        con.unregister("feature_matches_arrow")


# leading columns a materialised table is sorted by, when it has them: look-ups of one run's
# label or feature then touch few row groups (DuckDB keeps min/max per row group)
SORT_KEYS = ("run", "run_a", "run_b", "label", "feature", "feature_a", "rank")


def _create_relation(
    con: duckdb.DuckDBPyConnection, name: str, sql: str, where: str, materialize: bool
) -> None:
    """`name` as a view over `sql`, or (materialize) as a table of its rows in key order."""
    try:
        con.execute(f"create or replace view {name} as\n{sql}")
        if not materialize:
            return
        columns = [r[0] for r in con.execute(f"describe {name}").fetchall()]
        keys = [k for k in SORT_KEYS if k in columns]
        order = f" order by {', '.join(keys)}" if keys else ""
        con.execute(f"create table {name}__rows as select * from {name}{order}")
        con.execute(f"drop view {name}")
        con.execute(f"alter table {name}__rows rename to {name}")
    except duckdb.Error as e:
        kind = "table" if materialize else "view"
        raise ValueError(f"{where}: cannot create {kind} {name}: {e}") from e


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


def source_dirs(sources: Sequence[Source]) -> list[str]:
    """The directories the sources' globs read (each glob's part before its first wildcard), as
    written in sources.yaml: what a sandboxed query may still read when the sources are views."""
    out: list[str] = []
    for src in sources:
        url = object_store.is_url(src.path)  # s3://bucket/dir/*.parquet: split on "/" only
        scheme, rest = src.path.split("://", 1) if url else ("", src.path)
        parts = rest.split("/") if url else Path(rest).parts
        fixed = []
        for part in parts[:-1]:
            if any(c in part for c in "*?[{"):
                break
            fixed.append(part)
        if url:
            d = f"{scheme}://" + "/".join(fixed)
        else:
            d = str(Path(*fixed)) if fixed else "."
        if d not in out:
            out.append(d)
    return out


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
    except BrokenPipeError:  # `saev sql ... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    return 0


def _list_dir(args: argparse.Namespace) -> Path:
    if Path(args.db).exists():
        con = duckdb.connect(str(args.db), read_only=True)
        try:
            return _resolve_dirs(con, args.root, args.sql_dir, args.db)[1]
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
    return 0


# ---------------------------------------------------------------------------------------------
# The backbone comparison (issue 15): warehouse/compare.duckdb


COMPARE_DB = "warehouse/compare.duckdb"
# where the demo's sources read -> where each compared backbone's outputs lie under compare_dir
_COMPARE_MOVES = {
    "artifacts/stats/*/": "{dir}/*/stats/",
    "artifacts/interventions/*/": "{dir}/*/interventions/",
}


def compare_sources(
    sql_dir: str | Path, compare_dir: str = "artifacts/compare", first: str | None = None
) -> list[Source]:
    """The demo's sources read from every backbone's directory under `compare_dir` (stats run
    = backbone name), the images from backbone `first` only (every backbone sees the same world,
    so one copy), plus the comparison's own (`<sql_dir>/compare/sources.yaml`: the baselines and
    stability Parquet)."""
    d = compare_dir.rstrip("/")
    out = []
    for src in load_sources(sql_dir):
        path = src.path
        for old, new in _COMPARE_MOVES.items():
            if path.startswith(old):
                path = new.format(dir=d) + path[len(old) :]
        if src.name == "images":
            path = f"{d}/{first or '*'}/activations/images.parquet"
        out.append(Source(src.name, path, src.columns))
    for src in load_sources(Path(sql_dir) / "compare"):
        path = src.path
        if path.startswith("artifacts/compare/"):
            path = f"{d}/" + path[len("artifacts/compare/") :]
        out.append(Source(src.name, path, src.columns))
    return out


def build_compare_warehouse(
    db_path: str | Path = COMPARE_DB,
    backbones: dict[str, dict[str, Any]] | None = None,
    compare_dir: str = "artifacts/compare",
    root: str | Path = ".",
    sql_dir: str | Path = "sql",
) -> dict[str, Any]:
    """The comparison's own warehouse: the demo's views over every backbone's stats (run =
    backbone name), then `<sql_dir>/compare/views/` (`compare_baselines`, `compare_stability`,
    ...) and a `backbones` table (name, objective, its params entry as JSON). A file apart from
    warehouse/saev.duckdb: the demo's database and its `feature_matches` over every pair of runs
    stay as they are (matching decoders across backbones would mean nothing: no matches here).
    Query it with `saev sql --db warehouse/compare.duckdb compare_backbones`."""
    root_dir = Path(root).resolve()
    sql_path = root_dir / sql_dir if not Path(sql_dir).is_absolute() else Path(sql_dir)
    backbones = dict(backbones or {})
    first = next(iter(backbones), None)
    sources = compare_sources(sql_path, compare_dir, first)
    views = _view_files(sql_path) + _view_files(sql_path / "compare")
    names = [n for n, _ in views]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{sql_path}/compare/views: views {dup} are also in {sql_path}/views")
    report = build_warehouse(db_path, root_dir, sql_path, n_matches=0, sources=sources, views=views)
    con = duckdb.connect(str(db_path))
    try:
        con.execute("create table backbones (backbone varchar, objective varchar, entry varchar)")
        for name, entry in backbones.items():
            con.execute(
                "insert into backbones values ($n, $o, $e)",
                {"n": name, "o": str(entry.get("objective", "supervised")),
                 "e": json.dumps(entry, sort_keys=True)},
            )  # fmt: skip
    finally:
        con.close()
    report["views"]["backbones"] = len(backbones)
    return report
