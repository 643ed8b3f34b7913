"""The warehouse's command lines: `saev sql` (`main`: a named query, typed SQL or `--list`) and
`main_build` (build the database outside the `warehouse` flow).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb

from saev_core.warehouse.build import _NAME, DEFAULT_DB, build_warehouse
from saev_core.warehouse.queries import list_queries
from saev_core.warehouse.sandbox import _resolve_dirs, run_query


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
