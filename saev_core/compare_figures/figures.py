"""`make_figures`: run each figure's named query on `warehouse/compare.duckdb`, draw it, write
`<out_dir>/<name>.png` and `<plots_dir>/<name>.json`, and hand the files and the headline numbers
(`headline_metrics`) to the tracker. The package docstring (`saev_core.compare_figures`) tells
the whole of it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from saev_core.compare_figures.draw import DRAW
from saev_core.compare_figures.figure_data import (
    FIGURES,
    OPTIONAL,
    FiguresConfig,
    Rows,
    _key,
    _mean,
    _num,
    intervention_rows,
    paired_rows,
    plot_label,
)
from saev_core.config import from_dict
from saev_core.plots import _plt

Tracker = Callable[[list[Path], list[Path], dict[str, float], dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# headline numbers (MLflow metrics and the report)


def _where_key(backbone: Any, strength: Any) -> list[str]:
    return [
        p for p in (backbone, None if strength is None else f"strength_{_num(strength):g}") if p
    ]


def headline_metrics(name: str, rows: Rows) -> dict[str, float]:
    """The few numbers that answer figure `name`'s question, keyed `<figure>/<backbone>/...`."""
    out: dict[str, float] = {}
    if name in ("compare_backbones", "probe_by_form"):
        value = "auroc_test" if name == "compare_backbones" else "auroc"
        for b, f in {(r["backbone"], r["form"]) for r in rows}:
            rs = [r for r in rows if (r["backbone"], r["form"]) == (b, f)]
            out[_key(name, b, f, "mean_auroc")] = _mean([_num(r[value]) for r in rs])
            if name == "compare_backbones":
                margins = [_num(r[value]) - _num(r["control_image_auroc"]) for r in rs]
                out[_key(name, b, f, "mean_above_control")] = _mean(margins)
    elif name == "cross_form_features":
        for r in rows:
            out[_key(name, r["backbone"], "share_of_concepts")] = _num(r["share_of_concepts"])
    elif name == "semantic_probe":
        for b in {r["backbone"] for r in rows}:
            rs = [r for r in rows if r["backbone"] == b]
            out[_key(name, b, "n_significant")] = float(sum(bool(r["significant"]) for r in rs))
            out[_key(name, b, "mean_test_f1")] = _mean([_num(r["test_f1"]) for r in rs])
            out[_key(name, b, "mean_random_f1")] = _mean([_num(r["random_f1"]) for r in rs])
    elif name == "sae_vs_baselines":
        for r in rows:
            out[_key(name, r["backbone"], r["method"], "mean_auroc")] = _num(r["mean_auroc"])
    elif name == "seed_stability":
        for r in rows:
            out[_key(name, r["backbone"], r["kind"], "mean_cos")] = _num(r["mean_cos"])
            out[_key(name, r["backbone"], r["kind"], "mean_corr")] = _num(r["mean_corr"])
            if r["kind"] == "trained":
                out[_key(name, r["backbone"], "trained_minus_random")] = _num(
                    r["trained_minus_random"]
                )
    elif name == "pca_vs_sae_intervention":
        long, paired = intervention_rows(rows), paired_rows(rows)
        for b, s, m in {(r["backbone"], r["strength"], r["method"]) for r in long}:
            d = [_num(r["delta"]) for r in long
                 if (r["backbone"], r["strength"], r["method"]) == (b, s, m)]  # fmt: skip
            out[_key(name, *_where_key(b, s), m, "mean_delta")] = _mean(d)
        for b, s in {(r["backbone"], r["strength"]) for r in paired}:
            ps = [r for r in paired if (r["backbone"], r["strength"]) == (b, s)]
            out[_key(name, *_where_key(b, s), "mean_adj_pca_minus_sae")] = _mean(
                [_num(r["diff"]) for r in ps]
            )
            for k in ("sae", "pca", "level"):
                if any(r["stronger"] for r in ps):
                    n = sum(r["stronger"] == k for r in ps)
                    out[_key(name, *_where_key(b, s), f"n_{k}_further")] = float(n)
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ---------------------------------------------------------------------------------------------
# running the queries, writing the files, tracking


