"""Tests for saev_core.warehouse and sql/: build from real stats Parquet, bound named queries, CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saev_core.stats import StatsConfig, compute_stats
from saev_core.stats.tables import write_stats
from saev_core.warehouse import (
    build_warehouse,
    list_queries,
    main,
    main_build,
    parse_query,
    run_query,
    sandbox,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
REQUIRED = (
    "runs",
    "images",
    "features",
    "top_examples",
    "feature_labels",
    "feature_matches",
    "feature_neighbors",
    "feature_breadth",
    "interventions",
)
N_IMG, N_TOK, D_SAE = 6, 5, 4  # tokens: CLS + 4 patches


class LinearReluSAE(torch.nn.Module):
    """A real linear + ReLU encoder with hand-set weights (what compute_stats needs of an SAE)."""

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(W_enc)
        self.b_enc = torch.nn.Parameter(b_enc)
        self.W_dec = torch.nn.Parameter(W_enc.T.clone())
        self.cfg = SimpleNamespace(d_sae=W_enc.shape[1])

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_bd @ self.W_enc + self.b_enc)


def encoder(perm: list[int]) -> LinearReluSAE:
    """Feature j reads input dim perm[j]; the last feature is dead (zero weights, negative bias)."""
    W = torch.zeros(3, D_SAE)
    for j, i in enumerate(perm):
        W[i, j] = 1.0
    b = torch.tensor([0.0, 0.0, 0.0, -1.0])
    return LinearReluSAE(W, b)


def save_decoder(sae_dir: Path, sae: LinearReluSAE) -> None:
    """The part of a checkpoint the warehouse reads: W_dec in sae.safetensors."""
    from safetensors.torch import save_file

    sae_dir.mkdir(parents=True, exist_ok=True)
    save_file({"W_dec": sae.W_dec.detach().contiguous()}, str(sae_dir / "sae.safetensors"))


def toy_data():
    """CLS + 4 patches per image; dim 0 is on exactly on red patches, dim 1 on circle patches,
    dim 2 is noise."""
    rng = np.random.default_rng(0)
    image_id = np.repeat(np.arange(N_IMG), N_TOK)
    token = np.tile(np.arange(N_TOK), N_IMG).astype(np.int32)
    patch = token >= 1
    red = patch & (rng.random(len(token)) < 0.4)
    circle = patch & (rng.random(len(token)) < 0.3)
    red[1], circle[2] = True, True  # both labels present
    acts = np.stack(
        [
            np.where(red, rng.uniform(1, 3, len(token)), -1.0),
            np.where(circle, rng.uniform(1, 3, len(token)), -1.0),
            rng.normal(0, 1, len(token)),
        ],
        axis=1,
    ).astype(np.float32)
    return image_id, token, red, circle, acts


def make_project(root: Path, with_interventions: bool = True) -> dict:
    """A project tree with one activation set, two stats runs and (optionally) interventions."""
    image_id, token, red, circle, acts = toy_data()
    rows = [(i, t, "red") for i, t in zip(image_id[red], token[red], strict=True)]
    rows += [(i, t, "circle") for i, t in zip(image_id[circle], token[circle], strict=True)]
    labels = pd.DataFrame(rows, columns=["image_id", "token", "label"])

    act_dir = root / "artifacts" / "activations" / "toy"
    act_dir.mkdir(parents=True)
    image_labels = [sorted(set(labels.label[labels.image_id == i])) for i in range(N_IMG)]
    pq.write_table(
        pa.table(
            {
                "image_id": pa.array(np.arange(N_IMG), pa.int64()),
                "split": ["val"] * N_IMG,
                "path": [f"images/val/{i:05d}.png" for i in range(N_IMG)],
                "labels": pa.array(image_labels, pa.list_(pa.string())),
            }
        ),
        act_dir / "images.parquet",
    )
    stats = {}
    # run a: feature 0 reads red, 1 circle; run b: feature 1 reads red, 2 circle
    for run, perm in (("relu_a", [0, 1, 2]), ("relu_b", [2, 0, 1])):
        st = compute_stats(
            encoder(perm),
            [(image_id, token, acts)],
            labels,
            ["circle", "red"],
            1,
            StatsConfig(n_top=3),
            run,
            progress=False,
        )
        info = {
            "run": run,
            "sae_dir": f"artifacts/saes/{run}",
            "shard_dir": "artifacts/activations/toy",
            "backbone": "tiny-vit",
            "layer": 2,
            "arch": "relu",
            "d_model": 3,
            "d_sae": D_SAE,
            "l0": 1.5,
            "fvu": 0.1,
            "dead_frac": 0.25,
            "dense_frac": 0.5,
            "cfg_json": {"perm": perm},
        }
        write_stats(st, root / "artifacts" / "stats" / run, info)
        save_decoder(root / info["sae_dir"], encoder(perm))
        stats[run] = st
    if with_interventions:
        inter_dir = root / "artifacts" / "interventions" / "relu_a"
        inter_dir.mkdir(parents=True)
        pq.write_table(pa.table(INTERVENTION_ROWS), inter_dir / "results.parquet")
        pq.write_table(specificity_table(), inter_dir / "specificity.parquet")
    return stats


# results.parquet of the intervene stage (issue 14 columns, no `below_control`): red suppressed
# at three strengths, circle at one
INTERVENTION_ROWS = {
    "run": ["relu_a"] * 4,
    "experiment": ["suppress@-1", "suppress@-2", "suppress@-5", "circle@-2"],
    "hypothesis": ["suppress", "suppress", "suppress", "circle"],
    "concept": ["red", "red", "red", "circle"],
    "task": ["classifier"] * 4,
    "feature": pa.array([0, 0, 0, 1], pa.int64()),
    "control_feature": pa.array([2, 2, 2, 0], pa.int64()),
    "edit": ["clamp"] * 4,
    "strength": [-1.0, -2.0, -5.0, -2.0],
    "scope": ["patches"] * 4,
    "n_images": pa.array([100] * 4, pa.int64()),
    "p_before": [0.9, 0.9, 0.9, 0.7],
    "p_after": [0.8, 0.5, 0.1, 0.65],
    "delta": [0.1, -0.4, -0.8, -0.05],  # the weakest edit goes the wrong way
    "delta_lo": [0.05, -0.45, -0.85, -0.1],
    "delta_hi": [0.15, -0.35, -0.75, 0.0],
    "control_delta": [0.0, -0.01, -0.02, -0.03],
    "control_delta_lo": [-0.02, -0.03, -0.04, -0.05],
    "control_delta_hi": [0.02, 0.01, 0.0, -0.01],
    "features": ["0", "0", "0", "1"],
    "layer": pa.array([2] * 4, pa.int64()),
    "auroc": [0.99] * 4,
    "other_abs_delta": [0.01, 0.02, 0.05, 0.01],
    "mlflow_run_id": ["abc"] * 4,
    "p_value": [0.9, 0.001, 0.0005, 0.04],
    "p_adjusted": [1.0, 0.003, 0.002, 0.08],
    "n_controls": pa.array([20] * 4, pa.int64()),
    "control_median": [0.001, -0.01, -0.02, -0.03],
    "control_lo": [-0.03, -0.04, -0.06, -0.07],
    "control_hi": [0.03, 0.02, 0.01, 0.01],
    "vs_control_lo": [0.05, -0.44, -0.83, -0.06],
    "vs_control_hi": [0.14, -0.35, -0.74, 0.02],
    "verdict": ["not supported", "supported", "supported", "not supported"],
    # delta below control_lo (a decrease is tested): the last is inside the controls' range
    "beyond_controls": [False, True, True, False],
    "off_target_abs_delta": [0.011, 0.021, 0.051, 0.012],
    "alternative": ["less"] * 4,
    "correction": ["holm"] * 4,
    "select_split": ["val"] * 4,
    "eval_split": ["test"] * 4,
    "held_out": [True] * 4,
}
CONCEPTS = ["circle", "red"]


def specificity_table() -> pa.Table:
    """specificity.parquet: every experiment's change of every concept (the segmentation rates
    only on circle's rows)."""
    rng = np.random.default_rng(1)
    rows = []
    for exp, hyp, edited, s in zip(
        INTERVENTION_ROWS["experiment"], INTERVENTION_ROWS["hypothesis"],
        INTERVENTION_ROWS["concept"], INTERVENTION_ROWS["strength"], strict=True,
    ):  # fmt: skip
        for concept in CONCEPTS:
            d = float(rng.normal(-0.5 if concept == edited else 0.0, 0.1))
            seg = edited == "circle"
            rows.append(
                {
                    "run": "relu_a",
                    "experiment": exp,
                    "hypothesis": hyp,
                    "edited_concept": edited,
                    "strength": s,
                    "concept": concept,
                    "delta": d,
                    "delta_lo": d - 0.05,
                    "delta_hi": d + 0.05,
                    "change_rate": (0.4 if concept == edited else 0.01) if seg else None,
                    "target_change_rate": 0.4 if seg else None,
                    "other_change_rate": 0.02 if seg else None,
                }
            )
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    stats = make_project(root)
    db = root / "warehouse" / "saev.duckdb"
    report = build_warehouse(db, root=root, sql_dir=SQL_DIR)
    return SimpleNamespace(root=root, db=db, stats=stats, report=report)


