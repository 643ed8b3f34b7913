"""Tests for saev_core.stats: exact counts on hand-made codes, exemplars, AUROC, streaming, Parquet."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from saev_core.config import from_dict
from saev_core.sae import SAE, SAEConfig
from saev_core.stats import (
    StatsConfig,
    compute_stats,
    decoder_neighbors,
    exemplar_heatmaps,
)
from saev_core.stats.tables import write_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


class LinearReluSAE(torch.nn.Module):
    """A real linear + ReLU encoder with hand-set weights, exposing what compute_stats uses."""

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor | None = None) -> None:
        super().__init__()
        d_model, d_sae = W_enc.shape
        self.W_enc = torch.nn.Parameter(W_enc.float())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae) if b_enc is None else b_enc.float())
        self.W_dec = torch.nn.Parameter(W_enc.T.clone().float())
        self.cfg = SimpleNamespace(d_sae=d_sae, d_model=d_model)

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_bd @ self.W_enc + self.b_enc)


def per_image_batches(image_id, token, acts, images_per_batch):
    """Yield (image_id, token, acts) with every token of an image in one batch."""
    order = np.argsort(image_id, kind="stable")
    image_id, token, acts = image_id[order], token[order], acts[order]
    uniq = np.unique(image_id)
    for start in range(0, len(uniq), images_per_batch):
        keep = np.isin(image_id, uniq[start : start + images_per_batch])
        yield image_id[keep], token[keep], acts[keep]


def hand_data():
    """Two images of CLS + 2 patches; with an identity encoder the codes are relu(acts)."""
    image_id = np.array([0, 0, 0, 1, 1, 1], np.int64)
    token = np.array([0, 1, 2, 0, 1, 2], np.int32)
    acts = np.array(
        [
            [1.0, 0.0, -1.0],  # image 0, CLS
            [0.0, 2.0, -1.0],  # image 0, patch 1
            [3.0, 0.0, -1.0],  # image 0, patch 2
            [0.0, 4.0, -1.0],  # image 1, CLS
            [0.0, 0.0, -1.0],  # image 1, patch 1
            [5.0, 1.0, -1.0],  # image 1, patch 2
        ],
        np.float32,
    )
    labels = pd.DataFrame(
        {
            "image_id": [0, 1, 1],
            "token": [2, 2, 2],
            "label": ["red", "red", "circle"],
        }
    )
    return image_id, token, acts, labels


def test_counts_means_and_max_are_exact():
    image_id, token, acts, labels = hand_data()
    sae = LinearReluSAE(torch.eye(3))
    cfg = StatsConfig(n_top=2)
    st = compute_stats(
        sae, [(image_id, token, acts)], labels, ["red", "circle"], 1, cfg, run="r", progress=False
    )
    assert (st.n_tokens, st.n_images, st.n_cls, st.n_patches) == (6, 2, 2, 4)
    np.testing.assert_array_equal(st.n_fires, [3, 3, 0])
    np.testing.assert_allclose(st.freq, [3 / 6, 3 / 6, 0])
    np.testing.assert_allclose(st.freq_images, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(st.freq_cls, [1 / 2, 1 / 2, 0])
    np.testing.assert_allclose(st.freq_patches, [2 / 4, 2 / 4, 0])
    np.testing.assert_allclose(st.mean_act[:2], [(1 + 3 + 5) / 3, (2 + 4 + 1) / 3])
    assert np.isnan(st.mean_act[2])
    np.testing.assert_allclose(st.max_act, [5.0, 4.0, 0.0])
    # histogram: zero bin exact, every token counted once
    assert st.hist.shape == (3, cfg.n_bins + 1)
    np.testing.assert_array_equal(st.hist.sum(1), [6, 6, 6])
    np.testing.assert_array_equal(st.hist[:, 0], [3, 3, 6])
    edges = st.hist_edges
    b = 1 + np.searchsorted(edges[1:-1], 5.0, side="right")
    assert edges[b - 1] <= 5.0 < edges[b] and st.hist[0, b] == 1
    # label association on patches: red on (0, 2) and (1, 2), circle on (1, 2)
    red, circle = 0, 1
    np.testing.assert_array_equal(st.n_pos, [2, 1])
    np.testing.assert_allclose(st.mean_in[red], [(3 + 5) / 2, (0 + 1) / 2, 0])
    np.testing.assert_allclose(st.mean_out[red], [0, (2 + 0) / 2, 0])
    np.testing.assert_allclose(st.mean_in[circle], [5, 1, 0])
    np.testing.assert_allclose(st.mean_out[circle], [1, 2 / 3, 0])
    # feature 0 is > 0 exactly on the red patches, so it separates them perfectly
    assert st.auroc[red, 0] == 1.0
    # feature 2 is never on: every pair ties
    assert st.auroc[red, 2] == 0.5
    # feature 1 on red patches {0, 1} vs others {2, 0}: pairs (0,2)=0 (0,0)=.5 (1,2)=0 (1,0)=1
    assert st.auroc[red, 1] == pytest.approx(1.5 / 4)


def test_top_examples_rank_images_by_their_max_patch():
    n_img, n_tok = 5, 4
    image_id = np.repeat(np.arange(10, 10 + n_img), n_tok)
    token = np.tile(np.arange(n_tok), n_img).astype(np.int32)
    acts = np.zeros((n_img * n_tok, 2), np.float32)

    def plant(image, tok, feature, value):
        acts[(image_id == image) & (token == tok), feature] = value

    # feature 0: image 12 peaks at patch 3 (9.0), images 10 and 14 at 7.0, image 11 at 0.5
    plant(12, 3, 0, 9.0)
    plant(12, 1, 0, 1.0)
    plant(10, 1, 0, 7.0)
    plant(14, 2, 0, 7.0)
    plant(11, 2, 0, 0.5)
    # a CLS value counts for max_act and freq_images but ranks no image
    plant(13, 0, 0, 100.0)
    # feature 1: fires on one patch of one image
    plant(13, 2, 1, 2.0)
    sae = LinearReluSAE(torch.eye(2))
    cfg = StatsConfig(n_top=3)
    st = compute_stats(
        sae, per_image_batches(image_id, token, acts, 2), None, [], 1, cfg, "r", progress=False
    )
    np.testing.assert_array_equal(st.top_image[0], [12, 10, 14])  # tie 7.0: lower image id first
    np.testing.assert_array_equal(st.top_token[0], [3, 1, 2])
    np.testing.assert_allclose(st.top_value[0], [9.0, 7.0, 7.0])
    np.testing.assert_array_equal(st.top_image[1], [13, -1, -1])
    np.testing.assert_allclose(st.top_value[1], [2.0, -1, -1])
    np.testing.assert_allclose(st.max_act, [100.0, 2.0])
    np.testing.assert_array_equal(st.n_fires_images, [5, 1])


def test_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    n_img, n_tok, d = 40, 17, 6
    image_id = np.repeat(np.arange(n_img), n_tok)
    token = np.tile(np.arange(n_tok), n_img).astype(np.int32)
    is_patch = token >= 1
    # two labels on random patches; features respond to them with noise, many exact zeros
    y = rng.random((len(token), 2)) < [0.3, 0.1]
    y &= is_patch[:, None]
    acts = rng.normal(0, 1, (len(token), d)).astype(np.float32)
    acts[:, 0] += 1.5 * y[:, 0]
    acts[:, 1] += 0.7 * y[:, 1]
    acts[:, 2] -= 1.0 * y[:, 0]
    rows, cols = np.nonzero(y)
    labels = pd.DataFrame(
        {"image_id": image_id[rows], "token": token[rows], "label": np.array(["a", "b"])[cols]}
    )
    sae = LinearReluSAE(torch.eye(d))
    # 100 bins per decade: within-bin ties are rare, so the histogram AUROC is close to exact
    cfg = StatsConfig(n_bins=600)
    st = compute_stats(
        sae, per_image_batches(image_id, token, acts, 7), labels, ["a", "b"], 1, cfg, "r", False
    )
    codes = np.maximum(acts, 0)[is_patch]
    for li in range(2):
        for f in range(d):
            want = roc_auc_score(y[is_patch, li], codes[:, f])
            assert abs(st.auroc[li, f] - want) < 0.01, (li, f, st.auroc[li, f], want)
    assert st.auroc[0, 0] > 0.75 and st.auroc[0, 2] < 0.35
    np.testing.assert_array_equal(st.n_pos, y.sum(0))


def test_default_bins_stay_close_to_sklearn():
    rng = np.random.default_rng(2)
    n = 3000
    y = rng.random(n) < 0.4
    x = (rng.lognormal(0, 1, n) * (1 + y) * (rng.random(n) < 0.7)).astype(np.float32)
    image_id = np.arange(n)
    token = np.ones(n, np.int32)
    labels = pd.DataFrame({"image_id": image_id[y], "token": 1, "label": "pos"})
    st = compute_stats(
        LinearReluSAE(torch.eye(1)),
        [(image_id, token, x[:, None])],
        labels,
        None,
        1,
        StatsConfig(),
        "r",
        False,
    )
    assert st.label_names == ("pos",)
    assert abs(st.auroc[0, 0] - roc_auc_score(y, x)) < 0.01


def test_streaming_equals_one_batch():
    rng = np.random.default_rng(3)
    n_img, n_tok, d_model, d_sae = 12, 5, 4, 8
    image_id = np.repeat(rng.permutation(100)[:n_img], n_tok)
    token = np.tile(np.arange(n_tok), n_img).astype(np.int32)
    acts = rng.normal(0, 1, (n_img * n_tok, d_model)).astype(np.float32)
    W_enc = torch.from_numpy(rng.normal(0, 1, (d_model, d_sae)).astype(np.float32))
    b_enc = torch.full((d_sae,), -0.5)
    keep = (rng.random(len(token)) < 0.5) & (token >= 1)
    labels = pd.DataFrame(
        {
            "image_id": image_id[keep],
            "token": token[keep],
            "label": rng.choice(["x", "y"], keep.sum()),
        }
    )
    cfg = StatsConfig(n_top=4)
    runs = []
    for per_batch in (n_img, 1, 5):
        sae = LinearReluSAE(W_enc, b_enc)
        batches = per_image_batches(image_id, token, acts, per_batch)
        runs.append(compute_stats(sae, batches, labels, ["x", "y"], 1, cfg, "r", progress=False))
    one = runs[0]
    assert one.n_fires.sum() > 0 and np.isfinite(one.auroc).all()
    for other in runs[1:]:
        for name in ("n_fires", "n_fires_images", "n_fires_cls", "n_fires_patches", "hist"):
            np.testing.assert_array_equal(getattr(one, name), getattr(other, name), err_msg=name)
        for name in ("top_image", "top_token", "n_pos"):
            np.testing.assert_array_equal(getattr(one, name), getattr(other, name), err_msg=name)
        for name in ("sum_act", "max_act", "top_value", "auroc", "mean_in", "mean_out"):
            torch.testing.assert_close(
                torch.from_numpy(getattr(one, name)), torch.from_numpy(getattr(other, name))
            )


class DenseOnly(torch.nn.Module):
    """Hides `encode_sparse`, so compute_stats scans the dense codes for non-zeros."""

    def __init__(self, sae: SAE) -> None:
        super().__init__()
        self.sae, self.cfg, self.W_dec = sae, sae.cfg, sae.W_dec

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x_bd)


def test_topk_sparse_codes_give_the_dense_path_stats_exactly():
    rng = np.random.default_rng(5)
    n_img, n_tok, d_model = 10, 6, 8
    image_id = np.repeat(np.arange(n_img), n_tok)
    token = np.tile(np.arange(n_tok), n_img).astype(np.int32)
    acts = rng.normal(0, 1, (n_img * n_tok, d_model)).astype(np.float32)
    labels = pd.DataFrame(
        {"image_id": image_id[token >= 1], "token": token[token >= 1], "label": "x"}
    )
    sae = SAE(SAEConfig(arch="topk", d_model=d_model, d_sae=32, k=3)).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    cfg = StatsConfig(n_top=4)
    runs = [
        compute_stats(
            m,
            per_image_batches(image_id, token, acts, 3),
            labels,
            ["x"],
            1,
            cfg,
            "r",
            progress=False,
        )
        for m in (sae, DenseOnly(sae))
    ]
    with torch.no_grad():
        assert runs[0].n_fires.sum() == int((sae.encode(torch.from_numpy(acts)) > 0).sum()) > 0
    for name in (
        "n_fires",
        "n_fires_images",
        "hist",
        "top_image",
        "top_token",
        "sum_act",
        "max_act",
        "top_value",
        "auroc",
        "spatial",
    ):
        np.testing.assert_array_equal(getattr(runs[0], name), getattr(runs[1], name), err_msg=name)


def test_bad_inputs_raise_clear_errors():
    image_id, token, acts, labels = hand_data()
    sae = LinearReluSAE(torch.eye(3))
    cfg = StatsConfig()
    split = [(image_id[:2], token[:2], acts[:2]), (image_id[2:], token[2:], acts[2:])]
    with pytest.raises(ValueError, match="more than one batch"):
        compute_stats(sae, split, labels, None, 1, cfg, "r", progress=False)
    cls_labels = pd.DataFrame({"image_id": [0], "token": [0], "label": ["red"]})
    with pytest.raises(ValueError, match="n_prefix_tokens"):
        compute_stats(sae, [(image_id, token, acts)], cls_labels, None, 1, cfg, "r", False)
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        compute_stats(sae, [(image_id, token, acts[:, :2])], labels, None, 1, cfg, "r", False)
    with pytest.raises(ValueError, match="no activations"):
        compute_stats(sae, [], labels, None, 1, cfg, "r", False)
    with pytest.raises(ValueError, match="column"):
        compute_stats(sae, [], labels.drop(columns="label"), None, 1, cfg, "r", False)


def test_config_checks():
    assert from_dict(StatsConfig, {"splits": ["train", "val"]}).splits == ("train", "val")
    with pytest.raises(ValueError, match="n_top"):
        StatsConfig(n_top=0)
    with pytest.raises(ValueError, match="hist_min"):
        StatsConfig(hist_min=10.0, hist_max=1.0)
    with pytest.raises(ValueError, match="splits"):
        StatsConfig(splits=())
    with pytest.raises(ValueError, match="unknown key"):
        from_dict(StatsConfig, {"n_topp": 3})
    with pytest.raises(ValueError, match="choose a feature on one split and report it on another"):
        StatsConfig(splits=("val", "test"), select_split="val", report_split="val")
    with pytest.raises(ValueError, match="report_split 'test' is not one of"):
        StatsConfig(splits=("train", "val"), report_split="test")
    with pytest.raises(ValueError, match="tokens"):
        StatsConfig(tokens="cls")


def test_auto_splits_select_on_val_report_on_test_else_train_val():
    from saev_core.stats.splits import resolve_splits

    cfg = StatsConfig(splits=("train", "val", "test"))
    assert resolve_splits(cfg, ["train", "val", "test"]) == ("val", "test")
    assert resolve_splits(cfg, ["train", "val"]) == ("train", "val")  # a flat folder's split
    with pytest.raises(ValueError, match="two splits"):
        resolve_splits(cfg, ["val"])
    with pytest.raises(ValueError, match="no images"):
        resolve_splits(StatsConfig(splits=("val", "test"), report_split="test"), ["val"])


def test_write_stats_tables(tmp_path):
    image_id, token, acts, labels = hand_data()
    st = compute_stats(
        LinearReluSAE(torch.eye(3)),
        [(image_id, token, acts)],
        labels,
        ["red", "circle"],
        1,
        StatsConfig(n_top=2),
        "run-a",
        progress=False,
    )
    info = {"run": "run-a", "arch": "relu", "d_model": 3, "d_sae": 3, "cfg_json": {"x": 1}}
    paths = write_stats(st, tmp_path / "out", info)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "feature_labels.parquet",
        "features.parquet",
        "label_controls.parquet",
        "neighbors.parquet",
        "run.parquet",
        "top_examples.parquet",
    ]
    feats = pq.read_table(paths["features"]).to_pandas()
    assert list(feats.columns) == [
        "run", "feature", "freq", "freq_images", "freq_cls", "freq_patches", "n_fires",
        "mean_act", "max_act", "log10_freq", "log10_mean_act", "hist", "centroid_row",
        "centroid_col", "spatial_std", "spatial_entropy", "spatial",
    ]  # fmt: skip
    assert list(feats.spatial[0]) == [0, 2] and pd.isna(feats.spatial_entropy[2])
    assert (feats.run == "run-a").all()
    assert feats.log10_freq[0] == pytest.approx(np.log10(0.5))
    assert pd.isna(feats.mean_act[2]) and pd.isna(feats.log10_freq[2])
    assert list(feats["hist"][2]) == [6] + [0] * 60
    top = pq.read_table(paths["top_examples"]).to_pandas()
    f0 = top[top.feature == 0].sort_values("rank")
    assert f0.image_id.tolist() == [1, 0] and f0.token.tolist() == [2, 2]
    assert f0["rank"].tolist() == [1, 2] and f0.value.tolist() == [5.0, 3.0]
    assert 2 not in set(top.feature)  # a dead feature has no exemplars
    fl = pq.read_table(paths["feature_labels"]).to_pandas()
    assert len(fl) == 6
    assert fl.set_index(["label", "feature"]).loc[("red", 0), "auroc"] == 1.0
    assert fl.set_index(["label", "feature"]).loc[("circle", 0), "image_auroc"] == 1.0
    nb = pq.read_table(paths["neighbors"]).to_pandas()
    assert len(nb) == 3 * 2 and nb[nb.feature == 0].neighbor.tolist() == [1, 2]
    run = pq.read_table(paths["run"]).to_pandas()
    assert (run.grid_rows[0], run.grid_cols[0]) == (1, 2)
    assert len(run) == 1 and run.arch[0] == "relu" and run.cfg_json[0] == '{"x": 1}'
    assert pd.isna(run.fvu[0]) and run.n_tokens[0] == 6 and len(run.hist_edges[0]) == 61
    with pytest.raises(ValueError, match="unknown key"):
        write_stats(st, tmp_path / "bad", {"run": "run-a", "fvuu": 0.1})
    with pytest.raises(ValueError, match="differs"):
        write_stats(st, tmp_path / "bad", {"run": "other"})


@pytest.mark.parametrize("n_prefix_tokens", [0, 3])
def test_token_layouts_without_cls_and_with_registers(n_prefix_tokens):
    # one image of 5 tokens, one feature equal to the token index (token 0 never fires)
    token = np.arange(5, dtype=np.int32)
    acts = token.astype(np.float32)[:, None]
    labels = pd.DataFrame({"image_id": [7], "token": [4], "label": ["x"]})
    st = compute_stats(
        LinearReluSAE(torch.eye(1)),
        [(np.full(5, 7), token, acts)],
        labels,
        None,
        n_prefix_tokens,
        StatsConfig(n_top=1),
        "r",
        progress=False,
    )
    n_patches = 5 - n_prefix_tokens
    assert (st.n_cls, st.n_patches) == (0 if n_prefix_tokens == 0 else 1, n_patches)
    if n_prefix_tokens == 0:
        assert np.isnan(st.freq_cls[0])
    else:
        assert st.freq_cls[0] == 0.0  # registers (tokens 1, 2) are neither CLS nor patches
    assert st.freq_patches[0] == pytest.approx(min(n_patches, 4) / n_patches)
    assert st.freq[0] == pytest.approx(4 / 5)
    assert st.top_token[0, 0] == 4 and st.auroc[0, 0] == 1.0
    assert st.n_pos[0] == 1 and st.mean_out[0, 0] == pytest.approx(
        np.mean(token[n_prefix_tokens:4])
    )


def test_image_level_association_precision_recall_and_spread():
    image_id, token, acts, labels = hand_data()
    sae = LinearReluSAE(torch.eye(3))
    st = compute_stats(
        sae, [(image_id, token, acts)], labels, ["red", "circle"], 1, StatsConfig(), "r", False
    )
    red, circle = 0, 1
    # image scores = highest patch code: f0 (3, 5), f1 (2, 1), f2 (0, 0); labels from patches
    np.testing.assert_array_equal(st.image_n_pos, [2, 1])
    assert np.isnan(st.image_auroc[red]).all()  # every image is red: no negatives
    np.testing.assert_allclose(st.image_auroc[circle], [1.0, 0.0, 0.5])
    np.testing.assert_allclose(st.image_mean_in[circle], [5, 1, 0])
    np.testing.assert_allclose(st.image_mean_out[circle], [3, 2, 0])
    # image level: a threshold between 3 and 5 separates circle perfectly
    assert 3 < st.image_threshold[circle, 0] <= 5
    assert (st.image_precision[circle, 0], st.image_recall[circle, 0]) == (1.0, 1.0)
    # patch level: f0 > 0 exactly on red patches; f1 is 1 on one red patch and 2 on another
    assert (st.threshold[red, 0], st.precision[red, 0], st.recall[red, 0]) == (0.0, 1.0, 1.0)
    assert (st.precision[red, 1], st.recall[red, 1]) == (0.5, 0.5)
    assert np.isnan(st.threshold[red, 2]) and np.isnan(st.precision[red, 2])  # never fires
    # explicit image labels replace the derived ones
    st2 = compute_stats(
        sae, [(image_id, token, acts)], labels, ["red", "circle"], 1, StatsConfig(), "r", False,
        image_labels=pd.DataFrame({"image_id": [0], "label": ["circle"]}),
    )  # fmt: skip
    np.testing.assert_allclose(st2.image_auroc[circle], [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(st2.auroc, st.auroc)  # patch level unchanged
    # spatial: 2 patches -> a 1 x 2 grid; f0 fires at patch 2 twice, f1 once at each
    assert st.grid == (1, 2)
    np.testing.assert_array_equal(st.spatial, [[0, 2], [1, 1], [0, 0]])
    sp = st.spatial_summary
    np.testing.assert_allclose(sp["spatial_entropy"][:2], [0.0, 1.0])
    np.testing.assert_allclose(sp["centroid_col"][:2], [1.0, 0.5])
    np.testing.assert_allclose(sp["spatial_std"][:2], [0.0, 0.5])
    assert np.isnan(sp["centroid_row"][2])


def test_association_matches_sklearn_at_both_levels():
    rng = np.random.default_rng(5)
    n_img, n_tok, d = 60, 10, 3
    image_id = np.repeat(np.arange(n_img), n_tok)
    token = np.tile(np.arange(n_tok), n_img).astype(np.int32)
    has = rng.random(n_img) < 0.4  # image label "a" on 40% of the images
    acts = rng.normal(0, 1, (len(token), d)).astype(np.float32)
    acts[:, 0] += 1.2 * has[image_id]
    img_labels = pd.DataFrame({"image_id": np.flatnonzero(has), "label": "a"})
    st = compute_stats(
        LinearReluSAE(torch.eye(d)), per_image_batches(image_id, token, acts, 9), None, ["a"], 1,
        StatsConfig(n_bins=600), "r", False, image_labels=img_labels, patch_grid=(3, 3),
    )  # fmt: skip
    score = np.maximum(acts, 0).reshape(n_img, n_tok, d)[:, 1:].max(1)
    for f in range(d):
        assert abs(st.image_auroc[0, f] - roc_auc_score(has, score[:, f])) < 0.01
        # precision / recall at the reported threshold, recomputed from the raw scores
        pred = (
            score[:, f] >= st.image_threshold[0, f]
            if st.image_threshold[0, f] > 0
            else (score[:, f] > 0)
        )
        tp = (pred & has).sum()
        assert st.image_precision[0, f] == pytest.approx(tp / pred.sum())
        assert st.image_recall[0, f] == pytest.approx(tp / has.sum())
    assert st.image_auroc[0, 0] > 0.8 and st.grid == (3, 3)
    with pytest.raises(ValueError, match="patch_grid"):
        compute_stats(
            LinearReluSAE(torch.eye(d)), [(image_id, token, acts)], None, [], 1, StatsConfig(),
            "r", False, patch_grid=(2, 2),
        )  # fmt: skip


def test_decoder_neighbors_by_cosine():
    W = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    idx, cos = decoder_neighbors(W, 3)
    np.testing.assert_array_equal(idx[0], [1, 2, 4])  # 2 and 4 tie at cosine 0: lower first
    np.testing.assert_allclose(cos[0], [0.9 / np.hypot(0.9, 0.1), 0.0, 0.0], atol=1e-6)
    assert idx[3, 0] == 2 and cos[3, -1] == pytest.approx(-np.cos(np.arctan(0.1 / 0.9)))
    # chunking changes nothing, and matches a brute-force reference
    rng = np.random.default_rng(0)
    R = torch.from_numpy(rng.normal(size=(50, 8)).astype(np.float32))
    a, ca = decoder_neighbors(R, 5, chunk=7)
    b, cb = decoder_neighbors(R, 5)
    np.testing.assert_array_equal(a, b)
    unit = R.numpy() / np.linalg.norm(R.numpy(), axis=1, keepdims=True)
    full = unit @ unit.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_array_equal(a, np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(ca, np.take_along_axis(full, a, 1), atol=1e-5)
    assert decoder_neighbors(R[:1], 5)[0].shape == (1, 0)


def test_heatmaps_hold_the_codes_of_every_exemplar_patch():
    rng = np.random.default_rng(3)
    n_img, n_tok, d = 12, 5, 4
    image_id = np.repeat(np.arange(100, 100 + n_img), n_tok)
    token = np.tile(np.arange(n_tok), n_img).astype(np.int32)
    acts = rng.normal(0, 1, (len(token), d)).astype(np.float32)
    acts[:, 3] = -1.0  # feature 3 never fires: no exemplar, no heat map
    sae = LinearReluSAE(torch.eye(d))
    cfg = StatsConfig(n_top=4)
    st = compute_stats(
        sae, per_image_batches(image_id, token, acts, 5), None, [], 1, cfg, "r", False
    )
    hm = exemplar_heatmaps(sae, per_image_batches(image_id, token, acts, 3), st, 3, progress=False)
    assert hm.shape == (d, 3, 4) and st.heatmaps is hm
    codes = np.maximum(acts, 0).reshape(n_img, n_tok, d)
    for f in range(3):
        for r in range(3):
            want = codes[st.top_image[f, r] - 100, 1:, f]
            np.testing.assert_allclose(hm[f, r], want)
            assert hm[f, r].max() == pytest.approx(st.top_value[f, r])
    assert np.isnan(hm[3]).all()


def test_stats_stage_on_real_shards_writes_tables_heatmaps_and_pictures(tmp_path, monkeypatch):
    """The stage over a real two-split shard set and a saved SAE, as the flow runs it."""
    import json

    import pyarrow as pa
    from PIL import Image

    from saev_core import shards
    from saev_core.sae import SAE, SAEConfig
    from saev_core.stats.stage import StatsStage, stats_stage

    monkeypatch.chdir(tmp_path)
    n_img, n_tok, d = 8, 5, 6  # CLS + a 2 x 2 patch grid
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(n_img, n_tok, d)).astype(np.float16)
    root = Path("acts")
    files = []
    for split, ids in (("train", np.arange(0, 5)), ("val", np.arange(5, n_img))):
        w = shards.ShardWriter(root, 0, split, d, np.dtype("float16"), n_tok, 2, 4)
        w.add(ids, np.arange(n_tok, dtype=np.int32), acts[ids])
        files += w.close()
    tokens = {"policy": "all", "n_prefix_tokens": 1, "n_patches": 4, "grid": [2, 2],
              "written": list(range(n_tok)), "n_tokens_written": n_tok}  # fmt: skip
    manifest = {"schema": shards.SCHEMA_VERSION, "model": {"name": "tiny", "weights_sha256": "x"},
                "layers": [0], "tokens": tokens, "dtype": "float16", "d_model": d,
                "n_images": n_img, "files": files}  # fmt: skip
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    Path("img").mkdir()
    for i in range(n_img):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(f"img/{i}.png")
    labels = [["odd"] if i % 2 else ["even"] for i in range(n_img)]
    pq.write_table(
        pa.table({"image_id": pa.array(np.arange(n_img), pa.int64()),
                  "split": ["train"] * 5 + ["val"] * 3,
                  "path": [f"img/{i}.png" for i in range(n_img)],
                  "labels": pa.array(labels, pa.list_(pa.string()))}),
        root / shards.IMAGES,
    )  # fmt: skip
    sae = SAE(
        SAEConfig(arch="topk", d_model=d, d_sae=8, k=2), generator=torch.Generator().manual_seed(0)
    )
    sae.save("sae", extra={"layer": 0, "metrics": {"l0": 2.0}})
    io = StatsStage(sae_dir="sae", shard_dir="acts", out_dir="stats/t", run="t",
                    options={"n_top": 3, "n_heatmaps": 2, "splits": ["train", "val"], "batch_images": 3})  # fmt: skip
    summary = stats_stage(io, progress=False)
    out = Path("stats/t")
    assert summary["n_images"] == n_img and summary["labels"] == ["even", "odd"]
    assert sorted(p.name for p in out.iterdir()) == [
        "browser.html", "exemplars.png", "feature_labels.parquet", "features.parquet",
        "heatmaps.parquet", "label_controls.parquet", "neighbors.parquet", "run.parquet",
        "top_examples.parquet",
    ]  # fmt: skip
    run = pq.read_table(out / "run.parquet").to_pandas()
    assert (run.grid_rows[0], run.grid_cols[0], run.n_tokens[0]) == (2, 2, n_img * n_tok)
    # a flat train/val shard set: chosen on train, reported on val
    assert (run.select_split[0], run.report_split[0], run.tokens[0]) == ("train", "val", "all")
    fl = pq.read_table(out / "feature_labels.parquet").to_pandas()
    # image labels per split (train: ids 0-4, val: 5-7), no patch labels
    n_pos = fl.groupby(["split", "label"]).image_n_pos.unique().map(list).to_dict()
    assert n_pos == {("train", "even"): [3], ("train", "odd"): [2],
                     ("val", "even"): [1], ("val", "odd"): [2]}  # fmt: skip
    assert fl.n_pos.eq(0).all() and len(fl) == 2 * 2 * 8
    hm = pq.read_table(out / "heatmaps.parquet").to_pandas()
    top = pq.read_table(out / "top_examples.parquet").to_pandas()
    assert len(hm) == int((top["rank"] <= 2).sum()) and all(len(v) == 4 for v in hm["values"])
    # a heat map's largest patch code is the exemplar's value
    merged = hm.merge(top, on=["feature", "rank", "image_id"])
    np.testing.assert_allclose([max(v) for v in merged["values"]], merged.value, rtol=1e-5)
    assert "feature" in (out / "browser.html").read_text()[:2000].lower()


# -- the stats stage: token policy, select/report splits, shuffled-label controls ---------------


def _shard_set(root, acts_by_split, tokens, image_labels=None, patch_labels=None):
    """A real shard set: `acts_by_split` {split: (image ids, acts [n_img, n_tok, d])}."""
    import json

    import pyarrow as pa

    from saev_core import shards

    files, ids_all, split_all = [], [], []
    for split, (ids, acts) in acts_by_split.items():
        n_tok, d = acts.shape[1:]
        w = shards.ShardWriter(root, 0, split, d, np.dtype("float32"), n_tok, 4, 64)
        w.add(np.asarray(ids), np.arange(n_tok, dtype=np.int32), acts.astype(np.float32))
        files += w.close()
        ids_all += list(ids)
        split_all += [split] * len(ids)
    tokens = {"policy": "all", "written": list(range(n_tok)), "n_tokens_written": n_tok, **tokens}
    manifest = {"schema": shards.SCHEMA_VERSION, "model": {"name": "tiny", "weights_sha256": "x"},
                "layers": [0], "tokens": tokens, "dtype": "float32", "d_model": d,
                "n_images": len(ids_all), "files": files}  # fmt: skip
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    labels = [image_labels.get(i, []) if image_labels else [] for i in ids_all]
    pq.write_table(
        pa.table({"image_id": pa.array(ids_all, pa.int64()), "split": split_all,
                  "path": [f"img/{i}.png" for i in ids_all],
                  "labels": pa.array(labels, pa.list_(pa.string()))}),
        root / shards.IMAGES,
    )  # fmt: skip
    if patch_labels is not None:
        patch_labels.to_parquet(root / shards.PATCH_LABELS)


def _identity_sae(path, d, tokens):
    """A ReLU SAE whose code is relu(x): feature j reads input dimension j."""
    from saev_core.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(arch="relu", d_model=d, d_sae=d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save(path, extra={"layer": 0, "tokens": tokens, "metrics": {"l0": 1.0}})
    return sae


def _run_stage(tmp_path, **options):
    from saev_core.stats.stage import StatsStage, stats_stage

    io = StatsStage(
        sae_dir=str(tmp_path / "sae"), shard_dir=str(tmp_path / "acts"),
        out_dir=str(tmp_path / "stats" / "t"), run="t",
        options={"n_top": 3, "n_heatmaps": 0, "batch_images": 4, "n_bins": 600, **options},
        browser={"enabled": False},
    )  # fmt: skip
    summary = stats_stage(io, progress=False)
    out = tmp_path / "stats" / "t"
    tables = {p.stem: pq.read_table(p).to_pandas() for p in out.glob("*.parquet")}
    return summary, tables


def test_a_patches_only_sae_gets_patch_statistics_and_cls_apart_when_asked(tmp_path):
    """Stats stream the tokens the SAE was trained on: a CLS spike on feature 0 reaches neither
    n_tokens, freq nor max_act (the intervention dose); prefix_apart measures CLS on its own."""
    rng = np.random.default_rng(0)
    n_tok, d = 5, 3  # CLS + a 2 x 2 patch grid
    acts = rng.uniform(0.1, 1.0, (10, n_tok, d))
    acts[:, 0, 0] = 50.0  # CLS
    acts[:, 0, 1] = -1.0  # feature 1 never fires on CLS
    by_split = {"val": (np.arange(5), acts[:5]), "test": (np.arange(5, 10), acts[5:])}
    _shard_set(tmp_path / "acts", by_split, {"n_prefix_tokens": 1, "has_cls": True,
                                             "n_registers": 0, "grid": [2, 2]})  # fmt: skip
    _identity_sae(tmp_path / "sae", d, "patches")
    summary, t = _run_stage(tmp_path)
    assert summary["n_tokens"] == 10 * 4 and summary["tokens"] == "patches"
    run, feats = t["run"].iloc[0], t["features"].set_index("feature")
    assert (run.n_tokens, run.tokens, bool(run.has_cls)) == (40, "patches", True)
    np.testing.assert_allclose(feats.max_act, acts[:, 1:].max(axis=(0, 1)), rtol=1e-6)
    assert feats.max_act[0] < 1.0 and feats.freq_cls.isna().all()
    assert (t["top_examples"].token >= 1).all()

    # asked for: CLS in a pass of its own; the patch statistics stay as they were
    _, t2 = _run_stage(tmp_path, prefix_apart=True)
    f2 = t2["features"].set_index("feature")
    np.testing.assert_allclose(f2.freq_cls, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(f2.max_act, feats.max_act)
    assert t2["run"].n_tokens[0] == 40

    # a policy other than the SAE's, when asked: every token (CLS spike included)
    _, t3 = _run_stage(tmp_path, tokens="all")
    assert t3["run"].n_tokens[0] == 50 and t3["features"].max_act[0] == pytest.approx(50.0)


def test_whether_token_0_is_cls_comes_from_the_manifest(tmp_path):
    """A backbone with one register and no CLS: token 0 is not counted as CLS."""
    rng = np.random.default_rng(1)
    acts = rng.uniform(0.1, 1.0, (8, 5, 2))
    by_split = {"val": (np.arange(4), acts[:4]), "test": (np.arange(4, 8), acts[4:])}
    _shard_set(tmp_path / "acts", by_split, {"n_prefix_tokens": 1, "has_cls": False,
                                             "n_registers": 1, "grid": [2, 2]})  # fmt: skip
    _identity_sae(tmp_path / "sae", 2, "all")
    _, t = _run_stage(tmp_path)
    assert t["features"].freq_cls.isna().all() and not bool(t["run"].has_cls[0])
    assert t["run"].n_tokens[0] == 8 * 5


def _leader_world(tmp_path, n_img=60):
    """val: feature 0 tracks "red" patches closely, feature 1 loosely; test: the other way."""
    rng = np.random.default_rng(2)
    n_tok, d = 5, 3
    red = rng.random((2 * n_img, 4)) < 0.3
    acts = rng.uniform(0.05, 1.0, (2 * n_img, n_tok, d))
    val, test = slice(0, n_img), slice(n_img, 2 * n_img)
    acts[val, 1:, 0] += 2.0 * red[val] + rng.normal(0, 0.3, red[val].shape)
    acts[val, 1:, 1] += 1.0 * red[val] + rng.normal(0, 1.0, red[val].shape)
    acts[test, 1:, 0] += 1.0 * red[test] + rng.normal(0, 1.0, red[test].shape)
    acts[test, 1:, 1] += 2.0 * red[test] + rng.normal(0, 0.3, red[test].shape)
    ids = np.arange(2 * n_img)
    img, patch = np.nonzero(red)
    patch_labels = pd.DataFrame({"image_id": ids[img], "token": patch + 1, "label": "red"})
    image_labels = {int(i): ["red"] for i in np.unique(img)}
    by_split = {"val": (ids[val], acts[val]), "test": (ids[test], acts[test])}
    _shard_set(tmp_path / "acts", by_split, {"n_prefix_tokens": 1, "has_cls": True,
               "n_registers": 0, "grid": [2, 2]}, image_labels, patch_labels)  # fmt: skip
    _identity_sae(tmp_path / "sae", d, "all")
    codes = np.maximum(acts[:, 1:], 0)
    return codes, red, val, test


def test_leaders_are_chosen_on_val_and_reported_on_test(tmp_path):
    """feature_labels holds each split's scores (sklearn's AUROC); label_leaders and
    best_feature_per_concept pick val's best (0), and show its test AUROC, not test's best."""
    import json

    from sklearn.metrics import roc_auc_score

    from saev_core.warehouse import run_query

    codes, red, val, test = _leader_world(tmp_path)
    summary, t = _run_stage(tmp_path, splits=["val", "test"])
    assert (summary["select_split"], summary["report_split"]) == ("val", "test")
    fl = t["feature_labels"].set_index(["split", "feature"])
    for split, sl in (("val", val), ("test", test)):
        for f in range(3):
            want = roc_auc_score(red[sl].ravel(), codes[sl, :, f].ravel())
            assert fl.loc[(split, f), "auroc"] == pytest.approx(want, abs=2e-3)
    assert fl.loc[("val", 0), "auroc"] > fl.loc[("val", 1), "auroc"]
    assert fl.loc[("test", 1), "auroc"] > fl.loc[("test", 0), "auroc"]

    db, root = _warehouse_of(tmp_path)
    rows = json.loads(run_query(db, "best_feature_per_concept", {}, fmt="json", root=root))
    (r,) = rows
    assert (r["feature"], r["select_split"], r["report_split"]) == (0, "val", "test")
    want_test = roc_auc_score(red[test].ravel(), codes[test, :, 0].ravel())
    want_val = roc_auc_score(red[val].ravel(), codes[val, :, 0].ravel())
    assert r["auroc"] == pytest.approx(want_test, abs=2e-3)
    assert r["select_auroc"] == pytest.approx(want_val, abs=2e-3)
    lc = t["label_controls"].set_index("split")
    assert r["control_auroc"] == pytest.approx(lc.loc["val", "control_auroc"])
    top = json.loads(
        run_query(db, "top_features_for_label", {"label": "red", "run": "t"}, fmt="json", root=root)
    )
    assert [x["feature"] for x in top][:2] == [0, 1]
    assert top[0]["auroc"] == pytest.approx(want_test, abs=2e-3)
    per_feature = json.loads(
        run_query(db, "labels_for_feature", {"run": "t", "feature": "0"}, fmt="json", root=root)
    )
    assert len(per_feature) == 1 and per_feature[0]["split"] == "test"


def test_shuffled_label_control_is_chance_and_matches_sklearn(tmp_path):
    """Random codes: the control's best AUROC over features is near 0.5, and it equals sklearn's
    AUROC of the best feature on the shuffled labels (each image's mask moved to another image)."""
    from sklearn.metrics import roc_auc_score

    from saev_core.stats.splits import CONTROL_PREFIX, pop_controls, shuffled_labels

    rng = np.random.default_rng(3)
    n_img, n_patch, d = 300, 4, 4
    codes = rng.exponential(1.0, (n_img, n_patch, d)) * (rng.random((n_img, n_patch, d)) < 0.6)
    red = np.zeros((n_img, n_patch), bool)
    red[: n_img // 2, :2] = True  # red on the left half of the first half of the images
    ids = np.arange(1000, 1000 + n_img)
    img, patch = np.nonzero(red)
    labels = pd.DataFrame({"image_id": ids[img], "token": patch + 1, "label": "red"})
    patch_aug, image_aug, names = shuffled_labels(labels, None, None, ids, seed=7)
    assert names == ["red", CONTROL_PREFIX + "red"] and image_aug is None
    shuf = patch_aug[patch_aug.label == CONTROL_PREFIX + "red"]
    # masks move with their image: every receiving image gets one source image's whole mask
    assert shuf.groupby("image_id").token.apply(tuple).isin([(1, 2)]).all()
    assert shuf.image_id.nunique() == n_img // 2 and len(shuf) == len(labels)
    token = np.tile(np.arange(n_patch + 1), n_img)
    acts = np.zeros((n_img, n_patch + 1, d), np.float32)
    acts[:, 1:] = codes
    batches = per_image_batches(np.repeat(ids, n_patch + 1), token, acts.reshape(-1, d), 50)
    st = compute_stats(
        LinearReluSAE(torch.eye(d)), batches, patch_aug, names, 1, StatsConfig(n_bins=600),
        "r", False,
    )  # fmt: skip
    st = pop_controls(st, 1)
    assert st.label_names == ("red",) and st.auroc.shape == (1, d)
    y = np.zeros((n_img, n_patch), bool)
    y[np.searchsorted(ids, shuf.image_id), shuf.token - 1] = True
    per_feature = [roc_auc_score(y.ravel(), codes[:, :, f].ravel()) for f in range(d)]
    assert st.control_auroc[0] == pytest.approx(max(per_feature), abs=2e-3)
    assert abs(st.control_auroc[0] - 0.5) < 0.06  # the best of d random features: near chance
    y_img = y.any(1)
    per_feature_img = [roc_auc_score(y_img, codes[:, :, f].max(1)) for f in range(d)]
    assert st.control_image_auroc[0] == pytest.approx(max(per_feature_img), abs=2e-3)


def _warehouse_of(tmp_path):
    import shutil

    from saev_core.warehouse import build_warehouse

    root = tmp_path
    shutil.copytree(Path(__file__).resolve().parents[1] / "sql", root / "sql")
    (root / "artifacts").mkdir()
    shutil.move(str(tmp_path / "stats"), root / "artifacts" / "stats")
    db = root / "w.duckdb"
    build_warehouse(db, root=root, sql_dir="sql")
    return db, root


def test_report_split_precision_and_recall_use_the_select_splits_threshold(tmp_path):
    """The stage carries val's best-F1 threshold of every (label, feature) into test: test's
    precision_at_select / recall_at_select are sklearn's at that cut on test's data, and the
    queries show them (test's own tuned values only as oracle_* columns)."""
    import json

    from sklearn.metrics import precision_score, recall_score

    from saev_core.warehouse import run_query

    codes, red, val, test = _leader_world(tmp_path)
    _, t = _run_stage(tmp_path, splits=["val", "test"])
    fl = t["feature_labels"].set_index(["split", "feature"])
    red_img = red.any(1)
    for f in range(3):
        for level, score, y, pre in (
            ("patch", codes[:, :, f], red, ""),
            ("image", codes[:, :, f].max(1), red_img, "image_"),
        ):
            thr = fl.loc[("val", f), pre + "threshold"]
            s_test, y_test = score[test].ravel(), y[test].ravel()
            pred = s_test >= thr if thr > 0 else s_test > 0
            got_p = fl.loc[("test", f), pre + "precision_at_select"]
            got_r = fl.loc[("test", f), pre + "recall_at_select"]
            assert got_p == pytest.approx(precision_score(y_test, pred), abs=1e-12), (level, f)
            assert got_r == pytest.approx(recall_score(y_test, pred), abs=1e-12), (level, f)
            # on the select split they are its own best-F1 precision and recall
            assert fl.loc[("val", f), pre + "precision_at_select"] == pytest.approx(
                fl.loc[("val", f), pre + "precision"]
            )
    db, root = _warehouse_of(tmp_path)

    def q(name, **params):
        return json.loads(run_query(db, name, params, fmt="json", root=root))

    top = {r["feature"]: r for r in q("top_features_for_label", label="red", run="t")}
    for f in range(3):
        assert top[f]["precision_at_select"] == pytest.approx(
            fl.loc[("test", f), "precision_at_select"]
        )
        assert top[f]["recall_at_select"] == pytest.approx(fl.loc[("test", f), "recall_at_select"])
        assert top[f]["oracle_precision"] == pytest.approx(fl.loc[("test", f), "precision"])
        assert "precision" not in top[f] and "recall" not in top[f]
    (best,) = q("best_feature_per_concept")
    assert best["precision_at_select"] == pytest.approx(fl.loc[("test", 0), "precision_at_select"])
    assert best["recall_at_select"] == pytest.approx(fl.loc[("test", 0), "recall_at_select"])
    fl_view = json.loads(
        run_query(
            db, "select split, feature, f1_at_select, precision_at_select, recall_at_select "
            "from feature_labels where split = 'test' and feature = 0", {}, fmt="json", root=root,
        )
    )  # fmt: skip
    p, r = fl.loc[("test", 0), "precision_at_select"], fl.loc[("test", 0), "recall_at_select"]
    assert fl_view[0]["f1_at_select"] == pytest.approx(2 * p * r / (p + r))


def test_the_controls_error_bound_is_kept(tmp_path):
    """pop_controls keeps a proven bound on the control's best AUROC, written as
    label_controls.control_auroc_err (and the image one) next to control_auroc."""
    import json

    from saev_core.stats.splits import CONTROL_PREFIX, pop_controls
    from saev_core.warehouse import run_query

    # the bound itself: features [0.60 +- 0.01, 0.58 +- 0.05] -> the exact max lies in
    # [max(0.59, 0.53), max(0.61, 0.63)] = [0.59, 0.63], so within 0.60 +- 0.03
    codes, red, val, test = _leader_world(tmp_path)
    _, t = _run_stage(tmp_path, splits=["val", "test"], n_bins=2, refine_passes=0, exact_codes=0)
    lc = t["label_controls"].set_index("split")
    assert "control_auroc_err" in lc and "control_image_auroc_err" in lc
    assert (lc.control_auroc_err >= 0).all() and (lc.control_image_auroc_err >= 0).all()
    fl = t["feature_labels"]
    # a two-bin histogram, no refinement: real bounds, not zero
    assert fl.auroc_err.max() > 0 and lc.control_auroc_err.max() > 0
    st = _fake_label_stats(
        [[0.7, 0.7], [0.60, 0.58]], [[0.0, 0.0], [0.01, 0.05]], ("red", CONTROL_PREFIX + "red")
    )
    out = pop_controls(st, 1)
    assert out.control_auroc[0] == pytest.approx(0.60)
    assert out.control_auroc_err[0] == pytest.approx(0.03)
    assert np.isnan(out.control_image_auroc_err[0])  # image errs unknown here
    db, root = _warehouse_of(tmp_path)
    rows = json.loads(
        run_query(db, "select * from label_controls order by split", {}, fmt="json", root=root)
    )
    assert [r["control_auroc_err"] for r in rows] == pytest.approx(
        list(lc.sort_index().control_auroc_err)
    )


def test_leaders_show_the_select_margin_over_the_control(tmp_path):
    """label_leaders / best_feature_per_concept compare the select split's best with the
    control, both maxima on the select split (select_margin), and the view says so."""
    import json

    from saev_core.warehouse import run_query

    _leader_world(tmp_path)
    _, t = _run_stage(tmp_path, splits=["val", "test"])
    lc = t["label_controls"].set_index("split")
    db, root = _warehouse_of(tmp_path)
    (lead,) = json.loads(run_query(db, "best_feature_per_concept", {}, fmt="json", root=root))
    assert lead["select_margin"] == pytest.approx(lead["select_auroc"] - lead["control_auroc"])
    rows = json.loads(
        run_query(
            db, "select select_margin, select_auroc, control_auroc, control_auroc_err, "
            "image_select_margin, image_select_auroc, control_image_auroc from label_leaders",
            {}, fmt="json", root=root,
        )
    )  # fmt: skip
    (r,) = rows
    assert r["select_margin"] == pytest.approx(r["select_auroc"] - r["control_auroc"])
    assert r["image_select_margin"] == pytest.approx(
        r["image_select_auroc"] - r["control_image_auroc"]
    )
    assert r["control_auroc_err"] == pytest.approx(lc.loc["val", "control_auroc_err"])
    assert "fair comparison" in (root / "sql/views/57_label_leaders.sql").read_text()


def _fake_label_stats(auroc_ls, err_ls, names):
    """A FeatureStats with only label fields that matter to pop_controls."""
    from dataclasses import fields

    from saev_core.stats import LABEL_FIELDS, FeatureStats

    a = np.asarray(auroc_ls, dtype=np.float64)
    n_l, s = a.shape
    kw = {f.name: None for f in fields(FeatureStats)}
    kw.update({name: np.zeros((n_l, s)) for name in LABEL_FIELDS})
    kw.update(n_pos=np.zeros(n_l), image_n_pos=np.zeros(n_l), label_names=tuple(names))
    kw.update(auroc=a, auroc_err=np.asarray(err_ls, dtype=np.float64), image_auroc=a.copy())
    kw["image_auroc_err"] = None
    return FeatureStats(**{k: v for k, v in kw.items()})


def test_a_prefix_only_sae_skips_label_association_with_a_message(tmp_path, capsys):
    """A CLS/register SAE has no patch codes: label association is skipped (said so), not
    written as NaN patch scores and an image AUROC of 0.5 everywhere; frequencies stay."""
    codes, red, val, test = _leader_world(tmp_path)
    _identity_sae(tmp_path / "sae", 3, "prefix")
    summary, t = _run_stage(tmp_path, splits=["val", "test"])
    assert "label association is measured on patch codes" in capsys.readouterr().err
    assert summary["labels"] == [] and summary["tokens"] == "prefix"
    assert len(t["feature_labels"]) == 0 and len(t["label_controls"]) == 0
    feats = t["features"].set_index("feature")
    assert t["run"].n_tokens[0] == 2 * 60  # one CLS per image
    assert feats.freq.notna().all() and (feats.freq > 0).any()
