"""Hypotheses as data, run against controls: a feature with a known effect is detected, a feature
with none is reported as having none, and the flow logs it all to MLflow and the warehouse.

The world is set by hand: the tiny classifier's head reads `blue` along a unit vector `u`, and an
SAE at its last block has feature 0 with decoder direction `u`, features 1-6 orthogonal to it and
feature 7 dead (its encoder bias is hugely negative, so it never fires).
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from saev_core.hypotheses import (
    Cache,
    Hypothesis,
    Settings,
    batch_hypotheses,
    frequency_matched,
    run_hypothesis,
)
from saev_core.intervene import InterveneConfig
from saev_core.sae import SAE, SAEConfig

D = 32


@pytest.fixture(scope="module")
def world(tiny_vit, tiny_world, tmp_path_factory):
    from transformers import AutoImageProcessor, ViTForImageClassification

    root = tmp_path_factory.mktemp("hyp")
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    u = basis[:, 0]
    model = ViTForImageClassification.from_pretrained(tiny_vit)
    j = model.config.label2id["blue"]
    with torch.no_grad():
        model.classifier.weight[j] = 2.0 * u
        model.classifier.bias[j] = 0.0
    model.save_pretrained(root / "clf")
    AutoImageProcessor.from_pretrained(tiny_vit).save_pretrained(root / "clf")

    sae = SAE(SAEConfig(arch="relu", d_model=D, d_sae=8))
    with torch.no_grad():
        sae.W_dec.copy_(basis[:, :8].T)  # row 0 = u, rows 1-7 orthogonal to it
        sae.W_enc.copy_(basis[:, :8])
        sae.b_enc.zero_()
        sae.b_enc[7] = -1e4  # dead
    sae.save(root / "sae", extra={"layer": 1, "manifest_sha256": "m" * 8})

    stats = root / "stats"
    stats.mkdir()
    freq = [0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.0]
    pd.DataFrame({"feature": range(8), "freq": freq, "max_act": [1.0] * 7 + [0.0]}).to_parquet(
        stats / "features.parquet"
    )
    pd.DataFrame(
        {
            "run": "hyp",
            "feature": [0, 1, 2, 3, 4],
            "label": ["blue", "blue", "red", "red", "yellow"],
            "auroc": [0.95, 0.6, 0.7, 0.8, 0.7],
        }
    ).to_parquet(stats / "feature_labels.parquet")
    base = dict(
        model=str(root / "clf"),
        sae_dir=str(root / "sae"),
        stats_dir=str(stats),
        data=str(tiny_world),
        split="train",
        images="all",
    )
    return root, base


def settings(**kw):
    return Settings(**{"n_bootstrap": 200, "n_grid": 2, "n_candidates": 1, **kw})


def test_known_effect_is_detected_and_beats_controls(world):
    _, base = world
    h = Hypothesis(
        target="blue",
        op="add",
        relative=False,
        strengths=(0.0, 40.0),
        scope="cls",
        **base,
    )
    result = run_hypothesis(h, Cache(settings()))
    zero, strong = result.rows
    # best feature for blue (by AUROC) from the stats Parquet; control = nearest in frequency
    assert strong["feature"] == 0 and strong["auroc"] == pytest.approx(0.95)
    # stats without splits: the row says it was chosen and reported on the same block
    assert strong["select_split"] is None and strong["select_auroc"] == pytest.approx(0.95)
    assert strong["control_feature"] == 1
    assert zero["delta"] == pytest.approx(0.0, abs=1e-6)  # adding 0 changes nothing
    # adding 40 u to CLS: the head reads blue along u, so p(blue) goes to ~1 everywhere
    assert strong["p_after"] > 0.99 and strong["delta"] > 0.2
    assert strong["delta_lo"] > strong["control_delta_hi"]
    assert strong["delta_lo"] > strong["direction_delta_hi"]
    assert 0 < strong["target_change_rate"] <= 1  # the images where blue was off flip on
    assert abs(strong["noedit_delta"]) < 1e-5 and strong["noedit_max_abs_dp"] < 1e-4
    assert len(result.figures) == 2


def test_dead_feature_has_no_effect_and_controls_say_so(world):
    _, base = world
    h = Hypothesis(target="blue", features=(7,), op="suppress", **base)
    (row,) = run_hypothesis(h, Cache(settings())).rows  # suppress: one strength
    for key in ("delta", "delta_lo", "delta_hi", "target_change_rate", "other_change_rate"):
        assert row[key] == pytest.approx(0.0, abs=1e-6), key
    # the direction control moves x as far as the edit did: not at all
    assert row["direction_delta"] == pytest.approx(0.0, abs=1e-6)
    assert row["dx_norm"] == 0.0 and not row["below_control"]


def test_orthogonal_feature_edit_is_not_read_by_the_target(world):
    _, base = world
    # feature 3's decoder row is orthogonal to u; clamping it on CLS changes x, and so the
    # layer norm's scale, but not in a direction the blue head reads; the known edit does
    h = Hypothesis(target="blue", features=(3,), op="clamp", relative=False, strengths=(3.0,),
                   scope="cls", **base)  # fmt: skip
    (row,) = run_hypothesis(h, Cache(settings(controls=()))).rows
    known = Hypothesis(target="blue", features=(0,), op="clamp", relative=False,
                       strengths=(3.0,), scope="cls", **base)  # fmt: skip
    (k,) = run_hypothesis(known, Cache(settings(controls=()))).rows
    assert row["dx_norm"] > 0
    assert abs(row["delta"]) < 0.1 < k["delta"]


def test_frequency_matched_controls():
    features = pd.DataFrame({"feature": range(6), "freq": [0.5, 0.01, 0.011, 0.2, 0.0, 0.009]})
    rng = np.random.default_rng(0)
    picks = {frequency_matched(features, [1], rng, n_candidates=2)[0] for _ in range(20)}
    assert picks == {2, 5}  # the two nearest in log-frequency; never the dead one or itself


def test_hypotheses_from_params_and_yaml(world, tmp_path):
    _, base = world
    f = tmp_path / "hyps.yaml"
    f.write_text(
        yaml.safe_dump({"hypotheses": [{"target": "red", "features": [2], "scope": "patches"}]})
    )
    cfg = InterveneConfig(
        batch=False, hypotheses=({"target": "blue", "op": "scale", "strengths": [0.5]},),
        hypotheses_file=str(f), **{k: v for k, v in base.items() if k != "images"},
    )  # fmt: skip
    hs = cfg.extra_hypotheses()
    assert [(h.target, h.op, h.features, h.scope) for h in hs] == [
        ("blue", "scale", (), "all"),
        ("red", "clamp", (2,), "patches"),
    ]
    assert hs[0].sae_dir == base["sae_dir"]  # defaults from the section
    f.write_text(yaml.safe_dump([{"target": "red", "feature": 2}]))
    with pytest.raises(ValueError, match="unknown key.*feature"):
        cfg.extra_hypotheses()
    with pytest.raises(ValueError, match="bbox"):
        Hypothesis(target="red", scope="region")
    batch = batch_hypotheses(hs[0], ["red", "blue"])
    assert [(h.target, h.best_for, h.features) for h in batch] == [
        ("red", "red", ()),
        ("blue", "blue", ()),
    ]


@pytest.mark.slow
def test_flow_logs_nested_runs_and_feeds_the_warehouse(world, tiny_vit, tiny_world, tmp_path,
                                                       prefect_harness, monkeypatch):  # fmt: skip
    import mlflow

    from flows.intervene import intervene_flow
    from flows.probe import probe_task
    from saev_core.probes import ProbeConfig
    from saev_core.warehouse import build_warehouse, run_query

    root, base = world
    probe_dir = tmp_path / "probes"
    probe_task.fn(
        ProbeConfig(model=str(tiny_vit), data=str(tiny_world), out_dir=str(probe_dir),
                    seg_classes=("red", "green", "blue", "yellow"), epochs=2)
    )  # fmt: skip
    out = tmp_path / "artifacts" / "interventions" / "hyp"
    section = {
        **{k: v for k, v in base.items() if k != "images"},
        "out_dir": str(out),
        "batch": True,
        "concepts": ["red", "yellow", "nothing-like-this"],
        "strengths": [0.0, -2.0],
        "n_bootstrap": 50,
        "n_grid": 2,
        "hypotheses": [
            {"name": "yellow-seg", "target": "yellow", "task": "probe", "model": str(tiny_vit),
             "probe_dir": str(probe_dir / "segmentation"), "scope": "target",
             "strengths": [-2.0]},
        ],
    }  # fmt: skip
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"intervene": section}))
    monkeypatch.chdir(tmp_path)  # the flow writes metrics/intervene.json where it runs
    rows = intervene_flow(params=str(params))
    summary = json.loads((tmp_path / "metrics" / "intervene.json").read_text())
    # every hypothesis at every strength it ran, hand-written ones included
    assert {h: sorted(v) for h, v in summary.items()} == {
        "red": ["-2", "0"],
        "yellow": ["-2", "0"],
        "yellow-seg": ["-2"],
    }
    names = [r["experiment"] for r in rows]
    # the unknown label is skipped, the others run at every strength, the probe at one
    assert names == ["red@0", "red@-2", "yellow@0", "yellow@-2", "yellow-seg@-2"]
    seg = rows[-1]
    assert seg["task"] == "probe:segmentation" and np.isfinite(seg["miou_before"])
    assert set(json.loads(seg["class_pixel_change"])) == {
        "background",
        "red",
        "green",
        "blue",
        "yellow",
    }

    runs = mlflow.search_runs(experiment_names=["intervene"], output_format="list")
    parent = [r for r in runs if r.info.run_name == "hyp"][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(names)
    child = children[0]
    assert child.data.tags["manifest_sha256"] == "m" * 8 and "git_commit" in child.data.tags
    assert "delta" in child.data.metrics and "control_delta" in child.data.metrics
    client = mlflow.MlflowClient()
    assert "before_after.png" in [a.path for a in client.list_artifacts(child.info.run_id)]
    assert "dose_response.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    # the warehouse's interventions view reads results.parquet, new columns and old
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[1] / "sql", tmp_path / "sql")
    db = tmp_path / "w.duckdb"
    build_warehouse(db, root=tmp_path, sql_dir="sql")
    table = json.loads(
        run_query(db, "intervention_controls", {"run": "hyp"}, fmt="json", root=tmp_path)
    )
    assert len(table) == 5 and {"random_feature", "random_direction", "miou_delta"} <= set(table[0])
    # the view's verdicts read the columns the runner writes (none left null by a name mismatch)
    assert all(r["below_controls"] is not None for r in table)
    seg_row = [r for r in table if r["hypothesis"] == "yellow-seg"]
    assert len(seg_row) == 1 and seg_row[0]["miou_delta"] is not None
    old = json.loads(
        run_query(db, "intervention_summary", {"run": "hyp"}, fmt="json", root=tmp_path)
    )
    assert len(old) == 5 and "control_delta" in old[0]
    assert all(r["control_lo"] is not None and r["below_control"] is not None for r in old)


def test_best_feature_by_patch_or_image_auroc(tmp_path):
    from saev_core.hypotheses import best_features

    pd.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "label": ["tri", "tri", "tri", "sq"],
            # feature 0: dense, fires a little more on triangle patches, useless per image
            "auroc": [0.88, 0.69, 0.69, 0.9],
            "image_auroc": [0.52, 0.95, 0.97, 0.9],
        }
    ).to_parquet(tmp_path / "feature_labels.parquet")
    by_patch = Hypothesis(target="tri", stats_dir=str(tmp_path))
    # stats without splits: chosen and reported on the one block
    c = best_features(by_patch, "tri", 1)
    assert (c.features, c.auroc, c.select_auroc, c.select_split) == ([0], 0.88, 0.88, None)
    by_image = Hypothesis(target="tri", stats_dir=str(tmp_path), select_by="image")
    assert best_features(by_image, "tri", 2)[:2] == ([2, 1], 0.97)
    with pytest.raises(ValueError, match="select_by"):
        Hypothesis(target="tri", select_by="token")


def test_best_features_are_chosen_on_the_select_split_and_reported_on_the_other(tmp_path):
    """val's best feature (0) is edited, with its test AUROC; test's best (1) is not picked;
    the parquet path and the warehouse path agree; the rows record the splits and control."""
    import shutil
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from saev_core.hypotheses import best_features
    from saev_core.warehouse import build_warehouse

    stats = tmp_path / "artifacts" / "stats" / "hyp"
    stats.mkdir(parents=True)
    pd.DataFrame(
        {
            "run": "hyp",
            "split": ["val"] * 3 + ["test"] * 3,
            "feature": [0, 1, 2] * 2,
            "label": "tri",
            "auroc": [0.9, 0.8, 0.6, 0.7, 0.95, 0.5],
            "image_auroc": [0.6, 0.85, 0.7, 0.9, 0.8, 0.75],
        }
    ).to_parquet(stats / "feature_labels.parquet")
    pd.DataFrame(
        {"run": "hyp", "split": ["val", "test"], "label": "tri", "d_sae": 3,
         "control_auroc": [0.61, 0.58], "control_image_auroc": [0.66, 0.64]}
    ).to_parquet(stats / "label_controls.parquet")  # fmt: skip
    pq.write_table(
        pa.table({"run": ["hyp"], "select_split": ["val"], "report_split": ["test"]}),
        stats / "run.parquet",
    )
    pd.DataFrame({"run": "hyp", "feature": [0, 1, 2], "freq": 0.1}).to_parquet(
        stats / "features.parquet"
    )
    by_patch = Hypothesis(target="tri", stats_dir=str(stats))
    want = ([0, 1], 0.7, "val", 0.9, "test", 0.61)
    assert tuple(best_features(by_patch, "tri", 2)) == want
    by_image = Hypothesis(target="tri", stats_dir=str(stats), select_by="image")
    assert tuple(best_features(by_image, "tri", 1)) == ([1], 0.8, "val", 0.85, "test", 0.66)

    shutil.copytree(Path(__file__).resolve().parents[1] / "sql", tmp_path / "sql")
    db = tmp_path / "w.duckdb"
    build_warehouse(db, root=tmp_path, sql_dir="sql")
    via_db = Hypothesis(target="tri", stats_dir=str(stats), warehouse=str(db))
    got = best_features(via_db, "tri", 2)
    assert got.features == want[0] and got[2:5] == want[2:5]
    assert got.auroc == pytest.approx(0.7) and got.control_auroc == pytest.approx(0.61)


def test_run_refuses_an_sae_of_another_model_or_stats_of_another_sae(world, tmp_path):
    """The provenance checks are on the intervene path: nothing is measured with a mismatch."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    root, base = world
    sae_dir = tmp_path / "sae"
    shutil.copytree(base["sae_dir"], sae_dir)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["extra"]["backbone_sha256"] = "f" * 64  # trained on other weights than clf
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    h = Hypothesis(target="blue", features=(0,), op="suppress", **{**base, "sae_dir": str(sae_dir)})
    with pytest.raises(ValueError, match=f"sha256 {'f' * 64} .*but model .*clf has weights"):
        run_hypothesis(h, Cache(settings()))
    stats = tmp_path / "stats"
    shutil.copytree(base["stats_dir"], stats)
    pq.write_table(
        pa.table({"run": ["hyp"], "cfg_json": [json.dumps({"sae_sha256": "0" * 64})]}),
        stats / "run.parquet",
    )
    h = Hypothesis(target="blue", features=(0,), op="suppress", **{**base, "stats_dir": str(stats)})
    with pytest.raises(ValueError, match=f"computed from an SAE with weights sha256 {'0' * 64}"):
        run_hypothesis(h, Cache(settings()))