def q(project, name_or_sql, fmt="json", **params):
    out = run_query(project.db, name_or_sql, params, fmt=fmt, root=project.root, sql_dir=SQL_DIR)
    return json.loads(out) if fmt == "json" else out


def dump(db: Path, root: Path) -> dict:
    """Every view's definition and rows, to compare two builds."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute("set file_search_path = $root", {"root": str(root)})
        relations = con.execute(
            "select view_name, sql from duckdb_views() where not internal "
            "union all select table_name, sql from duckdb_tables() order by 1"
        ).fetchall()
        return {
            name: (sql, con.execute(f"select * from {name} order by all").fetchall())
            for name, sql in relations
        }
    finally:
        con.close()


def test_required_relations_and_row_counts(project):
    views = project.report["views"]
    for name in REQUIRED:
        assert name in views, name
    top_rows = sum(int((st.top_value > 0).sum()) for st in project.stats.values())
    assert views["runs"] == 2
    assert views["images"] == N_IMG
    assert views["features"] == 2 * D_SAE
    assert views["feature_labels"] == 2 * D_SAE * 2
    assert views["top_examples"] == top_rows > 0
    assert views["interventions"] == 4
    assert views["intervention_specificity"] == 4 * len(CONCEPTS)
    assert project.report["empty_sources"] == []
    assert not Path(f"{project.db}.tmp").exists()
    runs = q(project, "select run, activations, n_prefix_tokens, k from runs order by run")
    assert runs == [
        {"run": "relu_a", "activations": "toy", "n_prefix_tokens": 1, "k": None},
        {"run": "relu_b", "activations": "toy", "n_prefix_tokens": 1, "k": None},
    ]


def test_rebuild_is_idempotent(project, tmp_path):
    db = tmp_path / "w.duckdb"
    first = build_warehouse(db, root=project.root, sql_dir=SQL_DIR)
    before = dump(db, project.root)
    matches = q(project, "select * from feature_matches order by all")
    second = build_warehouse(db, root=project.root, sql_dir=SQL_DIR)
    assert first["views"] == second["views"] and first["views"]["feature_matches"] > 0
    assert dump(db, project.root) == before
    assert q(project, "select * from feature_matches order by all") == matches
    assert before["features"][1] and sorted(os.listdir(tmp_path)) == ["w.duckdb"]


def test_failed_build_keeps_the_previous_database(project, tmp_path):
    db = tmp_path / "w.duckdb"
    build_warehouse(db, root=project.root, sql_dir=SQL_DIR)
    before = dump(db, project.root)
    bad_sql = tmp_path / "sql"
    shutil.copytree(SQL_DIR, bad_sql)
    (bad_sql / "views" / "99_broken.sql").write_text("select no_such_column from features\n")
    with pytest.raises(ValueError, match="99_broken.sql"):
        build_warehouse(db, root=project.root, sql_dir=bad_sql)
    assert dump(db, project.root) == before
    assert sorted(os.listdir(tmp_path)) == ["sql", "w.duckdb"]


def test_empty_sources_still_bind(tmp_path):
    make_project(tmp_path, with_interventions=False)
    shutil.rmtree(tmp_path / "artifacts" / "activations")
    report = build_warehouse(tmp_path / "w.duckdb", root=tmp_path, sql_dir=SQL_DIR)
    assert sorted(report["empty_sources"]) == [
        "images",
        "intervention_specificity",
        "interventions",
    ]
    assert report["views"]["interventions"] == 0 and report["views"]["images"] == 0
    for name in ("intervention_summary", "intervention_controls", "intervention_specificity"):
        rows = json.loads(run_query(tmp_path / "w.duckdb", name, {}, "json", tmp_path, SQL_DIR))
        assert rows == [], name
    ex = json.loads(
        run_query(
            tmp_path / "w.duckdb", "feature_exemplars", {"run": "relu_a", "feature": "0"}, "json",
            tmp_path, SQL_DIR,
        )
    )  # fmt: skip
    assert ex and ex[0]["path"] is None  # images unknown, exemplars still listed


def test_planted_best_feature_is_found(project):
    rows = q(project, "top_features_for_label", label="red", run="relu_b", limit="2")
    assert [r["feature"] for r in rows][:1] == [1] and len(rows) == 2
    assert rows[0]["auroc"] == 1.0 and rows[0]["run"] == "relu_b"
    best = q(project, "best_feature_per_concept")
    got = {(r["run"], r["label"]): r["feature"] for r in best}
    assert got == {
        ("relu_a", "circle"): 1,
        ("relu_a", "red"): 0,
        ("relu_b", "circle"): 2,
        ("relu_b", "red"): 1,
    }
    assert all(r["auroc"] == 1.0 and r["max_act"] > 1.0 for r in best)
    # without run: both runs, default limit 10
    assert {r["run"] for r in q(project, "top_features_for_label", label="red")} == {
        "relu_a",
        "relu_b",
    }


def test_other_named_queries(project):
    dd = q(project, "dead_and_dense", run="relu_a")
    st = project.stats["relu_a"]
    assert len(dd) == 1 and dd[0]["n_features"] == D_SAE and dd[0]["n_dead"] == 1
    # dense relative to the mean firing rate (10 x), and absolute (1% of tokens)
    assert dd[0]["n_dense"] == int((st.freq > 10 * st.freq.mean()).sum())
    assert dd[0]["n_dense_abs"] == int((st.freq > 0.01).sum()) > dd[0]["n_dense"]
    assert dd[0]["dense_threshold_rel"] == pytest.approx(10 * st.freq.mean())
    dd_hi = q(project, "dead_and_dense", run="relu_a", dense_threshold="0.99")
    assert dd_hi[0]["n_dense_abs"] == 0 and dd_hi[0]["dense_threshold"] == 0.99
    dd_lo = q(project, "dead_and_dense", run="relu_a", dense_factor="1.5")
    assert dd_lo[0]["n_dense"] == int((st.freq > 1.5 * st.freq.mean()).sum()) > 0
    fv = q(project, "frequency_value", run="relu_a")
    assert [r["feature"] for r in fv] == [0, 1, 2]  # the dead feature has no point
    assert fv[0]["log10_freq"] == pytest.approx(np.log10(st.freq[0]))
    ex = q(project, "feature_exemplars", run="relu_a", feature="0")
    assert [r["rank"] for r in ex] == [1, 2, 3]
    assert ex[0]["image_id"] == st.top_image[0, 0] and ex[0]["patch"] == st.top_token[0, 0] - 1
    assert ex[0]["path"] == f"images/val/{st.top_image[0, 0]:05d}.png"
    assert "red" in ex[0]["image_labels"]
    lf = q(project, "labels_for_feature", run="relu_b", feature="2")
    assert [r["label"] for r in lf] == ["circle", "red"]
    inter = q(project, "intervention_summary", concept="red")
    assert [r["strength"] for r in inter] == [-5.0, -2.0, -1.0]
    assert [r["verdict"] for r in inter] == ["supported", "supported", "not supported"]
    assert [r["control_delta_lo"] for r in inter] == [-0.04, -0.03, -0.02]
    cmp = q(project, "compare_runs")
    assert [r["run"] for r in cmp] == ["relu_a", "relu_b"] and cmp[0]["min_best_auroc"] == 1.0


CONTROL_COLUMNS = [
    "p_value",
    "p_adjusted",
    "n_controls",
    "control_median",
    "control_lo",
    "control_hi",
    "vs_control_lo",
    "vs_control_hi",
    "verdict",
    "beyond_controls",
    "off_target_abs_delta",
    "alternative",
    "correction",
    "select_split",
    "eval_split",
    "held_out",
]


def test_intervention_controls_shows_the_verdicts(project):
    """Every column the intervene stage writes for its verdict reaches the named query, row for
    row; supported experiments come first, by adjusted p (pandas does the same selection)."""
    df = pd.read_parquet(project.root / "artifacts/interventions/relu_a/results.parquet")
    for params, mask in (
        ({"run": "relu_a"}, df.run == "relu_a"),
        ({"run": "relu_a", "strength": "-2"}, df.strength == -2.0),
    ):
        rows = q(project, "intervention_controls", **params)
        want = df[mask].assign(unsupported=lambda d: d.verdict != "supported")
        want = want.sort_values(["unsupported", "p_adjusted"])
        assert [(r["hypothesis"], r["strength"]) for r in rows] == list(
            zip(want.hypothesis, want.strength, strict=True)
        )
        for col in CONTROL_COLUMNS:
            assert [r[col] for r in rows] == pytest.approx(list(want[col]), abs=5e-4), col
    assert [r["verdict"] for r in q(project, "intervention_controls")][:2] == ["supported"] * 2
    # the random-feature control's own effect is still there, under its own name
    row = q(project, "intervention_controls", strength="-5")[0]
    assert row["random_feature"] == -0.02 and row["control_lo"] == -0.06


def test_make_demo_query_shows_the_verdicts(project):
    """The query `make demo` prints runs against the warehouse and shows each concept's verdict
    with its adjusted p and paired interval (not the superseded `below_controls`)."""
    import re

    makefile = (SQL_DIR.parent / "Makefile").read_text()
    (sql,) = re.findall(r'saev sql "(select [^"]* from interventions [^"]*)"', makefile)
    rows = q(project, sql)
    df = pd.read_parquet(project.root / "artifacts/interventions/relu_a/results.parquet")
    want = df[df.strength == -2.0].sort_values("concept")
    assert [r["concept"] for r in rows] == list(want.concept)
    assert [r["verdict"] for r in rows] == list(want.verdict)
    assert [r["beyond_controls"] for r in rows] == list(want.beyond_controls)
    for col in ("p_adjusted", "vs_control_lo", "vs_control_hi"):
        assert [r[col] for r in rows] == pytest.approx(list(want[col]), abs=5e-4), col
    assert not any("below" in k for k in rows[0])


def test_intervention_specificity_is_the_concept_matrix(project):
    """The specificity query returns, per strength, the edited-concept x measured-concept matrix
    of the Parquet (compared with a pandas pivot), the diagonal flagged."""
    df = pd.read_parquet(project.root / "artifacts/interventions/relu_a/specificity.parquet")
    rows = q(project, "intervention_specificity", run="relu_a", strength="-2")
    got = pd.DataFrame(rows)
    assert set(got.strength) == {-2.0} and len(got) == 2 * len(CONCEPTS)
    sel = df[df.strength == -2.0]
    for value in ("delta", "delta_lo", "delta_hi"):
        matrix = got.pivot(index="edited_concept", columns="concept", values=value)
        expected = sel.pivot(index="edited_concept", columns="concept", values=value)
        assert list(matrix.index) == ["circle", "red"] and list(matrix.columns) == CONCEPTS
        np.testing.assert_allclose(matrix.to_numpy(), expected.to_numpy(), atol=5e-5)
    assert list(zip(got.edited_concept, got.concept, strict=True)) == [
        ("circle", "circle"), ("circle", "red"), ("red", "circle"), ("red", "red"),
    ]  # fmt: skip
    assert list(got.is_target) == list(got.edited_concept == got.concept)
    # each cell carries its experiment's task, so classifier and probe matrices are told apart
    res = pd.read_parquet(project.root / "artifacts/interventions/relu_a/results.parquet")
    task_of = dict(zip(res.experiment, res.task, strict=True))
    assert got.task.notna().all() and list(got.task) == [task_of[e] for e in got.experiment]
    assert list(got.changed) == list((got.delta_lo > 0) | (got.delta_hi < 0))
    seg = got[got.edited_concept == "circle"]
    assert list(seg.target_change_rate) == [0.4, 0.4] and list(seg.other_change_rate) == [0.02] * 2
    assert list(seg.change_rate) == [0.4, 0.01]
    assert got[got.edited_concept == "red"].target_change_rate.isna().all()
    # every strength when omitted: the whole file, ordered by strength
    every = q(project, "intervention_specificity", run="relu_a")
    assert len(every) == len(df) and [r["strength"] for r in every] == sorted(df.strength)
    with pytest.raises(ValueError, match="unknown run 'relu_x'"):
        q(project, "intervention_specificity", run="relu_x")


def test_intervention_run_without_specificity_still_loads(project, tmp_path):
    """A results.parquet written before the verdict columns and without specificity.parquet
    beside it loads next to a new one: its new columns are null, its matrix empty."""
    root = tmp_path / "p"
    shutil.copytree(project.root, root, ignore=shutil.ignore_patterns("warehouse"))
    old = root / "artifacts" / "interventions" / "old"
    old.mkdir()
    keep = ("experiment", "concept", "feature", "edit", "strength", "scope", "n_images", "delta",
            "delta_lo", "delta_hi", "control_delta", "control_delta_lo", "control_delta_hi")  # fmt: skip
    pq.write_table(
        pa.table({"run": ["old"], **{k: INTERVENTION_ROWS[k][:1] for k in keep}}),
        old / "results.parquet",
    )
    db = root / "w.duckdb"
    report = build_warehouse(db, root=root, sql_dir=SQL_DIR)
    assert report["views"]["interventions"] == 5 and report["empty_sources"] == []
    assert report["sources"]["intervention_specificity"]["files"] == 1
    rows = json.loads(run_query(db, "intervention_controls", {"run": "old"}, "json", root, SQL_DIR))
    assert len(rows) == 1 and rows[0]["delta"] == 0.1
    assert all(rows[0][c] is None for c in CONTROL_COLUMNS)
    legacy = json.loads(
        run_query(db, "select below_control, vs_control from interventions where run = 'old'",
                  {}, "json", root, SQL_DIR)
    )  # fmt: skip
    assert legacy == [{"below_control": False, "vs_control": pytest.approx(0.1)}]
    assert (
        json.loads(run_query(db, "intervention_specificity", {"run": "old"}, "json", root, SQL_DIR))
        == []
    )
    new = json.loads(
        run_query(db, "intervention_specificity", {"run": "relu_a"}, "json", root, SQL_DIR)
    )
    assert len(new) == 4 * len(CONCEPTS)


def test_parameters_are_bound_not_formatted(project):
    evil = "red'; drop table x; --"
    assert q(project, "top_features_for_label", label=evil) == []
    evil2 = "red' or '1'='1"
    assert q(project, "top_features_for_label", label=evil2) == []
    assert project.report["views"]["features"] == len(q(project, "select * from features"))


def test_connection_is_read_only(project):
    for sql in (
        "create table x as select 1",
        "drop view features",
        "insert into warehouse_info values ('a', 'b')",
    ):
        with pytest.raises(ValueError, match="only queries"):
            q(project, sql)  # refused before it runs ...
        con = duckdb.connect(str(project.db), read_only=True)
        try:
            with pytest.raises(duckdb.Error, match="read-only"):
                con.execute(sql)  # ... and the connection is read-only besides
        finally:
            con.close()
    assert len(q(project, "select * from features")) == 2 * D_SAE


def test_errors_are_clear(project, tmp_path):
    with pytest.raises(ValueError, match="did you mean top_features_for_label"):
        q(project, "top_feature_for_label", label="red")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lable'\]"):
        q(project, "top_features_for_label", lable="red")
    with pytest.raises(ValueError, match=r"missing required parameter\(s\) \['label'\]"):
        q(project, "top_features_for_label")
    with pytest.raises(ValueError, match="parameter limit: expected integer, got 'ten'"):
        q(project, "top_features_for_label", label="red", limit="ten")
    with pytest.raises(ValueError, match="missing"):
        q(project, "select * from features where run = $run")
    with pytest.raises(FileNotFoundError, match="nope.duckdb"):
        run_query(tmp_path / "nope.duckdb", "compare_runs", {})
    with pytest.raises(ValueError, match="fmt"):
        q(project, "compare_runs", fmt="xml")


def test_ad_hoc_sql_binds_string_parameters(project):
    rows = q(
        project,
        "select count(*) as n from features where run = $run and feature < $f",
        run="relu_b",
        f="2",
    )
    assert rows == [{"n": 2}]


def test_formats(project):
    table = q(project, "best_feature_per_concept", fmt="table", run="relu_a")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "label", "feature"] and len(lines) == 3
    csv = q(project, "best_feature_per_concept", fmt="csv", run="relu_a")
    df = pd.read_csv(io.StringIO(csv))
    assert list(df.label) == ["circle", "red"] and list(df.feature) == [1, 0]
    js = q(project, "feature_exemplars", run="relu_a", feature="1")
    assert isinstance(js[0]["image_labels"], list)
    empty = q(project, "top_features_for_label", fmt="table", label="blue")
    assert "(0 rows)" in empty and "auroc" in empty
    nulls = q(
        project, "select feature, mean_act from features where run = 'relu_a' and n_fires = 0"
    )
    assert nulls == [{"feature": 3, "mean_act": None}]


def test_every_query_documents_its_parameters():
    specs = {s.name: s for s in list_queries(SQL_DIR)}
    for name in (
        "top_features_for_label",
        "best_feature_per_concept",
        "dead_and_dense",
        "frequency_value",
        "feature_exemplars",
        "intervention_summary",
        "intervention_controls",
        "intervention_specificity",
    ):
        assert name in specs, name
    for name, description, params in specs.values():
        assert description, name
        assert all(p.description for p in params), name
    top = {p.name: p for p in specs["top_features_for_label"].params}
    assert top["label"].required and top["label"].type == "varchar"
    assert (
        not top["limit"].required and top["limit"].default == 10 and top["limit"].type == "integer"
    )
    assert not top["run"].required and top["run"].default is None


def test_undocumented_parameter_is_refused(tmp_path):
    path = tmp_path / "bad.sql"
    path.write_text("-- A query.\n-- param a: a thing\nselect $a, $b\n")
    with pytest.raises(ValueError, match="differ"):
        parse_query(path)


def test_views_mode_reads_the_parquet_at_query_time(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project.root)  # views read their Parquet relative to where one runs
    db = tmp_path / "v.duckdb"
    build_warehouse(db, root=project.root, sql_dir=SQL_DIR, materialize=False)
    con = duckdb.connect(str(db), read_only=True)
    try:
        kinds = dict(
            con.execute(
                "select view_name, 'view' from duckdb_views() where not internal "
                "union all select table_name, 'table' from duckdb_tables()"
            ).fetchall()
        )
    finally:
        con.close()
    assert kinds["features"] == kinds["top_examples"] == "view"
    assert kinds["feature_matches"] == "table"  # computed in Python, always stored
    got = run_query(db, "best_feature_per_concept", {}, "json", project.root, SQL_DIR)
    assert json.loads(got) == q(project, "best_feature_per_concept")


def test_views_work_from_duckdb_started_in_root(project, monkeypatch):
    monkeypatch.chdir(project.root)
    con = duckdb.connect(str(project.db.relative_to(project.root)), read_only=True)
    try:
        assert con.execute("select count(*) from features").fetchall() == [(2 * D_SAE,)]
    finally:
        con.close()


def test_cli(project, capsys, tmp_path):
    db = str(project.db)
    common = ["--db", db, "--root", str(project.root), "--sql-dir", str(SQL_DIR)]
    assert (
        main(
            [
                "top_features_for_label",
                "--param",
                "label=red",
                "-p",
                "limit=1",
                "--format",
                "json",
                *common,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 1 and out[0]["auroc"] == 1.0
    assert main(["top_features_for_label", *common]) == 2
    assert "missing required parameter" in capsys.readouterr().err
    assert main(["--list", *common]) == 0
    listing = capsys.readouterr().out
    assert "top_features_for_label:" in listing and "--param label=<varchar>" in listing
    # without --root: the root recorded at build time is used
    assert main(["compare_runs", "--db", db, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run,backbone")
    assert (
        main_build(
            [
                "--db",
                str(tmp_path / "x.duckdb"),
                "--root",
                str(project.root),
                "--sql-dir",
                str(SQL_DIR),
            ]
        )
        == 0
    )
    assert "features" in capsys.readouterr().out and (tmp_path / "x.duckdb").exists()


def test_feature_matches_pair_features_by_decoder_and_exemplars(project):
    # relu_a's features read dims (0, 1, 2), relu_b's (2, 0, 1): a0 = b1, a1 = b2, a2 = b0
    rows = q(
        project,
        "select feature_a, feature_b, decoder_cos, exemplar_jaccard from feature_matches "
        "where run_a = 'relu_a' and run_b = 'relu_b' and decoder_rank = 1 order by feature_a",
    )
    got = {r["feature_a"]: r["feature_b"] for r in rows}
    assert [got[0], got[1], got[2]] == [1, 2, 0]
    for r in rows[:3]:
        # same direction, same codes, so the same exemplar images
        assert r["decoder_cos"] == pytest.approx(1.0) and r["exemplar_jaccard"] == 1.0
    assert rows[3]["decoder_cos"] == 0.0  # the dead feature has a zero decoder
    # both directions are there, and a named query lists one feature's partners
    back = q(project, "feature_matches", run="relu_b", feature="1")
    assert back[0]["run_b"] == "relu_a" and back[0]["feature_b"] == 0
    assert back[0]["decoder_rank"] == 1 and back[0]["exemplar_rank"] == 1


def test_features_without_counterpart(project, tmp_path):
    # a third run whose features read (1, 1, 2): nothing reads dim 0, the red dimension
    root = tmp_path / "p"
    shutil.copytree(project.root, root)
    ref = project.stats["relu_a"]
    from saev_core.stats.tables import write_stats as write

    image_id, token, _, _, acts = toy_data()
    st = compute_stats(
        encoder([1, 1, 2]), [(image_id, token, acts)], None, [], 1, StatsConfig(n_top=3),
        "relu_c", progress=False,
    )  # fmt: skip
    write(
        st, root / "artifacts" / "stats" / "relu_c", {"run": "relu_c", "sae_dir": "c", "d_sae": 4}
    )
    save_decoder(root / "c", encoder([1, 1, 2]))
    db = root / "w.duckdb"
    build_warehouse(db, root=root, sql_dir=SQL_DIR)

    def ask(**params):
        out = run_query(db, "features_without_counterpart", params, "json", root, SQL_DIR)
        return json.loads(out)

    assert ref.auroc[ref.label_names.index("red"), 0] == 1.0
    # in relu_b the red detector (a0) has its twin b1
    assert ask(run="relu_a", other_run="relu_b", label="red") == []
    lone = ask(run="relu_a", other_run="relu_c", label="red", max_overlap="1.01")
    assert [r["feature"] for r in lone] == [0]
    assert lone[0]["best_decoder_cos"] == pytest.approx(0.0, abs=1e-6)
    # circle (a1 reads dim 1) has counterparts c0 and c1
    assert ask(run="relu_a", other_run="relu_c", label="circle", max_overlap="1.01") == []
    with pytest.raises(ValueError, match="unknown run 'relu_d'.*did you mean"):
        ask(run="relu_a", other_run="relu_d", label="red")


def test_semantic_breadth_and_neighbors(project):
    images = pd.read_parquet(project.root / "artifacts/activations/toy/images.parquet")
    labels_of = dict(zip(images.image_id, images["labels"].map(list), strict=True))
    st = project.stats["relu_a"]
    rows = q(project, "semantic_breadth", run="relu_a", min_exemplars="1")
    assert {r["feature"] for r in rows} == {0, 1, 2}  # the dead feature has no exemplars
    for r in rows:
        ex = [labels_of[i] for i in st.top_image[r["feature"]] if i >= 0]
        spanned = {x for labels in ex for x in labels}
        assert r["n_labels_spanned"] == len(spanned) and r["n_exemplars"] == len(ex)
        top = max(sorted(spanned), key=lambda x: sum(x in labels for labels in ex))
        assert r["top_label"] == top
        assert r["top_label_share"] == pytest.approx(sum(top in e for e in ex) / len(ex))
    spans = [r["n_labels_spanned"] for r in rows]
    assert spans == sorted(spans, reverse=True)
    nb = q(project, "feature_neighbors", run="relu_a", feature="0")
    assert [r["rank"] for r in nb] == list(range(1, len(nb) + 1)) and nb
    assert nb[0]["best_label"] in ("red", "circle") and nb[0]["cosine"] == 0.0


def test_image_level_ranking_and_bad_parameters(project):
    rows = q(project, "top_features_for_label", label="red", run="relu_a", level="image")
    aurocs = [r["image_auroc"] for r in rows if r["image_auroc"] is not None]
    assert aurocs == sorted(aurocs, reverse=True) and "precision_at_select" in rows[0]
    assert "oracle_precision" in rows[0] and "precision" not in rows[0]
    with pytest.raises(ValueError, match="level must be patch or image"):
        q(project, "top_features_for_label", label="red", level="pixel")
    with pytest.raises(ValueError, match="unknown run 'relu_x'.*relu_a, relu_b"):
        q(project, "feature_exemplars", run="relu_x", feature="0")
    with pytest.raises(ValueError, match="parameter feature: expected integer"):
        q(project, "feature_exemplars", run="relu_a", feature="1.5")


ESCAPES = (
    "copy (select 42 as x) to '{out}/copied.csv'",
    "copy features to '{out}/features.parquet' (format parquet)",
    "export database '{out}/exported'",
    "select * from read_csv('{secret}')",
    "select * from read_text('{secret}')",
    "select * from read_blob('{secret}')",
    "select * from read_parquet('{other}')",
    "select * from '{other}'",
    "select * from read_parquet('artifacts/stats/../../elsewhere/other.parquet')",
    "select * from glob('{out}/*')",
    "attach '{out}/other.duckdb' as other",
    "install httpfs",
    "load httpfs",
    "set enable_external_access = true",
    "reset enable_external_access",
    "set allowed_directories = ['/']",
    "set lock_configuration = false",
    "pragma enable_external_access = true",
    "set autoload_known_extensions = true",
    "set file_search_path = '/'",
    "set profiling_output = '{out}/profile.json'",
    # one statement that unlocks and then escapes
    "set lock_configuration = false; copy (select 1) to '{out}/two.csv'",
    "select 1 as a; copy (select 1) to '{out}/after.csv'",
    # views mode leaves the sources' directories readable: not writable
    "copy (select 42 as x) to '{stats}/evil.csv'",
    "explain analyze copy (select 42 as x) to '{stats}/evil2.csv'",
)


# What DuckDB says when the sandbox, and not some other error, stops a statement.
SANDBOXED = "disabled by configuration|configuration has been locked|disabled through configuration"


@pytest.mark.parametrize("materialize", [True, False])
def test_user_sql_is_sandboxed(project, tmp_path, materialize, monkeypatch):
    """Each escape from the warehouse fails and writes nothing; the warehouse still answers."""
    monkeypatch.chdir(project.root)  # views mode reads its Parquet relative to the root
    db = tmp_path / "w.duckdb"
    build_warehouse(db, root=project.root, sql_dir=SQL_DIR, materialize=materialize)
    out = tmp_path / "out"
    out.mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    elsewhere = project.root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    other = elsewhere / "other.parquet"
    pq.write_table(pa.table({"a": [1]}), other)
    assert duckdb.sql(f"select * from read_csv('{secret}')").fetchall() == [(1, 2)]  # readable
    stats = project.root / "artifacts" / "stats"
    before = sorted(os.listdir(stats))
    for sql in ESCAPES:
        text = sql.format(out=out, secret=secret, other=other, stats=stats)
        with pytest.raises(ValueError, match=f"refused: only queries|{SANDBOXED}"):
            run_query(db, text, {}, "json", project.root, SQL_DIR)
        if "{stats}" in sql:
            continue  # only the statement filter stops a write where views mode may read
        # the sandboxed connection alone, without the statement filter, refuses the rest too
        con = duckdb.connect(str(db), read_only=True, config=sandbox._SANDBOX_CONFIG)
        try:
            con.execute("set file_search_path = $root", {"root": str(project.root)})
            sandbox._sandbox(con, project.root, SQL_DIR)
            with pytest.raises(duckdb.Error, match=SANDBOXED):
                con.execute(text).fetchall()
        finally:
            con.close()
    assert sorted(os.listdir(out)) == [] and sorted(os.listdir(stats)) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "secret.csv", "w.duckdb"]
    # the CLI refuses too, and says why
    assert main(["--db", str(db), f"copy (select 42) to '{out}/cli.csv'"]) == 2
    assert not (out / "cli.csv").exists()
    # what the warehouse is for still works: views, named queries, the project's own Parquet
    # (views mode reads it at query time)
    got = run_query(db, "best_feature_per_concept", {}, "json", project.root, SQL_DIR)
    assert json.loads(got) == q(project, "best_feature_per_concept") != []
    n = json.loads(run_query(db, "select count(*) as n from features", {}, "json", project.root))
    assert n == [{"n": 2 * D_SAE}]
    setting = run_query(
        db, "select current_setting('enable_external_access') as on", {}, "json", project.root
    )
    assert json.loads(setting) == [{"on": False}]


def test_duplicate_run_names_fail_the_build(project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project.root, root)
    shutil.copytree(root / "artifacts/stats/relu_a", root / "artifacts/stats/relu_a_copy")
    db = root / "w.duckdb"
    with pytest.raises(ValueError, match=r"'relu_a' in .*relu_a/run.parquet.*relu_a_copy/run"):
        build_warehouse(db, root=root, sql_dir=SQL_DIR)
    assert not db.exists() and not Path(f"{db}.tmp").exists()
    assert main_build(["--db", str(db), "--root", str(root), "--sql-dir", str(SQL_DIR)]) == 2


def test_database_holds_no_absolute_path_and_moves_with_the_project(project, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(project.root, root)
    shutil.copytree(SQL_DIR, root / "sql")
    for materialize in (True, False):
        db = root / "warehouse" / "saev.duckdb"
        build_warehouse(db, root=root, sql_dir="sql", materialize=materialize)
        con = duckdb.connect(str(db), read_only=True)
        try:
            con.execute("set file_search_path = $root", {"root": str(root)})
            names = [r[0] for r in con.execute("select table_name from duckdb_tables()").fetchall()]
            text = repr([con.execute(f"select * from {n}").fetchall() for n in names])
            text += repr(
                con.execute("select sql from duckdb_views() where not internal").fetchall()
            )
        finally:
            con.close()
        assert "src_runs" in names or not materialize
        i = text.find(str(tmp_path))
        assert i < 0, text[max(0, i - 300) : i + 100]
        assert "artifacts/stats/" in text
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    monkeypatch.chdir(tmp_path)
    got = run_query(moved / "warehouse" / "saev.duckdb", "best_feature_per_concept", {}, "json")
    assert json.loads(got) == q(project, "best_feature_per_concept") != []


def test_views_mode_opens_no_folder_of_the_working_directory(project, tmp_path, monkeypatch):
    """Run from a folder that has its own artifacts/stats/, a views-mode warehouse must not read
    it (DuckDB checks relative paths against the working directory), and says where to run."""
    db = tmp_path / "w.duckdb"
    build_warehouse(db, root=project.root, sql_dir=SQL_DIR, materialize=False)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "artifacts" / "stats").mkdir(parents=True)
    (elsewhere / "artifacts" / "stats" / "secret.txt").write_text("not the warehouse's")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match="Permission Error"):
        run_query(db, "select content from read_text('artifacts/stats/secret.txt')", {}, "json")
    with pytest.raises(ValueError, match=f"run from {project.root}"):
        run_query(db, "best_feature_per_concept", {}, "json", project.root, SQL_DIR)
    monkeypatch.chdir(tmp_path)  # no folder of that name here: the views read the root's files
    got = run_query(db, "best_feature_per_concept", {}, "json", project.root, SQL_DIR)
    assert json.loads(got) == q(project, "best_feature_per_concept") != []
