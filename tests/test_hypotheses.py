"""Hypotheses as data, run against controls: a feature with a known effect is detected, a feature
with none is reported as having none, and the flow logs it all to MLflow and the warehouse.

The world is set by hand: the tiny classifier's head reads `blue` along a unit vector `u`, and an
SAE at its last block has feature 0 with decoder direction `u`, features 1-6 orthogonal to it and
feature 7 dead (its encoder bias is hugely negative, so it never fires).
"""

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from saev_core.hypotheses import (
    Cache,
    Hypothesis,
    InterveneConfig,
    Settings,
    batch_hypotheses,
    frequency_matched,
    run_hypothesis,
)
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
    from saev_core.plots import _plt

    plt = _plt()
    plt.close("all")
    result = run_hypothesis(h, Cache(settings()))
    # its figures are not held open by pyplot (a run keeps one per hypothesis x strength until
    # it logs them: 24 in the demo, past pyplot's warning at 20), and still render
    assert plt.get_fignums() == []
    result.figures[0].savefig(io.BytesIO(), format="png")
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
    # the random features it is compared with barely move blue either: no verdict
    assert row["dx_norm"] == 0.0 and abs(row["vs_control"]) < 1e-3
    assert row["alternative"] == "less" and row["verdict"] == "not supported"


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
    assert all(r["verdict"] in ("supported", "not supported") for r in table)
    assert all(r["p_adjusted"] is not None and r["n_controls"] == 20 for r in table)
    assert all(r["eval_split"] == "train" and r["control_lo"] is not None for r in table)
    seg_row = [r for r in table if r["hypothesis"] == "yellow-seg"]
    assert len(seg_row) == 1 and seg_row[0]["miou_delta"] is not None
    old = json.loads(
        run_query(db, "intervention_summary", {"run": "hyp"}, fmt="json", root=tmp_path)
    )
    assert len(old) == 5 and "control_delta" in old[0]
    assert all(r["control_lo"] is not None and r["verdict"] is not None for r in old)


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


def test_increase_is_tested_as_an_increase_against_many_controls(world):
    """add 40 u on CLS raises p(blue): auto tests for an increase (the old one-sided 'below'
    could never pass it), against 10 random features and 10 random directions; the same edit
    tested for a decrease is not supported."""
    _, base = world
    h = Hypothesis(target="blue", features=(0,), op="add", relative=False, strengths=(0.0, 40.0),
                   scope="cls", **base)  # fmt: skip
    zero, strong = run_hypothesis(h, Cache(settings(n_candidates=32))).rows
    assert strong["alternative"] == "greater" and zero["alternative"] == "two-sided"
    assert strong["n_controls"] == 20
    sets = strong["control_features"].split(";")
    assert len(sets) == 10 and len(set(sets[:6])) == 6  # 6 alive candidates, then cycled
    assert strong["control_lo"] <= strong["control_median"] <= strong["control_hi"]
    assert strong["delta"] > strong["control_hi"] and strong["control_rank_p"] == 1 / 21
    assert strong["vs_control_lo"] > 0 and strong["p_value"] < 0.01
    # Holm over this hypothesis's two strengths; adding 0 changes nothing: p = 1
    assert zero["p_value"] == 1.0 and zero["verdict"] == "not supported"
    assert strong["p_adjusted"] == pytest.approx(min(1.0, 2 * strong["p_value"]))
    assert strong["verdict"] == "supported" and strong["correction"] == "holm"
    down = Hypothesis(**{**h.__dict__, "alternative": "less", "strengths": (40.0,)})
    (row,) = run_hypothesis(down, Cache(settings())).rows
    assert (
        row["alternative"] == "less" and row["p_value"] > 0.9 and row["verdict"] == "not supported"
    )


