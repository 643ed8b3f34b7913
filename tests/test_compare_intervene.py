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
    g = torch.Generator().manual_seed(2)
    u = W[j] / W[j].norm()  # the head's own row: read exactly
    mu = torch.randn(D, generator=g)
    M = 1.7
    unit = CI.ProjectionUnit(u.numpy(), mu.numpy())
    arm = CI.Arm("pca", 5, unit, 0, M)
    dirs = [CI.random_direction(D, 10 + k) for k in range(3)]
    x_cls = x_ntd[:, 0]
    p = (x_cls - mu) @ u
    for s in (0.0, -2.0, 1.0):
        out, dx_norm = CI.edited_logits(reader, pixels, 1, arm, s, dirs, stack_rows=64)
        change = s * M - p  # [n]: how far each CLS token moves along u
        want = change[:, None] * (W @ u)[None, :]  # every logit k moves by W_k . u x change
        torch.testing.assert_close(torch.from_numpy(out[0] - l0), want, rtol=1e-4, atol=1e-4)
        for k, v in enumerate(dirs):  # norm-matched random direction: |change| along v
            want_k = change.abs()[:, None] * (W @ v)[None, :]
            torch.testing.assert_close(
                torch.from_numpy(out[1 + k] - l0), want_k, rtol=1e-4, atol=1e-4
            )
        # the edit's mean |dx| over all tokens (each moves by |s M - p(x_t)|)
        all_p = (x_ntd - mu) @ u
        assert dx_norm == pytest.approx(float((s * M - all_p).abs().mean()), rel=1e-4)

    # a direction orthogonal to the head's row moves blue's logit not at all
    v = torch.randn(D, generator=g)
    v = v - (v @ u) * u
    ortho = CI.Arm("pca", 6, CI.ProjectionUnit(v.numpy(), mu.numpy()), 0, M)
    out, dx_norm = CI.edited_logits(reader, pixels, 1, ortho, -2.0, [], stack_rows=64)
    assert dx_norm > 0.1
    np.testing.assert_allclose(out[0][:, j], l0[:, j], atol=1e-4)
    assert np.abs(out[0] - l0).max() > 1e-2  # other heads do read v


def test_compare_concept_rows_diff_and_permutation_p(linear_head):
    from saev_core.sae import SAE, SAEConfig

    model, reader, pixels, l0, x_ntd = linear_head
    j = reader.labels.index("blue")
    W = model.classifier.weight.detach()
    u = W[j] / W[j].norm()
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(D, D - 1, generator=g)], 1))
    # doses on the scale of the images' spread along u (a random-init CLS token varies little),
    # centred so that at s = 2 the paired difference pca - sae changes sign across images
    delta = (x_ntd[:, 0] - x_ntd[:, 0].mean(0)) @ u
    sd = float(delta.std())
    mu = x_ntd[:, 0].mean(0) + (0.8 * sd + float(delta.median())) * u
    sae = SAE(SAEConfig(arch="relu", d_model=D, d_sae=8))
    with torch.no_grad():  # feature 2 reads and writes u (relu of the centred projection)
        sae.W_dec.copy_(basis[:, 1:9].T)  # orthogonal to u
        sae.W_dec[2] = u
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(mu)
    sae.eval()
    arms = {
        "sae": CI.Arm("sae", 2, sae, 2, 1.3 * sd),
        "pca": CI.Arm("pca", 0, CI.ProjectionUnit(u.numpy(), mu.numpy()), 0, 0.9 * sd),
    }
    cfg = _cfg(strengths=(0.0, -2.0, 2.0))
    rows = CI.compare_concept(reader, pixels, l0, "blue", 1, arms, cfg, D)
    assert len(rows) == len(cfg.strengths) * 4
    df = pd.DataFrame(rows)
    x_cls = x_ntd[:, 0]
    wu = float(W[j] @ u)
    for s in cfg.strengths:
        g_s = df[df["strength"] == s].assign(cf=lambda t: t["control_for"].fillna(""))
        g_s = g_s.set_index(["method", "cf"])
        with torch.no_grad():
            f = sae.encode(x_cls)[:, 2]
        e_sae = wu * (s * 1.3 * sd - f)  # error term kept: x moves along W_dec[2] = u only
        e_pca = wu * (s * 0.9 * sd - (x_cls - mu) @ u)
        sae_row, pca_row = g_s.loc[("sae", "")], g_s.loc[("pca", "")]
        assert sae_row["delta"] == pytest.approx(float(e_sae.mean()), abs=1e-6)
        assert pca_row["delta"] == pytest.approx(float(e_pca.mean()), abs=1e-6)
        assert sae_row["lo"] - 1e-7 <= sae_row["delta"] <= sae_row["hi"] + 1e-7
        d = (e_pca - e_sae).numpy().astype(np.float64)
        assert pca_row["diff"] == pytest.approx(float(d.mean()), abs=1e-6)
        assert pca_row["diff_lo"] - 1e-7 <= pca_row["diff"] <= pca_row["diff_hi"] + 1e-7
        if s != 0:  # (at 0 the difference is 0 where the feature fires: float noise)
            assert (d > 0).all() if s < 0 else (d > 0).any() and (d < 0).any()
            # 2^6 = 64 sign vectors <= n_permutations: exact, as scipy's own
            ref = permutation_test((d,), np.mean, permutation_type="samples",
                                   n_resamples=10**4, alternative="two-sided").pvalue  # fmt: skip
            assert pca_row["diff_p"] == pytest.approx(ref, abs=1e-9)
        assert pd.isna(sae_row["diff_p"]) and pd.isna(g_s.loc[("random", "pca")]["diff_p"])
        for method in ("sae", "pca"):
            rnd = g_s.loc[("random", method)]
            assert rnd["n_directions"] == 3 and rnd["unit"] == arms[method].unit
            assert rnd["dx_norm"] == g_s.loc[(method, "")]["dx_norm"]
        others = [k for k in range(len(reader.labels)) if k != j]
        want_other = (W[others] @ u).mean() * (s * 1.3 * sd - f)
        assert sae_row["other_delta"] == pytest.approx(float(want_other.mean()), abs=1e-6)


