"""The comparison's figures (issue 15 point 7): one PNG and one `dvc plots` JSON per question,
drawn from the named queries on tests/test_compare.py's hand-made warehouse (its answers are
known there), the two figures of later stages skipped while their query is missing or empty and
drawn from tiny tables of our own, and the MLflow run they are logged to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest
from PIL import Image
from test_compare import tiny  # noqa: F401  (the module-scoped hand-made compare warehouse)

from saev_core.compare_figures import (
    FIGURES,
    OPTIONAL,
    FiguresConfig,
    headline_metrics,
    intervention_rows,
    make_figures,
)
from saev_core.warehouse import run_query

CORE = [n for n in FIGURES if n not in OPTIONAL]


def _png_ok(path: Path) -> tuple[int, int]:
    """The PNG's size, after PIL has checked the file is a whole, valid PNG."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_every_question_gets_a_png_and_its_rows_as_json(tiny, tmp_path):  # noqa: F811
    root, db, frames = tiny
    out, plots = tmp_path / "figs", tmp_path / "plots"
    out.mkdir()
    # a figure skipped now leaves no stale file of an older run behind
    (out / "pca_vs_sae_intervention.png").write_bytes(b"old")
    report = make_figures(db, out_dir=out, plots_dir=plots, root=str(root), log_mlflow=False)
    assert report["figures"] == [f"{n}.png" for n in CORE]
    for name in CORE:
        w, h = _png_ok(out / f"{name}.png")
        assert w >= 300 and h >= 200
        got = json.loads((plots / f"{name}.json").read_text())
        params = FiguresConfig().query_params(name)
        want = json.loads(run_query(db, name, params, fmt="json", root=root))
        assert want and [{k: v for k, v in r.items() if k != "plot_label"} for r in got] == want
        # one distinct bar label per row: what dvc plots' bar templates need
        assert len({r["plot_label"] for r in got}) == len(got)
    # the later stages' figures: no query yet, or nothing in its source, so skipped with why
    assert set(report["skipped"]) == set(OPTIONAL)
    assert all(report["skipped"][n] for n in OPTIONAL)
    assert not (out / "pca_vs_sae_intervention.png").exists()
    # titles answer with the fixture's known cross-form result: clip's circle only
    title = report["titles"]["cross_form_features"]
    assert "clip 1/2 (circle)" in title and "supervised 0/2" in title
    m = report["metrics"]
    assert m["cross_form_features/clip/share_of_concepts"] == pytest.approx(0.5)
    assert m["cross_form_features/supervised/share_of_concepts"] == pytest.approx(0.0)
    base = frames["base"]
    sae_pca = base[(base["backbone"] == "clip") & (base["method"] == "pca")
                   & ~base["concept"].str.contains(":")
                   & base["concept"].isin(["circle", "square"])]  # fmt: skip
    assert m["sae_vs_baselines/clip/pca/mean_auroc"] == pytest.approx(sae_pca["auroc_test"].mean())
    stab = frames["stab"]
    s = stab[stab["backbone"] == "clip"]
    want = (
        s[s["kind"] == "trained"]["mean_cos"].mean() - s[s["kind"] == "random"]["mean_cos"].mean()
    )
    assert m["seed_stability/clip/trained_minus_random"] == pytest.approx(want)


def test_options_reach_the_queries_and_bad_ones_are_refused(tiny, tmp_path):  # noqa: F811
    root, db, _ = tiny
    kw = {"out_dir": tmp_path / "f", "plots_dir": tmp_path / "p", "root": str(root),
          "log_mlflow": False}  # fmt: skip
    # min_forms 3: only clip's feature 2 (all three forms) qualifies, still for circle alone
    report = make_figures(db, figures=["cross_form_features"], min_forms=3, **kw)
    rows = json.loads((tmp_path / "p/cross_form_features.json").read_text())
    clip = {r["concept"]: r for r in rows if r["backbone"] == "clip"}
    assert clip["circle"]["features"] == [2] and report["figures"] == ["cross_form_features.png"]
    assert ">= 3 of its forms" in report["titles"]["cross_form_features"]
    with pytest.raises(ValueError, match="unknown key"):
        make_figures(db, min_auroc_typo=0.5, **kw)
    with pytest.raises(ValueError, match="figures: unknown"):
        make_figures(db, figures=["nope"], **kw)
    with pytest.raises(ValueError, match="level must be"):
        make_figures(db, level="token", **kw)


