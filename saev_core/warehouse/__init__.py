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

The package, by submodule:

- `build`: `WarehouseConfig`, the sources (`Source`, `load_sources`) and `build_warehouse`.
- `queries`: the named queries of `sql/queries/` (`QuerySpec`, `parse_query`, `list_queries`)
  and how their parameters are converted and bound.
- `sandbox`: `run_query` in its sandbox, `source_dirs`, `format_rows`.
- `cli`: `saev sql` (`main`) and `saev warehouse` outside the flow (`main_build`).
- `compare`: `warehouse/compare.duckdb` over the compared backbones (`build_compare_warehouse`).
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.warehouse)
from .build import (
    DEFAULT_DB,
    SORT_KEYS,
    Source,
    WarehouseConfig,
    build_warehouse,
    load_sources,
    source_dirs,
)
from .cli import main, main_build
from .compare import COMPARE_DB, build_compare_warehouse, compare_sources
from .queries import PARAM_TYPES, QueryParam, QuerySpec, list_queries, parse_query
from .sandbox import format_rows, run_query