def test_p_value_and_specificity_match_plain_forwards_and_scipy(world):
    """The runner's paired p-value equals scipy's exact permutation test on per-image
    differences computed here from one plain spliced forward per condition; its specificity
    rows are each concept's mean change in probability from the same forwards."""
    from scipy import stats

    from saev_core.intervene import FeatureEdit, Splice, scope_tokens

    _, base = world
    st = settings(controls=("random_feature",), n_control_features=3, n_candidates=4)
    cache = Cache(st)
    h = Hypothesis(target="blue", features=(3,), op="clamp", relative=False, strengths=(3.0,),
                   scope="cls", alternative="two-sided", **base)  # fmt: skip
    result = run_hypothesis(h, cache)
    (row,) = result.rows
    reader = cache.reader(h)
    es = cache.evalset(h, reader)
    sae = cache.sae(h.sae_dir)
    j, cls = reader.labels.index("blue"), scope_tokens(reader.layout, "cls")

    def probs(feats):
        sp = Splice(1, sae, FeatureEdit("clamp", tuple(feats), 3.0), cls)
        return reader.probs(es.pixels, 64, [sp])

    p0 = es.p_before
    p_edit = probs([3])
    controls = [probs([int(f) for f in s.split(",")]) for s in row["control_features"].split(";")]
    assert row["n_controls"] == 3 and len(controls) == 3
    d = (p_edit[:, j] - p0[:, j]) - np.mean([c[:, j] - p0[:, j] for c in controls], axis=0)
    want = stats.permutation_test((d,), np.mean, permutation_type="samples",
                                  alternative="two-sided", n_resamples=9999).pvalue  # fmt: skip
    assert want < 0.01  # every image agrees here (tiny world); mixed cases: test_verdicts.py
    assert row["p_value"] == pytest.approx(want, rel=1e-9)
    assert row["vs_control"] == pytest.approx(d.mean(), abs=1e-6)
    ci = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=5000).confidence_interval
    assert row["vs_control_lo"] == pytest.approx(ci.low, abs=0.01)
    assert row["vs_control_hi"] == pytest.approx(ci.high, abs=0.01)

    spec = result.specificity
    assert [r["concept"] for r in spec] == reader.labels
    assert set(spec[0]) >= {"experiment", "hypothesis", "edited_concept", "strength", "concept",
                            "delta", "delta_lo", "delta_hi"}  # fmt: skip
    want_delta = (p_edit - p0).mean(0)
    np.testing.assert_allclose([r["delta"] for r in spec], want_delta, atol=1e-6)
    assert all(r["delta_lo"] - 1e-9 <= r["delta"] <= r["delta_hi"] + 1e-9 for r in spec)
    assert spec[j]["delta"] == pytest.approx(row["delta"])
    others = np.delete(want_delta, j)
    assert row["off_target_abs_delta"] == pytest.approx(np.abs(others).mean(), abs=1e-6)


def test_run_all_corrects_over_every_hypothesis_and_strength(world, tmp_path):
    from saev_core.hypotheses import run_all, write_results

    _, base = world
    hs = [
        Hypothesis(target="blue", features=(0,), op="add", relative=False,
                   strengths=(5.0, 40.0), scope="cls", name="up", **base),
        Hypothesis(target="blue", features=(3,), op="clamp", relative=False, strengths=(3.0,),
                   scope="cls", alternative="two-sided", name="ortho", **base),
    ]  # fmt: skip
    for method in ("holm", "bh"):
        seen = []
        results = run_all(hs, Cache(settings(correction=method)), on_result=seen.append)
        rows = [r for res in results for r in res.rows]
        assert [r["p_adjusted"] for res in seen for r in res.rows] == [
            r["p_adjusted"] for r in rows
        ]
        p = np.array([r["p_value"] for r in rows])
        m, order = len(p), np.argsort(p)
        want = np.empty(m)
        if method == "holm":  # the definition, step by step
            running = 0.0
            for rank, i in enumerate(order):
                running = max(running, min(1.0, (m - rank) * p[i]))
                want[i] = running
        else:
            for rank, i in enumerate(order):
                want[i] = min(
                    min(1.0, m * p[k] / (r + 1)) for r, k in enumerate(order) if r >= rank
                )
        np.testing.assert_allclose([r["p_adjusted"] for r in rows], want)
        assert all(r["correction"] == method for r in rows)
        for r in rows:
            ok = r["p_adjusted"] < 0.05 and (r["delta"] > 0) == (r["alternative"] != "less")
            # beyond the controls' 95% range the tested way (the lead's stricter verdict)
            beyond = {"less": r["delta"] < r["control_lo"],
                      "greater": r["delta"] > r["control_hi"],
                      "two-sided": not r["control_lo"] <= r["delta"] <= r["control_hi"]}  # fmt: skip
            assert r["beyond_controls"] is beyond[r["alternative"]]
            assert (r["verdict"] == "supported") == (ok and beyond[r["alternative"]])
    assert rows[1]["verdict"] == "supported"  # add 40 u beats its controls after correction
    assert rows[1]["beyond_controls"] is True

    write_results(rows, tmp_path, "hyp", [s for res in results for s in res.specificity])
    spec = pd.read_parquet(tmp_path / "specificity.parquet")
    assert list(spec.columns[:9]) == ["run", "experiment", "hypothesis", "edited_concept",
                                      "strength", "concept", "delta", "delta_lo", "delta_hi"]  # fmt: skip
    assert len(spec) == 3 * 8 and set(spec["run"]) == {"hyp"}
    res = pd.read_parquet(tmp_path / "results.parquet")
    need = {"p_value", "p_adjusted", "n_controls", "control_median", "control_lo", "control_hi",
            "vs_control_lo", "vs_control_hi", "verdict", "off_target_abs_delta", "alternative",
            "correction", "select_split", "eval_split", "beyond_controls"}  # fmt: skip
    assert need <= set(res.columns)
    assert res.beyond_controls.dtype == bool