def _own_warehouse(tmp_path: Path, intervene_sql: str) -> tuple[Path, Path]:
    """A DuckDB of our own with the two later stages' tables, and queries over them: the
    project's probe_by_form over a `compare_probes` table when the query exists, else one of
    ours; a pca_vs_sae_intervention of ours (`intervene_sql`)."""
    root = tmp_path / "own"
    (root / "sql/queries").mkdir(parents=True)
    probe_sql = Path(__file__).resolve().parents[1] / "sql/queries/probe_by_form.sql"
    if probe_sql.exists():
        shutil.copy(probe_sql, root / "sql/queries/probe_by_form.sql")
    else:
        (root / "sql/queries/probe_by_form.sql").write_text(
            "-- probe rows (test)\nselect * from compare_probes where form is not null\n"
        )
    (root / "sql/queries/pca_vs_sae_intervention.sql").write_text(intervene_sql)
    db = root / "own.duckdb"
    con = duckdb.connect(str(db))
    try:
        con.execute(
            "create table compare_probes as select * from (values "
            "('clip', 'circle', 'filled', 0.91, 0.85, 0.96, 0.8, 0.82, 20, 60, 'test'), "
            "('clip', 'circle', 'word', 0.71, 0.6, 0.8, 0.6, 0.62, 20, 60, 'test'), "
            "('mae', 'circle', 'filled', 0.81, 0.7, 0.9, 0.7, 0.72, 20, 60, 'test'), "
            "('mae', 'circle', 'word', 0.55, 0.4, 0.7, 0.5, 0.52, 20, 60, 'test'), "
            "('mae', null, 'word', 0.9, 0.8, 1.0, 0.9, 0.9, 20, 60, 'test')"
            ") t(backbone, concept, form, auroc, auroc_lo, auroc_hi, balanced_accuracy, "
            "accuracy, n_pos, n_images, split)"
        )
        con.execute(
            "create table interventions as select * from (values "
            "('supervised', 'circle', 'sae', -2.0, -1.5, -1.9, -1.1), "
            "('supervised', 'circle', 'pca', -2.0, -0.5, -0.8, -0.2), "
            "('supervised', 'circle', 'random', -2.0, 0.01, -0.05, 0.07), "
            "('supervised', 'red', 'sae', -2.0, -0.9, -1.2, -0.6), "
            "('supervised', 'red', 'pca', -2.0, -1.1, -1.4, -0.8), "
            "('supervised', 'red', 'random', -2.0, -0.03, -0.08, 0.02), "
            "('supervised', 'red', 'sae', 0.0, 0.0, 0.0, 0.0)"
            ") t(backbone, concept, method, strength, delta, lo, hi)"
        )
    finally:
        con.close()
    return root, db


LONG = """-- test: one row per concept x method at one strength (a long layout)
-- param strength double: edit strength (default -2)
select * from interventions where strength = $strength order by concept, method
"""