def _query_dir(db: Path, cfg: FiguresConfig) -> Path:
    """The `queries/` folder run_query reads for this warehouse (explicit, else recorded)."""
    import duckdb

    from saev_core.warehouse.sandbox import _resolve_dirs

    con = duckdb.connect(str(db), read_only=True)
    try:
        return _resolve_dirs(con, cfg.root, cfg.sql_dir, db)[1] / "queries"
    finally:
        con.close()


def fetch(db: str | Path, name: str, cfg: FiguresConfig, query_dir: Path) -> Rows:
    """Query `name`'s rows as `saev sql -f json` gives them, binding only the parameters in
    `cfg.query_params(name)` that the query declares (its own defaults for the rest)."""
    from saev_core.warehouse.queries import parse_query
    from saev_core.warehouse.sandbox import run_query

    path = query_dir / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no query {name!r} in {query_dir} (not written yet?)")
    declared = {p.name for p in parse_query(path).params}
    params = {k: v for k, v in cfg.query_params(name).items() if k in declared}
    return json.loads(run_query(db, name, params, fmt="json", root=cfg.root, sql_dir=cfg.sql_dir))


def _fit_title(fig: Any) -> None:
    """Wrap the figure's title to its width (a long answer line would be cut at the edges)."""
    import textwrap

    st = getattr(fig, "_suptitle", None)
    if st is None:
        return
    # a character is about 0.6 of the font size wide; keep a tenth of the width as margin
    width = max(40, int(0.9 * fig.get_figwidth() * 72 / (0.6 * max(st.get_fontsize(), 1))))
    lines = st.get_text().split("\n")
    st.set_text("\n".join(textwrap.fill(line, width) for line in lines))
    fig.tight_layout()


def _atomic_write(path: Path, data: bytes) -> None:
    from saev_core.shards import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def make_figures(
    db: str | Path,
    out_dir: str | Path = "artifacts/figures/compare",
    plots_dir: str | Path = "metrics/compare/plots",
    tracker: Tracker | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Draw the comparison's figures from warehouse `db` (see the module docstring); `options`
    are FiguresConfig fields. Returns {figures: PNG names written, data: JSON names, skipped:
    {figure: reason}, titles: {figure: title}, metrics: headline numbers}."""
    cfg = from_dict(FiguresConfig, options, where="compare.figures")
    db, out, plots = Path(db), Path(out_dir), Path(plots_dir)
    if not db.exists():
        raise FileNotFoundError(
            f"warehouse not found: {db} (run `python -m flows.compare warehouse`)"
        )
    query_dir = _query_dir(db, cfg)
    plt = _plt()
    pngs: list[Path] = []
    data: list[Path] = []
    report: dict[str, Any] = {"figures": [], "data": [], "skipped": {}, "titles": {}, "metrics": {}}
    fetched: dict[str, Rows] = {}
    for name in [n for n in FIGURES if n in cfg.figures]:
        png, js = out / f"{name}.png", plots / f"{name}.json"
        try:
            rows = fetch(db, name, cfg, query_dir)
            if not rows:
                raise LookupError(f"query {name} returned no rows")
            if name == "pca_vs_sae_intervention":
                intervention_rows(rows)  # the columns it needs, checked before drawing
        except (FileNotFoundError, ValueError, LookupError) as e:
            if name not in OPTIONAL:
                raise
            print(f"compare figures: {name} skipped: {e}")
            report["skipped"][name] = str(e)
            for stale in (png, js):
                stale.unlink(missing_ok=True)
            continue
        fetched[name] = rows
        extra = {"sae_rows": fetched.get("compare_backbones")}
        fig, title = DRAW[name](rows, cfg=cfg, **extra)
        _fit_title(fig)
        try:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=cfg.dpi)
            _atomic_write(png, buf.getvalue())
        finally:
            plt.close(fig)
        records = [{**r, "plot_label": plot_label(name, r)} for r in rows]
        _atomic_write(js, (json.dumps(records, indent=1) + "\n").encode())
        pngs.append(png)
        data.append(js)
        report["figures"].append(png.name)
        report["data"].append(js.name)
        report["titles"][name] = title
        report["metrics"].update(headline_metrics(name, rows))
    if tracker is not None and cfg.log_mlflow:
        params = {k: v for k, v in asdict(cfg).items() if k not in ("root", "sql_dir")}
        tracker(pngs, data, report["metrics"], params)
    return report