def test_features_are_tested_on_another_split_than_they_were_chosen_on(world, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    _, base = world
    stats = tmp_path / "stats"
    shutil.copytree(base["stats_dir"], stats)
    fl = pd.read_parquet(stats / "feature_labels.parquet")
    pd.concat([fl.assign(split="val"), fl.assign(split="train")]).to_parquet(
        stats / "feature_labels.parquet"
    )
    pq.write_table(
        pa.table({"run": ["hyp"], "select_split": ["val"], "report_split": ["train"]}),
        stats / "run.parquet",
    )
    common = {**base, "stats_dir": str(stats)}
    h = Hypothesis(target="blue", op="suppress", **{**common, "split": "val"})
    with pytest.raises(ValueError, match="chosen on .*not be held out"):
        run_hypothesis(h, Cache(settings()))
    (flagged,) = run_hypothesis(
        Hypothesis(**{**h.__dict__, "allow_selection_split": True}), Cache(settings())
    ).rows
    assert flagged["held_out"] is False and flagged["eval_split"] == "val"
    (row,) = run_hypothesis(
        Hypothesis(target="blue", op="suppress", **common), Cache(settings())
    ).rows
    assert (row["select_split"], row["eval_split"], row["held_out"]) == ("val", "train", True)
    assert row["feature"] == 0


def test_segmentation_specificity_and_change_rates(world, tiny_vit, tiny_world, tmp_path):
    """For a segmentation probe, each concept's row carries the share of its pixels whose
    prediction changes; the edited class's share is the row's target change rate."""
    from saev_core.probes import ProbeConfig, train_probes

    _, base = world
    probe_dir = tmp_path / "probes"
    train_probes(ProbeConfig(model=str(tiny_vit), data=str(tiny_world), out_dir=str(probe_dir),
                             tasks=("segmentation",), seg_classes=("red", "green", "blue", "yellow"),
                             epochs=2))  # fmt: skip
    h = Hypothesis(target="blue", features=(0,), op="add", relative=False, strengths=(30.0,),
                   task="probe", model=str(tiny_vit), probe_dir=str(probe_dir / "segmentation"),
                   **{k: v for k, v in base.items() if k != "model"})  # fmt: skip
    result = run_hypothesis(h, Cache(settings(n_control_features=2, n_control_directions=2)))
    (row,) = result.rows
    spec = {r["concept"]: r for r in result.specificity}
    assert set(spec) == {"background", "red", "green", "blue", "yellow"}
    assert row["task"] == "probe:segmentation" and row["n_controls"] == 4
    assert spec["blue"]["target_change_rate"] == pytest.approx(row["target_change_rate"])
    assert spec["blue"]["other_change_rate"] == pytest.approx(row["other_change_rate"])
    assert all(0 <= r["change_rate"] <= 1 for r in spec.values())
    assert np.isfinite(row["miou_delta_lo"]) and row["miou_delta_lo"] <= row["miou_delta_hi"]
