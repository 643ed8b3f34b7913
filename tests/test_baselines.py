"""Baselines (saev_core.baselines) on a planted world whose concept directions are known.

Activations are sparse codes over a known complete dictionary D plus a little noise; concept c
sits on a few patches of the images that carry it, along D[c]. ICA (sources independent and
sparse) and an oracle SAE (encoder D^-1) must find D[c]; seeded random directions must not.
AUROCs are checked against scikit-learn's roc_auc_score on scores computed here from the raw
arrays (or by the fitted scikit-learn estimator itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from saev_core import baselines as B
from saev_core import shards

D_MODEL, N_PATCH, CONCEPTS = 16, 9, ("c0", "c1", "c2")
SPLITS = {"train": 300, "val": 200, "test": 200}


def _world(seed: int = 7):
    """{split: (ids, acts [i, 1 + N_PATCH, d], labels [i, n_concepts])} and the dictionary."""
    rng = np.random.default_rng(seed)
    # atoms neither orthogonal (|cos| up to ~0.5) nor close to dependent (condition number ~4)
    Q, _ = np.linalg.qr(rng.standard_normal((D_MODEL, D_MODEL)))
    D = Q + 0.125 * rng.standard_normal((D_MODEL, D_MODEL))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    out, first = {}, 0
    for split, n in SPLITS.items():
        codes = np.zeros((n, N_PATCH, D_MODEL))
        bg = rng.random((n, N_PATCH, D_MODEL - 3)) < 0.15  # background atoms 3..15
        codes[..., 3:] = bg * rng.exponential(1.0, bg.shape)
        y = rng.random((n, 3)) < 0.4
        for i, c in zip(*np.nonzero(y), strict=True):
            where = rng.choice(N_PATCH, size=rng.integers(1, 3), replace=False)
            codes[i, where, c] = rng.uniform(1.5, 3.0, len(where))
        x = codes @ D + 0.02 * rng.standard_normal((n, N_PATCH, D_MODEL))
        # CLS carries concept 0's direction on every image: it must not enter the image score
        cls = np.broadcast_to(6.0 * D[0], (n, 1, D_MODEL))
        out[split] = (np.arange(first, first + n), np.concatenate([cls, x], axis=1), y)
        first += n
    return out, D


def _write(root: Path, world) -> None:
    files, ids_all, split_all, labels = [], [], [], []
    for split, (ids, acts, y) in world.items():
        w = shards.ShardWriter(root, 0, split, D_MODEL, np.dtype("float32"), 1 + N_PATCH, 64, 4096)
        w.add(ids, np.arange(1 + N_PATCH, dtype=np.int32), acts.astype(np.float32))
        files += w.close()
        ids_all += ids.tolist()
        split_all += [split] * len(ids)
        labels += [[CONCEPTS[j] for j in np.flatnonzero(row)] for row in y]
    tokens = {"policy": "all", "n_prefix_tokens": 1, "n_registers": 0, "has_cls": True,
              "n_patches": N_PATCH, "grid": [3, 3], "written": list(range(1 + N_PATCH)),
              "n_tokens_written": 1 + N_PATCH}  # fmt: skip
    manifest = {"schema": shards.SCHEMA_VERSION, "model": {"name": "tiny", "weights_sha256": "x"},
                "layers": [0], "tokens": tokens, "dtype": "float32", "d_model": D_MODEL,
                "labels": list(CONCEPTS), "n_images": len(ids_all), "files": files}  # fmt: skip
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    pq.write_table(
        pa.table({"image_id": pa.array(ids_all, pa.int64()), "split": split_all,
                  "path": [f"img/{i}.png" for i in ids_all],
                  "labels": pa.array(labels, pa.list_(pa.string()))}),
        root / shards.IMAGES,
    )  # fmt: skip


def _oracle_sae(path: Path, D: np.ndarray):
    """A ReLU SAE whose code is relu(x D^-1): feature j is the planted atom j."""
    from saev_core.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(arch="relu", d_model=D_MODEL, d_sae=D_MODEL))
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(np.linalg.inv(D)).float())
        sae.W_dec.copy_(torch.from_numpy(D).float())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save(path, extra={"layer": 0, "tokens": "all"})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    world, D = _world()  # seed 7: not the random directions' seed (0), which would draw D itself
    _write(root / "acts", world)
    _oracle_sae(root / "sae", D)
    cfg = B.BaselinesConfig(n_fit=5000, n_boot=200, seed=0)
    table, units = B.sae_vs_baselines(root / "acts", root / "sae", cfg)
    return world, D, table, units, cfg


def _row(table, method, concept):
    rows = table[(table.method == method) & (table.concept == concept)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_ica_and_the_sae_recover_the_planted_concepts_random_directions_do_not(planted):
    world, D, table, _, _ = planted
    assert set(table.method) == set(B.METHODS) and set(table.concept) == set(CONCEPTS)
    for j, concept in enumerate(CONCEPTS):
        sae, ica, rnd = (_row(table, m, concept) for m in ("sae", "ica", "random"))
        assert sae.unit == j and sae.sign == 1 and sae.auroc_test > 0.97
        assert ica.auroc_test > 0.97
        assert abs(float(np.dot(ica.direction, D[j]))) > 0.95  # the mixing column is D[j]
        # the best of 16 random directions (both signs) is neither the direction nor as good
        assert float(np.dot(rnd.direction, D[j])) < 0.9
        assert rnd.auroc_test < ica.lo and rnd.auroc_test < sae.lo


def test_auroc_val_test_and_ci_match_scikit_learn_on_raw_scores(planted):
    """Neurons: an image's score is its highest patch value (CLS left out), computed here from
    the arrays; the chosen unit is the val argmax; test AUROC and the bootstrap CI (same draws)
    are scikit-learn's."""
    world, _, table, _, cfg = planted
    _, val_x, val_y = world["val"]
    _, test_x, test_y = world["test"]

    def scores(x):
        p = x[:, 1:, :]  # patches only
        return np.concatenate([p.max(1), (-p).max(1)], axis=1)  # units: +d then -d

    s_val, s_test = scores(val_x), scores(test_x)
    n_test = len(test_y)
    idx = np.random.default_rng(cfg.seed).integers(0, n_test, size=(cfg.n_boot, n_test))
    for j, concept in enumerate(CONCEPTS):
        row = _row(table, "neuron", concept)
        a_val = np.array([roc_auc_score(val_y[:, j], s_val[:, u]) for u in range(2 * D_MODEL)])
        best = int(np.argmax(a_val))
        assert (row.unit, row.sign) == (best % D_MODEL, 1 if best < D_MODEL else -1)
        assert row.auroc_val == pytest.approx(a_val[best], abs=1e-9)
        assert row.auroc_test == pytest.approx(
            roc_auc_score(test_y[:, j], s_test[:, best]), abs=1e-9
        )
        boot = [
            roc_auc_score(test_y[i, j], s_test[i, best])
            for i in idx
            if 0 < test_y[i, j].sum() < n_test
        ]
        lo, hi = np.quantile(boot, [0.025, 0.975])
        assert (row.lo, row.hi) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
        assert row.lo <= row.auroc_test <= row.hi
        assert row.n_test_pos == int(test_y[:, j].sum()) and row.n_test_images == n_test


