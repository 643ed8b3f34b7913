"""Build `warehouse/saev.duckdb`: the sources of `sql/sources.yaml` and the views of `sql/views/`.

Each source becomes a relation `src_<name>` (an empty one with the same columns when its glob
matches no file), each view file a relation in file-name order; `materialize=True` stores them
as tables sorted by `SORT_KEYS`, `materialize=False` as views over the Parquet. Paths stay
relative to the project root, and `warehouse_info` records where the root and `sql/` lie. The
package docstring (`saev_core.warehouse`) tells the whole of it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import yaml

from saev_core import object_store

DEFAULT_DB = "warehouse/saev.duckdb"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VIEW_FILE = re.compile(r"(\d+)_([a-z_][a-z0-9_]*)\.sql")


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