def test_run_refuses_another_layer_and_a_stale_warehouse(world, tmp_path):
    """An SAE spliced at a layer it was not trained on, or features chosen in a warehouse whose
    run of that name came from another SAE's stats, are refused before anything is measured."""
    import shutil
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from saev_core.hypotheses import best_features
    from saev_core.warehouse import build_warehouse

    root, base = world
    h = Hypothesis(target="blue", features=(0,), op="suppress", layer=0, **base)
    with pytest.raises(ValueError, match="layer 0 asked, but the SAE .* trained on layer 1"):
        run_hypothesis(h, Cache(settings()))
    stats = tmp_path / "artifacts" / "stats" / "hyp"
    shutil.copytree(base["stats_dir"], stats)
    pq.write_table(
        pa.table({"run": ["hyp"], "cfg_json": [json.dumps({"sae_sha256": "0" * 64})]}),
        stats / "run.parquet",
    )
    shutil.copytree(Path(__file__).resolve().parents[1] / "sql", tmp_path / "sql")
    db = tmp_path / "w.duckdb"
    build_warehouse(db, root=tmp_path, sql_dir="sql")
    h = Hypothesis(target="blue", warehouse=str(db), **{**base, "stats_dir": str(stats)})
    with pytest.raises(ValueError, match=r"run 'hyp' was built from stats of the SAE .* 000000"):
        best_features(h, "blue", 1)
