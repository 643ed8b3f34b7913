"""The backbone comparison (issue 15): `warehouse/compare.duckdb`, the same views over the outputs
of every compared backbone (`compare_sources` moves each source's glob under `compare_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from saev_core.warehouse.build import Source, _view_files, build_warehouse, load_sources

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