def test_pca_ica_nmf_units_score_what_the_fitted_estimator_transforms(planted):
    """The projection each linear method uses is the scikit-learn estimator's own transform."""
    world, _, table, units, _ = planted
    _, test_x, test_y = world["test"]
    patches = test_x[:, 1:, :].reshape(-1, D_MODEL)
    for method in ("pca", "ica", "nmf"):
        model = units[method].model
        if method == "nmf":
            c = patches - units[method].info["mean"]
            z = np.concatenate([np.maximum(c, 0), np.maximum(-c, 0)], axis=1)
            src = model.transform(z)
        else:
            src = model.transform(patches)
        src = src.reshape(len(test_x), N_PATCH, -1)
        for j, concept in enumerate(CONCEPTS):
            row = _row(table, method, concept)
            s = (row.sign * src[:, :, row.unit]).max(1)
            assert row.auroc_test == pytest.approx(roc_auc_score(test_y[:, j], s), abs=1e-6)


def test_best_direction_is_the_pca_component_and_survives_parquet(planted, tmp_path):
    _, _, table, units, _ = planted
    path = B.write_baselines(table, tmp_path / "b" / "baselines.parquet", {"run": "t"})
    back = B.read_baselines(path)
    assert list(back.columns) == list(B.COLUMNS) and len(back) == len(table)
    pca = units["pca"].model
    for concept in CONCEPTS:
        row = _row(table, "pca", concept)
        v = B.best_direction(back, concept, "pca")
        assert v.shape == (D_MODEL,)
        np.testing.assert_allclose(v, row.sign * pca.components_[row.unit], atol=1e-6)
    with pytest.raises(ValueError, match="no 'pca' row for concept 'nope'"):
        B.best_direction(back, "nope")
    head = B.headline(table)
    assert set(head.method) == set(B.METHODS) and {"better_than_sae", "worse_than_sae"} <= set(head)