def test_later_stages_figures_from_tables_of_our_own(tmp_path):
    root, db = _own_warehouse(tmp_path, LONG)
    out, plots = tmp_path / "figs", tmp_path / "plots"
    report = make_figures(db, out_dir=out, plots_dir=plots, root=str(root), sql_dir="sql",
                          figures=list(OPTIONAL), log_mlflow=False)  # fmt: skip
    assert report["figures"] == [f"{n}.png" for n in OPTIONAL] and not report["skipped"]
    for name in OPTIONAL:
        _png_ok(out / f"{name}.png")
        got = json.loads((plots / f"{name}.json").read_text())
        want = json.loads(run_query(db, name, {}, fmt="json", root=root, sql_dir="sql"))
        assert [{k: v for k, v in r.items() if k != "plot_label"} for r in got] == want
    m = report["metrics"]
    assert m["probe_by_form/clip/filled/mean_auroc"] == pytest.approx(0.91)
    assert m["probe_by_form/mae/word/mean_auroc"] == pytest.approx(0.55)  # bare "word" left out
    key = "pca_vs_sae_intervention/supervised/strength_-2/{}/mean_delta"
    assert m[key.format("sae")] == pytest.approx((-1.5 - 0.9) / 2)
    assert m[key.format("pca")] == pytest.approx((-0.5 - 1.1) / 2)
    assert m[key.format("random")] == pytest.approx((0.01 - 0.03) / 2)
    assert "strength_0" not in " ".join(m)  # strength bound: only -2's rows
    # a strength with no rows: skipped, not failed
    empty = make_figures(
        db,
        out_dir=out,
        plots_dir=plots,
        root=str(root),
        sql_dir="sql",
        figures=["pca_vs_sae_intervention"],
        strength=-7.0,
        log_mlflow=False,
    )
    assert "no rows" in empty["skipped"]["pca_vs_sae_intervention"]
    assert not (out / "pca_vs_sae_intervention.png").exists()


def test_intervention_rows_refuses_columns_it_cannot_read():
    with pytest.raises(ValueError, match="expected a `method` column"):
        intervention_rows([{"concept": "circle", "effect": 1.0}])
    assert headline_metrics("pca_vs_sae_intervention", []) == {}


def test_a_missing_core_query_fails(tmp_path):
    root, db = _own_warehouse(tmp_path, LONG)
    with pytest.raises(FileNotFoundError, match="no query 'seed_stability'"):
        make_figures(db, out_dir=tmp_path / "f", plots_dir=tmp_path / "p", root=str(root),
                     sql_dir="sql", figures=["seed_stability"], log_mlflow=False)  # fmt: skip


def test_figures_and_headlines_land_in_one_mlflow_run(tiny, tmp_path, monkeypatch):  # noqa: F811
    import mlflow
    from mlflow.tracking import MlflowClient

    root, db, _ = tiny
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from flows.compare import mlflow_tracker  # the tracker the compare-figures stage passes

    report = make_figures(db, out_dir=tmp_path / "f", plots_dir=tmp_path / "p", root=str(root),
                          figures=["cross_form_features", "seed_stability"],
                          tracker=mlflow_tracker())  # fmt: skip
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("compare")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["figures"]
    run = runs[0]
    pngs = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    data = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "data")}
    assert pngs == {"cross_form_features.png", "seed_stability.png"} == set(report["figures"])
    assert data == {"cross_form_features.json", "seed_stability.json"}
    assert run.data.metrics["cross_form_features/clip/share_of_concepts"] == pytest.approx(0.5)
    assert run.data.metrics == pytest.approx(report["metrics"])
    assert run.data.params["min_auroc"] == "0.9" and "git_commit" in run.data.tags


