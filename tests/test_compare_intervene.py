"""The best PCA direction's edit beside the best SAE feature's (saev_core.compare_intervene).

Known answers first: with the tiny ViT's final layer norm made the identity and the edit at its
last block, the head reads the CLS token linearly, so clamping the projection on `u` moves
logit k by exactly `W_k . u (s M - p(x_cls))`, a direction orthogonal to the head's row moves
nothing, and a norm-matched random direction v moves it by `W_k . v |s M - p(x_cls)|`. Then the
whole stage on a real tiny pipeline (extract, train, stats, baselines on the tiny world), its
numbers recomputed here from hidden states, scikit-learn's PCA and the raw shards; and the named
query on a warehouse built from what it wrote.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import permutation_test

from saev_core import compare_intervene as CI
from saev_core.intervene import random_direction

ROOT = Path(__file__).resolve().parents[1]
D = 32


# ---------------------------------------------------------------------------------------------
# known answers on an identity-layer-norm classifier


@pytest.fixture(scope="module")
def linear_head(tiny_vit):
    """The tiny ViT with its final layer norm replaced by the identity: logits = W x_cls + b."""
    from saev_core.backbone import load_classifier

    model, _ = load_classifier(tiny_vit, device="cpu")
    model.vit.layernorm = torch.nn.Identity()
    reader = CI.logit_reader(model, lambda images: torch.zeros(len(images), 3, 32, 32))
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(6, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    return model, reader, pixels, out.logits.numpy(), out.hidden_states[-1]


def _cfg(**kw):
    return CI.PcaVsSaeConfig(**{"strengths": (0.0, -2.0), "n_random": 3, "n_bootstrap": 200,
                                "n_permutations": 999, **kw})  # fmt: skip


def test_clamping_a_direction_the_head_reads_moves_its_logit_by_the_computed_amount(linear_head):
    model, reader, pixels, l0, x_ntd = linear_head
    labels = reader.labels
    j = labels.index("blue")
    W = model.classifier.weight.detach()
    u = W[j] / W[j].norm()  # the head's own row: read exactly
    mu = x_ntd.reshape(-1, D).mean(0)  # centred: tokens on both sides of 0 along u
    M = 1.7
    unit = CI.ProjectionUnit(u.numpy(), mu.numpy())
    arm = CI.Arm("pca", 5, unit, 0, M)
    dirs = [random_direction(D, 10 + k) for k in range(3)]
    all_p = (x_ntd - mu) @ u  # [n, t] signed projections
    assert (all_p < 0).any() and (all_p > 0).any()
    p = all_p[:, 0]
    for s in (0.0, -2.0, 1.0):
        out, dose = CI.edited_logits(reader, pixels, 1, arm, s, dirs, stack_rows=64)
        change = s * M - p.clamp_min(0)  # [n]: how far each CLS token moves along u (relu unit)
        want = change[:, None] * (W @ u)[None, :]  # every logit k moves by W_k . u x change
        torch.testing.assert_close(torch.from_numpy(out[0] - l0), want, rtol=1e-4, atol=1e-4)
        for k, v in enumerate(dirs):  # norm-matched random direction: |change| along v
            want_k = change.abs()[:, None] * (W @ v)[None, :]
            torch.testing.assert_close(
                torch.from_numpy(out[1 + k] - l0), want_k, rtol=1e-4, atol=1e-4
            )
        # the dose: each token moves by |s M - relu(p_t)|; at s = 0 only tokens with p_t > 0
        moved = (s * M - all_p.clamp_min(0)).abs()
        edited = moved > 0
        assert dose["n_tokens"] == x_ntd.shape[0] * x_ntd.shape[1]
        assert dose["n_tokens_edited"] == int(edited.sum())
        assert dose["dx_norm"] == pytest.approx(float(moved[edited].mean()), rel=1e-4)
        assert dose["dx_norm_all"] == pytest.approx(float(moved.mean()), rel=1e-4)
        if s == 0:
            assert dose["n_tokens_edited"] == int((all_p > 0).sum()) < dose["n_tokens"]

    # a direction orthogonal to the head's row moves blue's logit not at all
    g = torch.Generator().manual_seed(2)
    v = torch.randn(D, generator=g)
    v = v - (v @ u) * u
    ortho = CI.Arm("pca", 6, CI.ProjectionUnit(v.numpy(), mu.numpy()), 0, M)
    out, dose = CI.edited_logits(reader, pixels, 1, ortho, -2.0, [], stack_rows=64)
    assert dose["dx_norm"] > 0.1
    np.testing.assert_allclose(out[0][:, j], l0[:, j], atol=1e-4)
    assert np.abs(out[0] - l0).max() > 1e-2  # other heads do read v


def _relu_sae(u, mu, others, b_enc=0.0, f=2):
    """A ReLU SAE whose feature `f` reads and writes `u`: f(x) = relu((x - mu) . u + b_enc)."""
    from saev_core.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(arch="relu", d_model=D, d_sae=8))
    with torch.no_grad():
        sae.W_dec.copy_(others)  # [8, D], orthogonal to u
        sae.W_dec[f] = u
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_enc[f] = b_enc
        sae.b_dec.copy_(mu)
    return sae.eval()


def test_the_pca_unit_clamps_as_a_relu_sae_feature_does():
    """relu of the projection: a token with a negative projection is untouched at s = 0 (no
    mean-ablation pushing it up u) and moved by s M below; the edit equals, at every s, that of
    a ReLU SAE feature that reads and writes u (intervene.splice on an identity block)."""
    from saev_core.intervene import FeatureEdit, Splice, splice

    g = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    u, mu = basis[:, 0], torch.randn(D, generator=g)
    x = mu + torch.randn(5, D, generator=g) * 0.1
    x[0] = mu - 1.5 * u + 0.3 * basis[:, 3]  # p = -1.5
    x[1] = mu + 0.8 * u - 0.2 * basis[:, 4]  # p = +0.8
    unit = CI.ProjectionUnit(u.numpy(), mu.numpy())
    sae = _relu_sae(u, mu, basis[:, 1:9].T)
    p = (x - mu) @ u
    torch.testing.assert_close(unit.encode(x)[:, 0], p.clamp_min(0))
    block = torch.nn.Identity()
    M = 2.0
    for s in (0.0, -2.0, 0.5):
        on_pca = Splice(0, unit, FeatureEdit("clamp", (0,), s, max_acts=(M,)))
        on_sae = Splice(0, sae, FeatureEdit("clamp", (2,), s, max_acts=(M,)))
        with torch.no_grad(), splice(block, on_pca):
            x_pca = block(x)
        with torch.no_grad(), splice(block, on_sae):
            x_sae = block(x)
        torch.testing.assert_close(x_pca, x_sae, atol=1e-5, rtol=1e-5)
        want = x + (s * M - p.clamp_min(0))[:, None] * u
        torch.testing.assert_close(x_pca, want, atol=1e-5, rtol=1e-5)
        if s == 0:
            torch.testing.assert_close(x_pca[0], x[0])  # negative projection: untouched
            assert float((x_pca[1] - mu) @ u) == pytest.approx(0.0, abs=1e-5)  # p 0.8 -> 0
        else:
            assert float((x_pca[0] - mu) @ u) == pytest.approx(-1.5 + s * M, abs=1e-5)


def test_compare_concept_adjusts_each_arm_by_its_own_control(linear_head):
    model, reader, pixels, l0, x_ntd = linear_head
    j = reader.labels.index("blue")
    W = model.classifier.weight.detach()
    u = W[j] / W[j].norm()
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(D, D - 1, generator=g)], 1))
    # doses on the scale of the images' spread along u (a random-init CLS token varies little)
    x_cls = x_ntd[:, 0]
    delta = (x_cls - x_cls.mean(0)) @ u
    sd = float(delta.std())
    mu = x_cls.mean(0) + float(delta.median()) * u  # half the images on each side of 0
    # the SAE's feature 2 reads u with a threshold the PCA unit lacks, and a larger max
    sae = _relu_sae(u, mu, basis[:, 1:9].T, b_enc=-0.3 * sd)
    arms = {
        "sae": CI.Arm("sae", 2, sae, 2, 1.3 * sd),
        "pca": CI.Arm("pca", 0, CI.ProjectionUnit(u.numpy(), mu.numpy()), 0, 0.9 * sd),
    }
    cfg = _cfg(strengths=(0.0, -2.0, 2.0))
    rows = CI.compare_concept(reader, pixels, l0, "blue", 1, arms, cfg, D)
    assert len(rows) == len(cfg.strengths) * 4
    df = pd.DataFrame(rows)
    wu = float(W[j] @ u)
    n_tok = x_ntd.shape[0] * x_ntd.shape[1]
    others = [k for k in range(len(reader.labels)) if k != j]
    for s in cfg.strengths:
        g_s = df[df["strength"] == s].assign(cf=lambda t: t["control_for"].fillna(""))
        g_s = g_s.set_index(["method", "cf"])
        with torch.no_grad():
            f = sae.encode(x_cls)[:, 2]
            f_all = sae.encode(x_ntd.reshape(-1, D))[:, 2]
        p = (x_cls - mu) @ u
        ch_sae = s * 1.3 * sd - f  # how far each CLS token moves along u (error term kept)
        ch_pca = s * 0.9 * sd - p.clamp_min(0)
        e_sae, e_pca = wu * ch_sae, wu * ch_pca
        sae_row, pca_row = g_s.loc[("sae", "")], g_s.loc[("pca", "")]
        rnd_sae, rnd_pca = g_s.loc[("random", "sae")], g_s.loc[("random", "pca")]
        assert sae_row["delta"] == pytest.approx(float(e_sae.mean()), abs=1e-6)
        assert pca_row["delta"] == pytest.approx(float(e_pca.mean()), abs=1e-6)
        assert sae_row["lo"] - 1e-7 <= sae_row["delta"] <= sae_row["hi"] + 1e-7
        # each random direction v moves the logit by (W_j . v) |change|: one factor c for both
        # arms (the same directions), read off the SAE's control, checked on the PCA's
        c = float(rnd_sae["delta"]) / float(ch_sae.abs().mean())
        assert rnd_pca["delta"] == pytest.approx(c * float(ch_pca.abs().mean()), abs=1e-6)
        adj_sae = (e_sae - c * ch_sae.abs()).numpy().astype(np.float64)
        adj_pca = (e_pca - c * ch_pca.abs()).numpy().astype(np.float64)
        assert sae_row["adj_delta"] == pytest.approx(adj_sae.mean(), abs=1e-6)
        assert pca_row["adj_delta"] == pytest.approx(adj_pca.mean(), abs=1e-6)
        raw = (e_pca - e_sae).numpy().astype(np.float64)
        adj = adj_pca - adj_sae
        assert pca_row["raw_diff"] == pytest.approx(raw.mean(), abs=1e-6)
        assert pca_row["adj_diff"] == pytest.approx(adj.mean(), abs=1e-6)
        assert pca_row["adj_diff"] == pytest.approx(
            pca_row["adj_delta"] - sae_row["adj_delta"], abs=1e-9
        )
        for name in ("raw", "adj"):
            lo, hi = pca_row[f"{name}_diff_lo"], pca_row[f"{name}_diff_hi"]
            assert lo - 1e-7 <= pca_row[f"{name}_diff"] <= hi + 1e-7
        for d, col in ((raw, "raw_diff_p"), (adj, "adj_diff_p")):
            if s == 0:  # (where neither unit fires both edits are no-ops: float noise)
                continue
            # 2^6 = 64 sign vectors <= n_permutations: exact, as scipy's own
            ref = permutation_test((d,), np.mean, permutation_type="samples",
                                   n_resamples=10**4, alternative="two-sided").pvalue  # fmt: skip
            assert pca_row[col] == pytest.approx(ref, abs=1e-9)
        assert pd.isna(sae_row["adj_diff_p"]) and pd.isna(rnd_pca["raw_diff_p"])
        # the dose, over all tokens of the images, and the effect per unit of it
        moved_pca = (s * 0.9 * sd - ((x_ntd.reshape(-1, D) - mu) @ u).clamp_min(0)).abs()
        moved_sae = (s * 1.3 * sd - f_all).abs()
        for row, moved in ((pca_row, moved_pca), (sae_row, moved_sae)):
            assert row["n_tokens"] == n_tok
            assert row["n_tokens_edited"] == int((moved > 0).sum())
            assert row["dx_norm_all"] == pytest.approx(float(moved.mean()), rel=1e-4)
            assert row["delta_per_dx"] == pytest.approx(row["delta"] / row["dx_norm_all"])
            assert row["adj_delta_per_dx"] == pytest.approx(row["adj_delta"] / row["dx_norm_all"])
        for method in ("sae", "pca"):
            rnd = g_s.loc[("random", method)]
            assert rnd["n_directions"] == 3 and rnd["unit"] == arms[method].unit
            for col in ("dx_norm", "dx_norm_all", "n_tokens_edited"):
                assert rnd[col] == g_s.loc[(method, "")][col]  # moved exactly as far
        want_other = (W[others] @ u).mean() * ch_sae
        assert sae_row["other_delta"] == pytest.approx(float(want_other.mean()), abs=1e-6)
    # at s = 0 the SAE feature (threshold 0.3 sd) is silent on more tokens than relu(p)
    at0 = df[(df["strength"] == 0.0) & df["control_for"].isna()].set_index("method")
    assert at0.loc["sae", "n_tokens_edited"] <= at0.loc["pca", "n_tokens_edited"] < n_tok

    # Holm over every concept x strength: p_adjusted from the sorted p's, by hand
    CI.adjust_pairs(rows, alpha=0.05)
    pca = [r for r in rows if r["method"] == "pca"]
    ps = np.array([r["adj_diff_p"] for r in pca])
    order, m = np.argsort(ps), len(ps)
    want = np.empty(m)
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * ps[k]))
        want[k] = running
    np.testing.assert_allclose([r["p_adjusted"] for r in pca], want)
    assert all(r["alpha"] == 0.05 for r in pca)
    assert all("p_adjusted" not in r for r in rows if r["method"] != "pca")


def test_stronger_needs_the_adjusted_interval_and_the_holm_p():
    assert CI.stronger(-0.5, -0.1, 0.01, -2.0) == "pca"  # pca lowers the logit more
    assert CI.stronger(0.1, 0.5, 0.01, -2.0) == "sae"
    assert CI.stronger(-0.1, 0.1, 0.01, -2.0) == "level"
    assert CI.stronger(0.1, 0.5, 0.01, 2.0) == "pca"  # a positive clamp pushes up
    assert CI.stronger(0.1, 0.5, 0.2, -2.0) == "level"  # CI clear of 0, p_adjusted not < alpha
    assert CI.stronger(0.1, 0.5, 0.2, -2.0, alpha=0.25) == "sae"
    assert CI.stronger(float("nan"), float("nan"), 0.01, -2.0) == "level"
    assert CI.stronger(0.1, 0.5, float("nan"), -2.0) == "level"


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="at least one strength"):
        CI.PcaVsSaeConfig(strengths=())
    with pytest.raises(ValueError, match="n_random"):
        CI.PcaVsSaeConfig(n_random=0)
    with pytest.raises(ValueError, match="alpha"):
        CI.PcaVsSaeConfig(alpha=1.5)
    with pytest.raises(ValueError, match="nonzero"):
        CI.ProjectionUnit(np.zeros(4), np.zeros(4))


def test_nan_is_written_as_null(tmp_path):
    import duckdb

    row = {"backbone": "b", "concept": "c", "method": "sae", "unit": 1, "strength": -2.0,
           "n_images": 3, "delta": -1.0, "adj_diff_p": float("nan"),
           "delta_per_dx": np.float64("nan")}  # fmt: skip
    path = CI.write_pca_vs_sae([row], tmp_path / "t.parquet")
    got = duckdb.sql(
        f"select adj_diff_p is null, delta_per_dx is null, coalesce(delta_per_dx > 0, false), "
        f"delta from '{path}'"
    ).fetchall()
    assert got == [(True, True, False, -1.0)]


# ---------------------------------------------------------------------------------------------
# the whole stage on a tiny real pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_vit, tiny_world, tmp_path_factory):
    import dataclasses

    from saev_core.baselines import BaselinesConfig, sae_vs_baselines, write_baselines
    from saev_core.extract import ExtractConfig, extract
    from saev_core.stats.stage import StatsStage, stats_stage
    from saev_core.training.stage import TrainStage, train_stage

    root = tmp_path_factory.mktemp("cmpint")
    p = {"root": root, "shards": root / "acts", "sae": root / "sae", "stats": root / "stats",
         "baselines": root / "baselines.parquet", "out": root / "artifacts/compare/intervene"}  # fmt: skip
    extract(
        ExtractConfig(model=str(tiny_vit), data=str(tiny_world), out_dir=str(p["shards"]),
                      layers=(1,), batch_size=16, images_per_row_group=8, n_workers=1,
                      device="cpu"),
        progress=False,
    )  # fmt: skip
    sae = {"arch": "topk", "d_sae": 64, "k": 4, "batch_size": 64, "n_epochs": 2,
           "warmup_steps": 2, "aux_k": 8, "dead_after_tokens": 200, "norm_max_tokens": 1000,
           "device": "cpu", "seed": 0}  # fmt: skip
    train_stage(TrainStage(shard_dir=str(p["shards"]), layer=1, out_dir=str(p["sae"]), sae=sae),
                progress=False)  # fmt: skip
    stats_stage(
        StatsStage(sae_dir=str(p["sae"]), shard_dir=str(p["shards"]), out_dir=str(p["stats"]),
                   run="supervised",
                   options={"n_top": 4, "n_heatmaps": 4, "batch_images": 8, "device": "cpu"},
                   browser={"enabled": False}),
        progress=False,
    )  # fmt: skip
    bcfg = BaselinesConfig(methods=("pca", "sae"), n_fit=150, n_boot=50, seed=0)
    table, units = sae_vs_baselines(p["shards"], p["sae"], bcfg)
    # as flows.compare records it: the SAE the table was computed with
    write_baselines(table, p["baselines"], {"sae": str(p["sae"]), "cfg": dataclasses.asdict(bcfg)})
    kw = {"strengths": [0.0, -2.0], "n_random": 2, "n_bootstrap": 100, "n_permutations": 200}
    metrics = CI.pca_vs_sae(
        backbone_dir=tiny_vit, shard_dir=p["shards"], sae_dir=p["sae"], stats_dir=p["stats"],
        baselines_path=p["baselines"], data_dir=tiny_world, out_dir=p["out"],
        backbone="supervised", progress=False, **kw,
    )  # fmt: skip
    return p, table, units, metrics, kw


def test_stage_writes_the_table_and_its_numbers_are_the_edit_recomputed(pipeline, tiny_vit,
                                                                        tiny_world):  # fmt: skip
    import pyarrow.parquet as pq
    from sklearn.decomposition import PCA

    from saev_core import loaders
    from saev_core.backbone import load_classifier
    from saev_core.data import load_records, open_image
    from saev_core.hypotheses import Hypothesis, load_reader
    from saev_core.sae import SAE

    p, table, units, metrics, kw = pipeline
    got = pd.read_parquet(p["out"] / "pca_vs_sae.parquet")
    assert list(got.columns) == list(CI.COLUMNS)
    meta = json.loads(pq.read_schema(p["out"] / "pca_vs_sae.parquet").metadata[b"saev"])
    assert meta["layer"] == 1 and meta["backbone"] == "supervised"
    concepts = sorted(set(got["concept"]))
    assert len(concepts) >= 2 and set(got["method"]) == {"sae", "pca", "random"}
    assert set(got["select_split"]) == {"val"} and set(got["report_split"]) == {"test"}
    for c in concepts:
        assert len(got[got["concept"] == c]) == 2 * 4  # 2 strengths x (sae, pca, 2 randoms)
    pca_rows = got[got["method"] == "pca"]
    for col in ("adj_diff_p", "raw_diff_p", "p_adjusted"):
        assert got.loc[got["method"] != "pca", col].isna().all()
        assert pca_rows[col].between(0, 1).all()
    assert (pca_rows["p_adjusted"] >= pca_rows["adj_diff_p"] - 1e-12).all()  # Holm: never lower
    assert set(pca_rows["alpha"]) == {0.05} and meta["correction"] == "holm"
    assert metrics["n_concepts"] == len(concepts) and set(metrics["by_strength"]) == {"0", "-2"}
    e = metrics["by_strength"]["-2"]
    assert sorted(e["pca_stronger"] + e["sae_stronger"] + e["level"]) == concepts

    # recompute one concept at s = -2 from scratch: hidden states, sklearn's PCA, the shards
    sae = SAE.load(p["sae"]).eval()
    model, _ = load_classifier(tiny_vit, device="cpu")
    rd = load_reader(Hypothesis(target="x", model=str(tiny_vit)))
    recs = load_records(tiny_world, ["test"])
    x_fit = loaders.sample_rows(p["shards"], 1, 150, 0, ["train"], "patches")
    pca = PCA(n_components=min(x_fit.shape), random_state=0).fit(x_fit.astype(np.float64))
    # M over the tokens and splits the stats run recorded (its max_act's)
    run = pd.read_parquet(p["stats"] / "run.parquet").iloc[0]
    assert meta["tokens"] == run["tokens"] and meta["splits"] == run["splits"].split(",")
    every = loaders.sample_rows(p["shards"], 1, 10**9, 0, meta["splits"], meta["tokens"])
    every = every.astype(np.float64)
    feats = pd.read_parquet(p["stats"] / "features.parquet").set_index("feature")["max_act"]
    for c in concepts:
        r_sae = got[(got.concept == c) & (got.method == "sae") & (got.strength == -2.0)].iloc[0]
        r_pca = got[(got.concept == c) & (got.method == "pca") & (got.strength == -2.0)].iloc[0]
        b_sae = table[(table.method == "sae") & (table.concept == c)].iloc[0]
        b_pca = table[(table.method == "pca") & (table.concept == c)].iloc[0]
        assert r_sae["unit"] == b_sae["unit"] and r_pca["unit"] == b_pca["unit"]
        u = pca.components_[int(b_pca["unit"])] * int(b_pca["sign"])
        np.testing.assert_allclose(b_pca["direction"], u, atol=1e-5)
        M = float(((every - pca.mean_) @ u).max())
        assert r_pca["max_value"] == pytest.approx(M, rel=1e-5)
        assert r_sae["max_value"] == pytest.approx(float(feats[int(r_sae["unit"])]))
        imgs = [open_image(r) for r in recs if c in r.labels]
        assert r_sae["n_images"] == len(imgs)
        with torch.no_grad():
            out = model(pixel_values=rd.preprocess(imgs), output_hidden_states=True)
            x = out.hidden_states[2]  # block 1's output: the last block, then layernorm + head
            j = rd.labels.index(c)

            def head(x_edit, j=j):
                return model.classifier(model.vit.layernorm(x_edit)[:, 0])[:, j]

            f = sae.encode(x)
            f2 = f.clone()
            f2[..., int(r_sae["unit"])] = -2.0 * r_sae["max_value"]
            x_sae = x - sae.decode(f) + sae.decode(f2)  # PAPER.md step 5
            ut = torch.as_tensor(u, dtype=torch.float32)
            mu = torch.as_tensor(pca.mean_, dtype=torch.float32)
            moved = -2.0 * M - ((x - mu) @ ut).clamp_min(0)  # relu of the projection
            x_pca = x + moved[..., None] * ut
            d_sae = (head(x_sae) - out.logits[:, j]).numpy()
            d_pca = (head(x_pca) - out.logits[:, j]).numpy()
        assert r_sae["delta"] == pytest.approx(float(d_sae.mean()), abs=2e-4)
        assert r_pca["delta"] == pytest.approx(float(d_pca.mean()), abs=2e-4)
        assert r_pca["raw_diff"] == pytest.approx(float((d_pca - d_sae).mean()), abs=3e-4)
        assert r_pca["dx_norm_all"] == pytest.approx(float(moved.abs().mean()), rel=1e-4)
        assert r_pca["n_tokens"] == x.shape[0] * x.shape[1] == r_sae["n_tokens"]
        assert r_pca["adj_diff"] == pytest.approx(r_pca["adj_delta"] - r_sae["adj_delta"])


def test_stage_refuses_the_select_split_and_unknown_keys(pipeline, tiny_vit, tiny_world):
    p, *_ = pipeline
    args = dict(backbone_dir=tiny_vit, shard_dir=p["shards"], sae_dir=p["sae"],
                stats_dir=p["stats"], baselines_path=p["baselines"], data_dir=tiny_world,
                out_dir=p["root"] / "nope", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="would not be held out"):
        CI.pca_vs_sae(**args, split="val")
    with pytest.raises(ValueError, match="unknown key"):
        CI.pca_vs_sae(**args, strenghts=[1.0])
    with pytest.raises(ValueError, match="not labels of the head"):
        CI.pca_vs_sae(**args, concepts=["nope"])
    assert not (p["root"] / "nope").exists()


def test_baselines_of_another_sae_are_refused(pipeline, tiny_vit, tiny_world):
    import pyarrow.parquet as pq

    from saev_core.baselines import write_baselines
    from saev_core.sae import SAE
    from saev_core.sae.checks import sae_sha256

    p, table, *_ = pipeline
    W_dec = SAE.load(p["sae"]).W_dec
    meta = CI.baselines_meta(p["baselines"])
    assert meta["sae"] == str(p["sae"])
    CI.check_baselines_sae(table, meta, p["sae"], W_dec, "t")  # the pipeline's own: fine
    copy = p["root"] / "sae_copy"
    shutil.copytree(p["sae"], copy, dirs_exist_ok=True)
    CI.check_baselines_sae(table, meta, copy, W_dec, "t")  # a copy with the same weights: fine
    with pytest.raises(ValueError, match=r"computed with the SAE .*\(not found\)"):
        CI.check_baselines_sae(table, {**meta, "sae": str(p["root"] / "gone")}, p["sae"],
                               W_dec, "t")  # fmt: skip
    with pytest.raises(ValueError, match="weights sha256 ff"):
        CI.check_baselines_sae(table, {**meta, "sae_sha256": "ff" * 32}, p["sae"], W_dec, "t")
    CI.check_baselines_sae(table, {**meta, "sae_sha256": sae_sha256(p["sae"])}, p["sae"],
                           W_dec, "t")  # fmt: skip
    # the same path, other weights (a retrained SAE): the sae rows' directions tell
    other = W_dec.detach().clone()
    unit = int(table.loc[table["method"] == "sae", "unit"].iloc[0])
    other[unit] = torch.roll(other[unit], 1)
    with pytest.raises(ValueError, match="another SAE"):
        CI.check_baselines_sae(table, meta, p["sae"], other, "t")
    # and through the stage, before anything is computed or written
    bad = p["root"] / "bad_baselines.parquet"
    write_baselines(table, bad, {**meta, "sae": str(p["root"] / "another_sae")})
    assert json.loads(pq.read_schema(bad).metadata[b"saev"])["sae"].endswith("another_sae")
    with pytest.raises(ValueError, match="computed with the SAE"):
        CI.pca_vs_sae(backbone_dir=tiny_vit, shard_dir=p["shards"], sae_dir=p["sae"],
                      stats_dir=p["stats"], baselines_path=bad, data_dir=tiny_world,
                      out_dir=p["root"] / "bad", progress=False)  # fmt: skip
    assert not (p["root"] / "bad").exists()


def test_the_stats_runs_token_policy_and_splits_are_read(pipeline, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p, *_ = pipeline
    run = pd.read_parquet(p["stats"] / "run.parquet").iloc[0]
    tokens, splits = CI.stats_tokens_and_splits(p["stats"])
    assert tokens == run["tokens"] and splits == run["splits"].split(",")
    assert set(splits) == {"train", "val", "test"}
    pq.write_table(pa.table({"run": ["x"], "tokens": [None], "splits": [None]}),
                   tmp_path / "run.parquet")  # fmt: skip
    with pytest.raises(ValueError, match="rerun the stats step"):
        CI.stats_tokens_and_splits(tmp_path)
    with pytest.raises(FileNotFoundError, match="token policy"):
        CI.stats_tokens_and_splits(tmp_path / "none")


def test_named_query_puts_sae_and_pca_side_by_side(pipeline):
    from saev_core.warehouse import build_compare_warehouse, run_query

    p, *_ = pipeline
    root = p["root"]
    shutil.copytree(ROOT / "sql", root / "sql", dirs_exist_ok=True)
    db = root / "warehouse/compare.duckdb"
    build_compare_warehouse(db, {"supervised": {"objective": "supervised"}}, "artifacts/compare",
                            root=root, sql_dir="sql")  # fmt: skip
    got = pd.DataFrame(json.loads(run_query(db, "pca_vs_sae_intervention", {}, fmt="json",
                                            root=root)))  # fmt: skip
    rows = pd.read_parquet(p["out"] / "pca_vs_sae.parquet")
    at = rows[rows["strength"] == -2.0]
    assert list(got["concept"]) == sorted(set(at["concept"]))  # default strength -2, ordered
    for r in got.itertuples():
        sae = at[(at.concept == r.concept) & (at.method == "sae")].iloc[0]
        pca = at[(at.concept == r.concept) & (at.method == "pca")].iloc[0]
        rnd = at[(at.concept == r.concept) & (at.method == "random")].set_index("control_for")
        assert (r.sae_feature, r.pca_component) == (sae.unit, pca.unit)
        assert r.sae_delta == pytest.approx(sae.delta) and r.pca_delta == pytest.approx(pca.delta)
        assert (r.sae_lo, r.sae_hi, r.pca_lo, r.pca_hi) == pytest.approx(
            (sae.lo, sae.hi, pca.lo, pca.hi)
        )
        # random_*: the SAE edit's control (one series for the figure); random_pca_*: PCA's
        assert (r.random_delta, r.random_lo, r.random_hi) == pytest.approx(
            tuple(rnd.loc["sae", ["delta", "lo", "hi"]])
        )
        assert r.random_pca_delta == pytest.approx(rnd.loc["pca", "delta"])
        assert (r.adj_diff, r.adj_diff_lo, r.adj_diff_hi, r.adj_diff_p, r.p_adjusted) == (
            pytest.approx((pca.adj_diff, pca.adj_diff_lo, pca.adj_diff_hi, pca.adj_diff_p,
                           pca.p_adjusted))
        )  # fmt: skip
        assert (r.raw_diff, r.raw_diff_p) == pytest.approx((pca.raw_diff, pca.raw_diff_p))
        assert (r.sae_adj_delta, r.pca_adj_delta) == pytest.approx((sae.adj_delta, pca.adj_delta))
        assert (r.sae_dx_norm_all, r.pca_dx_norm_all, r.sae_n_tokens_edited, r.n_tokens) == (
            pytest.approx((sae.dx_norm_all, pca.dx_norm_all, sae.n_tokens_edited, sae.n_tokens))
        )
        assert r.pca_delta_per_dx == pytest.approx(pca.delta_per_dx)
        assert r.stronger == CI.stronger(pca.adj_diff_lo, pca.adj_diff_hi, pca.p_adjusted, -2.0)
    zero = pd.DataFrame(json.loads(run_query(db, "pca_vs_sae_intervention", {"strength": "0"},
                                             fmt="json", root=root)))  # fmt: skip
    assert set(zero["strength"]) == {0.0} and len(zero) == len(got)
    none = json.loads(run_query(db, "pca_vs_sae_intervention", {"backbone": "clip"}, fmt="json",
                                root=root))  # fmt: skip
    assert none == []


def test_other_labels_default_to_every_other_head_label(linear_head):
    _, reader, pixels, l0, _ = linear_head
    arm = CI.Arm("pca", 0, CI.ProjectionUnit(np.eye(D)[0], np.zeros(D)), 0, 1.0)
    cfg = replace(_cfg(), strengths=(-2.0,), n_random=1)
    row, _control = CI.compare_concept(reader, pixels, l0, "red", 1, {"pca": arm}, cfg, D)
    out, _ = CI.edited_logits(reader, pixels, 1, arm, -2.0, [], 64)
    j = reader.labels.index("red")
    others = [k for k in range(len(reader.labels)) if k != j]
    assert row["other_delta"] == pytest.approx(float((out[0] - l0)[:, others].mean()), abs=1e-5)
    assert np.isnan(row.get("adj_diff_p", np.nan))  # no sae arm: nothing to pair with