def test_auroc_matrix_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(60, 5)).astype(float)  # many ties
    y = rng.random((60, 3)) < 0.3
    got = B.auroc_matrix(s, y)
    want = np.array([[roc_auc_score(y[:, j], s[:, u]) for j in range(3)] for u in range(5)])
    np.testing.assert_allclose(got, want, atol=1e-12)
    y[:, 0] = False
    assert np.isnan(B.auroc_matrix(s, y)[:, 0]).all()


def test_config_refuses_bad_input():
    with pytest.raises(ValueError, match="both 'val'"):
        B.BaselinesConfig(select_split="val", report_split="val")
    with pytest.raises(ValueError, match="baselines.methods"):
        B.BaselinesConfig(methods=("pca", "lda"))
    with pytest.raises(ValueError, match="no SAE was given"):
        B.fit_baselines(np.zeros((10, 4)), B.BaselinesConfig(methods=("sae",)))


def test_image_labels_fall_back_to_patch_labels(tmp_path):
    """Without images.parquet labels an image carries every label one of its patches carries
    (what compute_stats derives); label_matrix ignores unknown images and labels."""
    import pandas as pd

    pd.DataFrame(
        {"image_id": [3, 3, 3, 5], "token": [1, 2, 2, 4], "label": ["a", "a", "b", "b"]}
    ).to_parquet(tmp_path / shards.PATCH_LABELS)
    long = B.image_labels_of(tmp_path)
    assert sorted(map(tuple, long[["image_id", "label"]].values.tolist())) == [
        (3, "a"),
        (3, "b"),
        (5, "b"),
    ]
    y = B.label_matrix(np.array([5, 3, 9]), long, ["b", "a", "z"])
    np.testing.assert_array_equal(y, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    (tmp_path / shards.PATCH_LABELS).unlink()
    with pytest.raises(ValueError, match="no image labels"):
        B.image_labels_of(tmp_path)


def test_image_scores_skip_cls_and_take_each_images_highest_patch():
    world, _ = _world()
    ids, acts, _ = world["val"]
    n_tok = acts.shape[1]
    batches = [
        (np.repeat(ids[lo : lo + 7], n_tok), np.tile(np.arange(n_tok), len(ids[lo : lo + 7])),
         acts[lo : lo + 7].reshape(-1, D_MODEL))
        for lo in range(0, len(ids), 7)
    ]  # fmt: skip
    units = B.fit_baselines(
        acts[:, 1:].reshape(-1, D_MODEL), B.BaselinesConfig(methods=("neuron",))
    )
    got_ids, scores = B.image_scores(units, batches, n_prefix_tokens=1)
    np.testing.assert_array_equal(got_ids, ids)
    want = np.concatenate([acts[:, 1:].max(1), -acts[:, 1:].min(1)], axis=1)
    np.testing.assert_allclose(scores["neuron"], want, rtol=1e-6)
    # counting CLS (6 D[0] on every image) would change the scores
    assert not np.allclose(B.image_scores(units, batches, n_prefix_tokens=0)[1]["neuron"], want)


def test_methods_compare_with_the_sae_paired_on_the_same_bootstrap_draws():
    """A method a little better than the SAE on every image: the two CIs overlap, but the CI of
    the difference on the same draws (checked with scikit-learn) excludes 0, and headline says
    better; a method equal to the SAE is neither better nor worse."""
    rng = np.random.default_rng(3)
    n = 200
    y_sel, y_rep = rng.random((n, 1)) < 0.4, rng.random((n, 1)) < 0.4

    def scores(y):
        s = y[:, 0] + rng.standard_normal(n)
        return {"sae": s[:, None], "neuron": (s + 0.4 * y[:, 0])[:, None], "pca": s[:, None]}

    units = {m: B.Units(m, np.eye(1), False) for m in ("sae", "neuron", "pca")}
    s_sel, s_rep = scores(y_sel), scores(y_rep)
    cfg = B.BaselinesConfig(n_boot=300, seed=5)
    table = B.select_and_report(units, (None, s_sel, y_sel), (None, s_rep, y_rep), ["c"], cfg)
    sae, better, same = (_row(table, m, "c") for m in ("sae", "neuron", "pca"))
    assert better.lo < sae.hi  # the separate CIs overlap: an overlap test says nothing
    idx = np.random.default_rng(cfg.seed).integers(0, n, size=(cfg.n_boot, n))
    diff = [
        roc_auc_score(y_rep[i, 0], s_rep["neuron"][i, 0])
        - roc_auc_score(y_rep[i, 0], s_rep["sae"][i, 0])
        for i in idx
    ]
    lo, hi = np.quantile(diff, [0.025, 0.975])
    assert (better.diff_lo, better.diff_hi) == (
        pytest.approx(lo, abs=1e-9),
        pytest.approx(hi, abs=1e-9),
    )
    assert 0 < better.diff_lo and better.diff_p == pytest.approx(
        min(1, 2 * min(np.mean(np.array(diff) <= 0), np.mean(np.array(diff) >= 0)))
    )
    assert np.isnan(sae.diff_lo) and same.diff_lo == 0 == same.diff_hi
    head = B.headline(table).set_index("method")
    assert head.loc["neuron", "better_than_sae"] == 1 and head.loc["neuron", "worse_than_sae"] == 0
    assert head.loc["pca", ["better_than_sae", "worse_than_sae"]].tolist() == [0, 0]


def test_random_directions_default_to_as_many_units_as_the_sae_has(planted):
    """Best-of-more on val flatters a method: beside an SAE of d_sae features, random directions
    default to d_sae // 2 per sign (d_sae units), and the table records each method's count."""
    _, _, table, units, _ = planted
    assert units["random"].n_components == D_MODEL // 2
    n_units = table.groupby("method")["n_units"].first()
    assert n_units["random"] == n_units["sae"] == D_MODEL
    x = np.random.default_rng(0).standard_normal((50, D_MODEL))
    sae = type("S", (), {"W_dec": torch.zeros(40, D_MODEL)})()  # only its d_sae is read
    cfg = B.BaselinesConfig(methods=("random",))
    assert B.fit_baselines(x, cfg, sae)["random"].n_components == 20
    assert B.fit_baselines(x, cfg)["random"].n_components == D_MODEL  # no SAE: d_model
    cfg7 = B.BaselinesConfig(methods=("random",), n_random=7)
    assert B.fit_baselines(x, cfg7, sae)["random"].n_components == 7