def _write(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def test_all_seven_from_a_warehouse_built_from_parquet(tiny, tmp_path):  # noqa: F811
    """The later stages' Parquet beside test_compare's, the warehouse rebuilt by
    build_compare_warehouse: the project's own views and queries, every figure drawn."""
    from saev_core.warehouse import build_compare_warehouse

    src_root = tiny[0]
    root = tmp_path / "root"
    shutil.copytree(src_root / "artifacts", root / "artifacts")
    shutil.copytree(Path(__file__).resolve().parents[1] / "sql", root / "sql")
    for b, auroc in (("clip", 0.9), ("supervised", 0.7)):
        _write(root / f"artifacts/compare/{b}/probes/labels.parquet", [
            {"backbone": b, "label": f"{c}:{f}", "concept": c, "form": f, "split": "test",
             "n_images": 100, "n_pos": 20, "accuracy": 0.8, "balanced_accuracy": 0.75,
             "auroc": auroc, "auroc_lo": auroc - 0.05, "auroc_hi": auroc + 0.05}
            for c in ("circle", "square") for f in ("filled", "outline", "word")
        ] + [{"backbone": b, "label": "word", "concept": None, "form": "word", "split": "test",
              "n_images": 100, "n_pos": 40, "accuracy": 0.9, "balanced_accuracy": 0.9,
              "auroc": 0.99, "auroc_lo": 0.98, "auroc_hi": 1.0}])  # fmt: skip
    # circle: the SAE feature moves the logit further beyond its control (adjusted pca - sae
    # 1.0, CI above 0, Holm p 0.01); square: level (CI holds 0); triangle: CI below 0, but its
    # Holm-adjusted p 0.2 is not below alpha: level too
    edits = []
    for c, sae, pca, diff, p_adj in (("circle", -1.5, -0.5, (1.0, 0.7, 1.3), 0.01),
                                     ("square", -0.9, -1.1, (-0.2, -0.4, 0.1), 0.4),
                                     ("triangle", -0.6, -1.0, (-0.4, -0.6, -0.1), 0.2)):  # fmt: skip
        for s in (-2.0, 0.0):
            k = 1.0 if s else 0.0
            common = {"backbone": "supervised", "concept": c, "strength": s, "n_images": 30,
                      "select_split": "val", "report_split": "test", "layer": 2}  # fmt: skip
            edits += [
                {**common, "method": "sae", "unit": 3, "delta": k * sae, "lo": k * sae - 0.2,
                 "hi": k * sae + 0.2},
                {**common, "method": "pca", "unit": 0, "delta": k * pca, "lo": k * pca - 0.2,
                 "hi": k * pca + 0.2, "adj_diff": k * diff[0], "adj_diff_lo": k * diff[1],
                 "adj_diff_hi": k * diff[2], "adj_diff_p": p_adj / 2, "p_adjusted": p_adj,
                 "alpha": 0.05, "raw_diff": k * (pca - sae)},
                {**common, "method": "random", "control_for": "sae", "unit": 3, "delta": 0.01,
                 "lo": -0.02, "hi": 0.04},
                {**common, "method": "random", "control_for": "pca", "unit": 0,
                 "delta": -0.01, "lo": -0.04, "hi": 0.02},
            ]  # fmt: skip
    _write(root / "artifacts/compare/intervene/pca_vs_sae.parquet", edits)
    db = root / "warehouse/compare.duckdb"
    build_compare_warehouse(db, {"clip": {}, "supervised": {}}, "artifacts/compare", root=root)
    out, plots = tmp_path / "figs", tmp_path / "plots"
    report = make_figures(db, out_dir=out, plots_dir=plots, root=str(root), log_mlflow=False)
    assert report["figures"] == [f"{n}.png" for n in FIGURES] and not report["skipped"]
    for name in FIGURES:
        _png_ok(out / f"{name}.png")
        got = json.loads((plots / f"{name}.json").read_text())
        want = json.loads(run_query(db, name, FiguresConfig().query_params(name), fmt="json",
                                    root=root))  # fmt: skip
        assert want and [{k: v for k, v in r.items() if k != "plot_label"} for r in got] == want
    m = report["metrics"]
    for form in ("filled", "outline", "word"):
        assert m[f"probe_by_form/clip/{form}/mean_auroc"] == pytest.approx(0.9)
        assert m[f"probe_by_form/supervised/{form}/mean_auroc"] == pytest.approx(0.7)
    at = "pca_vs_sae_intervention/supervised/strength_-2/"
    assert m[at + "sae/mean_delta"] == pytest.approx((-1.5 - 0.9 - 0.6) / 3)
    assert m[at + "pca/mean_delta"] == pytest.approx((-0.5 - 1.1 - 1.0) / 3)
    assert m[at + "mean_adj_pca_minus_sae"] == pytest.approx((1.0 - 0.2 - 0.4) / 3)
    assert (m[at + "n_sae_further"], m[at + "n_pca_further"], m[at + "n_level_further"]) == (
        1.0, 0.0, 2.0,
    )  # fmt: skip
    assert not any("strength_0" in k for k in m)  # the strength option reached the query
    assert (
        "SAE further on 1, PCA further on 0, level on 2 of 3"
        in (report["titles"]["pca_vs_sae_intervention"])
    )