def test_stronger_reads_the_paired_interval_the_way_the_clamp_pushes():
    assert CI.stronger(-0.5, -0.1, -2.0) == "pca"  # pca lowers the logit more
    assert CI.stronger(0.1, 0.5, -2.0) == "sae"
    assert CI.stronger(-0.1, 0.1, -2.0) == "level"
    assert CI.stronger(0.1, 0.5, 2.0) == "pca"  # a positive clamp pushes up
    assert CI.stronger(float("nan"), float("nan"), -2.0) == "level"


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="at least one strength"):
        CI.PcaVsSaeConfig(strengths=())
    with pytest.raises(ValueError, match="n_random"):
        CI.PcaVsSaeConfig(n_random=-1)
    with pytest.raises(ValueError, match="nonzero"):
        CI.ProjectionUnit(np.zeros(4), np.zeros(4))


# ---------------------------------------------------------------------------------------------
# the whole stage on a tiny real pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_vit, tiny_world, tmp_path_factory):
    import dataclasses

    from saev_core.baselines import BaselinesConfig, sae_vs_baselines, write_baselines
    from saev_core.extract import ExtractConfig, extract
    from saev_core.stages import StatsStage, TrainStage, stats_stage, train_stage

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
    write_baselines(table, p["baselines"], {"cfg": dataclasses.asdict(bcfg)})
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
    assert got.loc[got["method"] != "pca", "diff_p"].isna().all()
    assert got.loc[got["method"] == "pca", "diff_p"].between(0, 1).all()
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
    # M over every token of the SAE's token policy, in every split
    every = loaders.sample_rows(p["shards"], 1, 10**9, 0, None, meta["tokens"]).astype(np.float64)
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
            x_pca = x + (-2.0 * M - (x - mu) @ ut)[..., None] * ut
            d_sae = (head(x_sae) - out.logits[:, j]).numpy()
            d_pca = (head(x_pca) - out.logits[:, j]).numpy()
        assert r_sae["delta"] == pytest.approx(float(d_sae.mean()), abs=2e-4)
        assert r_pca["delta"] == pytest.approx(float(d_pca.mean()), abs=2e-4)
        assert r_pca["diff"] == pytest.approx(float((d_pca - d_sae).mean()), abs=3e-4)


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
    assert sorted(got["concept"]) == sorted(set(at["concept"]))  # default strength -2
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
        assert r.diff_p == pytest.approx(pca.diff_p)
        assert r.stronger == CI.stronger(pca.diff_lo, pca.diff_hi, -2.0)
    zero = pd.DataFrame(json.loads(run_query(db, "pca_vs_sae_intervention", {"strength": "0"},
                                             fmt="json", root=root)))  # fmt: skip
    assert set(zero["strength"]) == {0.0} and len(zero) == len(got)
    none = json.loads(run_query(db, "pca_vs_sae_intervention", {"backbone": "clip"}, fmt="json",
                                root=root))  # fmt: skip
    assert none == []


def test_other_labels_default_to_every_other_head_label(linear_head):
    _, reader, pixels, l0, _ = linear_head
    arm = CI.Arm("pca", 0, CI.ProjectionUnit(np.eye(D)[0], np.zeros(D)), 0, 1.0)
    cfg = replace(_cfg(), strengths=(-2.0,), n_random=0)
    (row,) = CI.compare_concept(reader, pixels, l0, "red", 1, {"pca": arm}, cfg, D)
    out, _ = CI.edited_logits(reader, pixels, 1, arm, -2.0, [], 64)
    j = reader.labels.index("red")
    others = [k for k in range(len(reader.labels)) if k != j]
    assert row["other_delta"] == pytest.approx(float((out[0] - l0)[:, others].mean()), abs=1e-5)
    assert np.isnan(row.get("diff_p", np.nan))  # no sae arm: nothing to pair with
