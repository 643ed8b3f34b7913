"""The linear probe's AUROC per concept x form (issue 15): metrics per label checked against
scikit-learn, the probe step's table on a tiny backbone over a tiny forms world (probabilities
recomputed here from the saved weights), and the `probe_by_form` query on the comparison's
warehouse."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from test_compare import BACKBONES, CONCEPTS, FORMS, _q, tiny  # noqa: F401  (the fixture)

from saev_core.compare_probes import (
    COLUMNS,
    concept_and_form,
    label_metrics,
    probe_labels,
    write_probe_labels,
)
from saev_core.probes import ProbeConfig, train_probes
from saev_core.warehouse import build_compare_warehouse


def test_labels_split_into_concept_and_form():
    assert concept_and_form("circle:word") == ("circle", "word")
    assert concept_and_form("red") == ("red", None)
    assert concept_and_form("outline") == (None, "outline")


def _sklearn_ci(p, y, n_boot, seed, ci=0.95):
    """The percentile interval from scikit-learn's AUROC on each documented draw."""
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    aucs = [roc_auc_score(y[i], p[i]) for i in idx if 0 < y[i].sum() < len(i)]
    q = (1 - ci) / 2
    return np.quantile(aucs, [q, 1 - q])


def test_label_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    n = 40
    y = rng.random((n, 4)) < [0.3, 0.5, 0.0, 0.1]
    y[:2, 3] = True  # a rare label: some draws have no positive
    p = np.round(np.clip(0.5 * y + rng.normal(0.25, 0.25, y.shape), 0, 1), 1)  # many ties
    labels = ["circle:word", "red", "square:filled", "word"]
    got = label_metrics(p, y, labels, n_boot=300, seed=7).set_index("label")
    for j, label in enumerate(labels):
        r = got.loc[label]
        assert (r["n_images"], r["n_pos"]) == (n, int(y[:, j].sum()))
        assert r["accuracy"] == pytest.approx(accuracy_score(y[:, j], p[:, j] > 0.5))
        if label == "square:filled":  # no positive: AUROC, CI and balanced accuracy undefined
            undefined = ["auroc", "auroc_lo", "auroc_hi", "balanced_accuracy"]
            assert np.isnan(r[undefined].astype(float)).all()
            continue
        assert r["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        bal = balanced_accuracy_score(y[:, j], p[:, j] > 0.5)
        assert r["balanced_accuracy"] == pytest.approx(bal)
        lo, hi = _sklearn_ci(p[:, j], y[:, j], 300, 7)
        assert (r["auroc_lo"], r["auroc_hi"]) == (pytest.approx(lo), pytest.approx(hi))
        assert r["auroc_lo"] < r["auroc"] < r["auroc_hi"]
    assert pd.isna(got.loc["word", "concept"]) and got.loc["word", "form"] == "word"
    assert pd.isna(got.loc["red", "form"]) and got.loc["red", "concept"] == "red"
    with pytest.raises(ValueError, match="do not match"):
        label_metrics(p[:, :2], y, labels)


@pytest.fixture(scope="module")
def forms_world(tmp_path_factory):
    """A 64 px forms world of 16 train, 4 val and 16 test images."""
    from saev_core.shapes import FormsConfig, generate

    out = tmp_path_factory.mktemp("forms") / "forms"
    generate(out, FormsConfig(seed=5, n_train=16, n_val=4, n_test=16), progress=False)
    return out


def _probs_from_weights(probe_dir, model_dir, records):
    """sigmoid(CLS W^T + b) from probe.safetensors and the model's own forward, by hand."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, ViTForImageClassification

    w = load_file(str(probe_dir / "probe.safetensors"))
    model = ViTForImageClassification.from_pretrained(model_dir).vit.eval()
    proc = AutoImageProcessor.from_pretrained(model_dir)
    px = proc(images=[r.open() for r in records], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = model(pixel_values=px).last_hidden_state[:, 0].float()
        return torch.sigmoid(cls @ w["linear.weight"].T + w["linear.bias"]).numpy()


def test_probe_labels_on_a_tiny_forms_world(tiny_vit, forms_world, tmp_path):
    from saev_core.data import load_records

    cfg = ProbeConfig(model=str(tiny_vit), data=str(forms_world), out_dir=str(tmp_path / "probes"),
                      tasks=("classification",), epochs=5, lr=5e-2)  # fmt: skip
    train_probes(cfg)
    out = tmp_path / "compare/vit/probes/labels.parquet"
    summary = probe_labels(cfg, backbone="vit", out_path=out, n_boot=200, seed=3)
    assert [p.name for p in out.parent.iterdir()] == ["labels.parquet"]  # no temporary left
    table = pq.read_table(out)
    assert table.column_names == list(COLUMNS)
    meta = json.loads(table.schema.metadata[b"saev"])
    assert (meta["split"], meta["n_boot"], meta["seed"]) == ("test", 200, 3)
    got = table.to_pandas().set_index("label")

    classes = json.loads((tmp_path / "probes/classification/probe.json").read_text())["classes"]
    records = load_records(forms_world, ["test"])
    assert list(got.index) == classes and (got["backbone"] == "vit").all()
    assert (got["split"] == "test").all() and (got["n_images"] == len(records)).all()
    p = _probs_from_weights(tmp_path / "probes/classification", tiny_vit, records)
    n_scored = 0
    for j, c in enumerate(classes):
        y = np.array([c in r.labels for r in records])
        r = got.loc[c]
        assert r["n_pos"] == y.sum()
        assert r["accuracy"] == pytest.approx(accuracy_score(y, p[:, j] > 0.5), abs=1e-6)
        assert tuple(None if pd.isna(v) else v for v in r[["concept", "form"]]) == (
            concept_and_form(c)
        )
        if 0 < y.sum() < len(y):
            n_scored += 1
            assert r["auroc"] == pytest.approx(roc_auc_score(y, p[:, j]), abs=1e-6)
            assert r["auroc_lo"] <= r["auroc_hi"]
        else:
            assert np.isnan(r["auroc"])
    assert n_scored >= 10
    # the summary: mean test AUROC per form over the concept:form labels, and the bare concepts
    for form in FORMS:
        rows = got[(got["form"] == form) & got["concept"].notna()]
        assert summary[form] == pytest.approx(rows["auroc"].mean(), abs=1e-4)
    bare = got[got["form"].isna()]
    assert len(bare) > 0 and summary["any"] == pytest.approx(bare["auroc"].mean(), abs=1e-4)
    json.dumps(summary)  # DVC metrics

    # the probe belongs to its backbone: another model's weights are refused
    from saev_core.demo_vit import BackboneConfig, build_classifier, build_processor

    torch.manual_seed(1)
    other = tmp_path / "other"
    build_classifier(BackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, patch_size=8,
                                    image_size=32)).save_pretrained(other)  # fmt: skip
    build_processor(32).save_pretrained(other)
    wrong = ProbeConfig(**{**cfg.__dict__, "model": str(other)})
    with pytest.raises(ValueError, match="retrain the probe"):
        probe_labels(wrong, backbone="vit", out_path=tmp_path / "x.parquet", n_boot=10)
    seg_only = ProbeConfig(**{**cfg.__dict__, "tasks": ("segmentation",)})
    with pytest.raises(ValueError, match="no classification probe"):
        probe_labels(seg_only, backbone="vit", out_path=tmp_path / "x.parquet", n_boot=10)


@pytest.fixture(scope="module")
def with_probes(tiny):  # noqa: F811  (the imported fixture)
    """test_compare's warehouse tree plus each backbone's probe table, rebuilt into a database
    of its own; returns (root, db, the probe rows)."""
    root = tiny[0]
    rng = np.random.default_rng(4)
    labels = [*CONCEPTS, *FORMS, *(f"{c}:{f}" for c in CONCEPTS for f in FORMS)]
    frames = []
    for b in BACKBONES:
        y = rng.random((30, len(labels))) < 0.4
        p = np.clip(0.4 * y + rng.random(y.shape) * 0.6, 0, 1)
        t = label_metrics(p, y, labels, n_boot=50, seed=0)
        t.insert(0, "backbone", b)
        t.insert(4, "split", "test")
        write_probe_labels(t, root / "artifacts/compare" / b / "probes/labels.parquet")
        frames.append(t)
    db = root / "warehouse/compare_probes.duckdb"
    backbones = {b: {"objective": b} for b in BACKBONES}
    build_compare_warehouse(db, backbones, "artifacts/compare", root=root, sql_dir="sql")
    return root, db, pd.concat(frames, ignore_index=True)


FIGURE_COLUMNS = ["backbone", "concept", "form", "auroc", "auroc_lo", "auroc_hi",
                  "balanced_accuracy", "n_pos"]  # fmt: skip


def test_probe_by_form(with_probes):
    rows = with_probes[2]
    want = rows[rows["concept"].notna() & rows["form"].notna()]
    got = _q(with_probes, "probe_by_form")
    assert list(got.columns[: len(FIGURE_COLUMNS)]) == FIGURE_COLUMNS
    assert len(got) == len(want) == len(BACKBONES) * len(CONCEPTS) * len(FORMS)
    # ordered so that the backbones line up per concept and form
    keys = list(zip(got["concept"], got["form"], got["backbone"], strict=True))
    assert keys == sorted(keys)
    w = want.set_index(["backbone", "concept", "form"])
    for _, r in got.iterrows():
        e = w.loc[(r["backbone"], r["concept"], r["form"])]
        for c in ("auroc", "auroc_lo", "auroc_hi", "balanced_accuracy"):
            assert r[c] == pytest.approx(e[c])
        assert r["n_pos"] == e["n_pos"]
    one = _q(with_probes, "probe_by_form", backbone="clip", form="word")
    assert set(one["backbone"]) == {"clip"} and set(one["form"]) == {"word"}
    assert sorted(one["concept"]) == sorted(CONCEPTS)
    assert len(_q(with_probes, "probe_by_form", form="outline")) == len(BACKBONES) * len(CONCEPTS)
    # the view keeps the bare concepts and forms, the backbone named by its directory
    import duckdb

    con = duckdb.connect(str(with_probes[1]), read_only=True)
    try:
        n = con.execute("select backbone, count(*) from compare_probes group by 1 order by 1")
        counts = n.fetchall()
    finally:
        con.close()
    assert counts == [(b, len(rows) // len(BACKBONES)) for b in sorted(BACKBONES)]
