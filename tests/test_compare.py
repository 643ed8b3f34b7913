"""The backbone comparison (issue 15.3-4): the DVC foreach stages over params compare.backbones,
the step configs they run, and the comparison's named queries on a hand-made warehouse whose
answers are computed here independently (pandas loops)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows import compare
from saev_core.warehouse import build_compare_warehouse, list_queries, run_query

ROOT = Path(__file__).resolve().parents[1]
SQL = ROOT / "sql"
STEPS = ("backbone", "extract", "train", "stats", "baselines", "stability", "probe")


# ---------------------------------------------------------------------------------------------
# DVC: one stage per step and backbone, parsed by DVC itself


def _dvc_stages(tmp: Path, params: dict) -> list[str]:
    """Stage names DVC's own API finds in a copy of dvc.yaml with these params."""
    shutil.copy(ROOT / "dvc.yaml", tmp / "dvc.yaml")
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    if not (tmp / ".dvc").exists():
        dvc = Path(sys.executable).with_name("dvc")
        subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp, check=True)
    from dvc.repo import Repo

    with Repo(str(tmp)) as repo:
        return sorted(s.name for s in repo.index.stages)


def test_foreach_expands_to_one_stage_per_backbone_and_a_new_entry_adds_them(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    names = list(params["compare"]["backbones"])
    assert len(names) >= 3
    stages = _dvc_stages(tmp_path, params)
    for step in STEPS:
        assert sorted(s for s in stages if s.startswith(f"compare-{step}@")) == sorted(
            f"compare-{step}@{n}" for n in names
        )
    assert "compare-world" in stages and "compare-warehouse" in stages
    # the demo's stages are still there, unchanged in name
    for demo in ("backbone", "extract", "validate", "train", "stats", "probe", "intervene"):
        assert demo in stages

    params["compare"]["backbones"]["dino"] = {"objective": "mae", "mask_ratio": 0.5}
    more = _dvc_stages(tmp_path, params)
    assert sorted(set(more) - set(stages)) == sorted(f"compare-{s}@dino" for s in STEPS)


def test_step_configs_share_the_demo_recipe_and_keep_outputs_apart():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cmp = params["compare"]
    layer = cmp["layer"]
    for name, entry in cmp["backbones"].items():
        bb = compare.step_config(params, "backbone", name)
        assert bb.objective == entry["objective"]
        assert bb.data_dir == cmp["world"]["out_dir"]
        assert bb.out_dir == f"artifacts/compare/{name}/backbone"
        ex = compare.step_config(params, "extract", name)
        assert list(ex.layers) == [layer] and ex.model == bb.out_dir
        tr = compare.step_config(params, "train", name)
        assert tr.sae == params["train"]["sae"]  # the demo's SAE recipe as it is
        assert tr.layer == layer and tr.shard_dir == ex.out_dir
        assert tr.sweep == {f"seed{s}": {"seed": s} for s in cmp["seeds"]}
        st = compare.step_config(params, "stats", name)
        assert st.run == name and st.options == params["stats"]["options"]
        pr = compare.step_config(params, "probe", name)
        assert pr.model == bb.out_dir and pr.data == bb.data_dir
        assert compare.step_config(params, "baselines", name).select_split == "val"
        assert compare.sae_dirs(params, name)[1:] == [
            f"{tr.out_dir}/sweep/seed{s}" for s in cmp["seeds"]
        ]
    assert compare.step_config(params, "world").world == "forms"
    # no compare stage writes the demo's metrics files
    text = (ROOT / "dvc.yaml").read_text()
    for step in STEPS:
        assert f"metrics/compare/${{key}}/{step}.json" in text or step == "extract"


def test_unknown_backbone_and_bad_section_are_named():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(ValueError, match="compare.backbones has no 'nope'"):
        compare.step_config(params, "train", "nope")
    params["compare"]["backbones"] = ["clip"]
    with pytest.raises(ValueError, match="compare.backbones must be a non-empty mapping"):
        compare.step_config(params, "train", "clip")


# ---------------------------------------------------------------------------------------------
# The named queries, on a hand-made warehouse

FORMS = ("filled", "outline", "word")
CONCEPTS = ("circle", "square")
BACKBONES = ("clip", "supervised")
N_FEAT = 6


def _write(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Stats, baselines and stability Parquet of two backbones, laid out as the compare stages
    write them; returns (root, db, the frames)."""
    root = tmp_path_factory.mktemp("cmp")
    rng = np.random.default_rng(0)
    labels = [*CONCEPTS, *FORMS, *(f"{c}:{f}" for c in CONCEPTS for f in FORMS)]
    fl, feats, ctl, base, stab = [], [], [], [], []
    for b in BACKBONES:
        d = root / "artifacts/compare" / b
        _write(d / "stats/run.parquet",
               pd.DataFrame({"run": [b], "select_split": ["val"], "report_split": ["test"],
                             "d_sae": [N_FEAT]}))  # fmt: skip
        freq = rng.uniform(0.01, 0.2, N_FEAT)
        freq[N_FEAT - 1] = 0.0  # a dead feature
        feats.append(pd.DataFrame({"run": b, "feature": range(N_FEAT), "freq": freq}))
        for split in ("val", "test"):
            for label in labels:
                for f in range(N_FEAT):
                    fl.append({
                        "run": b, "split": split, "feature": f, "label": label,
                        "auroc": rng.uniform(0.3, 1.0), "image_auroc": rng.uniform(0.3, 1.0),
                        "image_precision": rng.uniform(0, 1), "image_recall": rng.uniform(0, 1),
                        "image_precision_at_select": rng.uniform(0, 1),
                        "image_recall_at_select": rng.uniform(0, 1),
                    })  # fmt: skip
                ctl.append({"run": b, "split": split, "label": label,
                            "control_image_auroc": rng.uniform(0.5, 0.7)})  # fmt: skip
        for method in ("sae", "pca", "neuron"):
            for label in labels:
                auc = rng.uniform(0.5, 1.0)
                half = rng.uniform(0.01, 0.1)
                base.append({
                    "backbone": b, "method": method, "concept": label,
                    "unit": int(rng.integers(0, 50)), "sign": 1, "auroc_val": rng.uniform(0.5, 1),
                    "auroc_test": auc, "lo": auc - half, "hi": auc + half,
                    "diff_lo": np.nan if method == "sae" else rng.uniform(-0.2, 0.1),
                    "diff_p": np.nan if method == "sae" else rng.uniform(0, 1), "n_units": 50,
                    "n_test_images": 100, "n_test_pos": int(rng.integers(10, 50)),
                    "select_split": "val", "report_split": "test",
                })  # fmt: skip
        for kind, n in (("trained", 3), ("trained_vs_random", 3), ("random", 1)):
            for i in range(n):
                stab.append({"backbone": b, "kind": kind, "a": f"s{i}", "b": f"t{i}",
                             "n_matched": 6.0, "mean_cos": rng.uniform(0, 1),
                             "cos_q50": rng.uniform(0, 1), "mean_corr": rng.uniform(0, 1),
                             "random_cosine_scale": 0.3})  # fmt: skip
    fl, feats, ctl = pd.DataFrame(fl), pd.concat(feats), pd.DataFrame(ctl)
    base, stab = pd.DataFrame(base), pd.DataFrame(stab)
    base["diff_hi"] = base["diff_lo"] + 0.1  # some intervals above 0, some below, some across
    # cross-form features with a known answer: clip's circle has feature 0 (filled 0.95, outline
    # 0.92) and feature 2 (all three forms, weakest 0.91); every other pair stays below 0.9
    fl.loc[fl["label"].str.contains(":"), ["auroc", "image_auroc"]] = 0.5
    plant = {("clip", 0, "circle:filled"): 0.95, ("clip", 0, "circle:outline"): 0.92,
             ("clip", 2, "circle:filled"): 0.91, ("clip", 2, "circle:outline"): 0.93,
             ("clip", 2, "circle:word"): 0.97, ("clip", 1, "circle:word"): 0.99,
             ("supervised", 3, "square:word"): 0.96}  # fmt: skip
    for (b, f, label), v in plant.items():
        m = (fl["run"] == b) & (fl["feature"] == f) & (fl["label"] == label)
        fl.loc[m & (fl["split"] == "test"), "image_auroc"] = v
    # the val split has a high AUROC everywhere for clip's square: it must not count
    m = (fl["run"] == "clip") & (fl["split"] == "val") & fl["label"].str.startswith("square:")
    fl.loc[m, "image_auroc"] = 0.99
    # patch level: supervised feature 4 detects square filled + outline at patch level only
    for label in ("square:filled", "square:outline"):
        m = (fl["run"] == "supervised") & (fl["feature"] == 4) & (fl["label"] == label)
        fl.loc[m & (fl["split"] == "test"), "auroc"] = 0.94
    for b in BACKBONES:
        d = root / "artifacts/compare" / b
        _write(d / "stats/feature_labels.parquet", fl[fl["run"] == b])
        _write(d / "stats/features.parquet", feats[feats["run"] == b])
        _write(d / "stats/label_controls.parquet", ctl[ctl["run"] == b])
        _write(d / "baselines.parquet", base[base["backbone"] == b].drop(columns="backbone"))
        _write(d / "stability/seed_stability.parquet",
               stab[stab["backbone"] == b].drop(columns="backbone"))  # fmt: skip
    shutil.copytree(SQL, root / "sql")
    db = root / "warehouse/compare.duckdb"
    backbones = {b: {"objective": b} for b in BACKBONES}
    build_compare_warehouse(db, backbones, "artifacts/compare", root=root, sql_dir="sql")
    return root, db, {"fl": fl, "features": feats, "controls": ctl, "base": base, "stab": stab}


def _q(tiny, name, **params) -> pd.DataFrame:
    root, db, _ = tiny
    return pd.DataFrame(json.loads(run_query(db, name, params, fmt="json", root=root)))


def test_every_compare_query_is_documented_and_parses():
    names = {q.name: q for q in list_queries(SQL)}
    for name in ("compare_backbones", "cross_form_features", "semantic_probe",
                 "sae_vs_baselines", "seed_stability"):  # fmt: skip
        assert name in names and names[name].description


def test_compare_backbones(tiny):
    base, ctl = tiny[2]["base"], tiny[2]["controls"]
    got = _q(tiny, "compare_backbones")
    want = base[(base["method"] == "sae") & base["concept"].str.contains(":")]
    assert len(got) == len(want) == len(BACKBONES) * len(CONCEPTS) * len(FORMS)
    for _, r in got.iterrows():
        w = want[(want["backbone"] == r["backbone"])
                 & (want["concept"] == f"{r['concept']}:{r['form']}")].iloc[0]  # fmt: skip
        assert (r["feature"], r["auroc_test"], r["ci_lo"], r["ci_hi"]) == (
            w["unit"], pytest.approx(w["auroc_test"]), pytest.approx(w["lo"]),
            pytest.approx(w["hi"]),
        )  # fmt: skip
        c = ctl[(ctl["run"] == r["backbone"]) & (ctl["split"] == "test")
                & (ctl["label"] == f"{r['concept']}:{r['form']}")]  # fmt: skip
        assert r["control_image_auroc"] == pytest.approx(c["control_image_auroc"].iloc[0])
    one = _q(tiny, "compare_backbones", backbone="clip", form="word")
    assert set(one["backbone"]) == {"clip"} and set(one["form"]) == {"word"}
    assert len(one) == len(CONCEPTS)


def test_cross_form_features(tiny):
    got = _q(tiny, "cross_form_features").set_index(["backbone", "concept"])
    assert len(got) == len(BACKBONES) * len(CONCEPTS)  # a row even where nothing qualifies
    circle = got.loc[("clip", "circle")]
    assert circle["n_features"] == 2 and circle["features"] == [0, 2]
    assert circle["best_feature"] == 0 and circle["best_forms"] == ["filled", "outline"]
    assert circle["best_min_auroc"] == pytest.approx(0.92)
    assert got.loc[("clip", "square"), "n_features"] == 0  # high on val only
    assert got.loc[("supervised", "square"), "n_features"] == 0  # one form only
    assert got.loc[("clip", "circle"), "share_of_concepts"] == pytest.approx(0.5)
    assert got.loc[("supervised", "circle"), "share_of_concepts"] == pytest.approx(0.0)
    # three forms asked for: only feature 2; 0.95 in each: none
    three = _q(tiny, "cross_form_features", min_forms=3, backbone="clip").set_index("concept")
    assert three.loc["circle", "features"] == [2]
    strict = _q(tiny, "cross_form_features", min_auroc="0.95")
    assert (strict["n_features"] == 0).all()
    patch = _q(tiny, "cross_form_features", level="patch").set_index(["backbone", "concept"])
    assert patch.loc[("supervised", "square"), "features"] == [4]
    with pytest.raises(ValueError, match="level must be image or patch"):
        _q(tiny, "cross_form_features", level="token")


def _f1(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def test_semantic_probe(tiny):
    fl, feats = tiny[2]["fl"], tiny[2]["features"]
    alive = {(r.run, r.feature) for r in feats.itertuples() if r.freq > 0}
    expected = []
    for b in BACKBONES:
        for c in CONCEPTS:
            rows = fl[(fl["run"] == b) & (fl["label"] == c)]
            rows = rows[[(b, f) in alive for f in rows["feature"]]]
            val = rows[rows["split"] == "val"]
            val_f1 = {r.feature: _f1(r.image_precision, r.image_recall) for r in val.itertuples()}
            best = max(sorted(val_f1), key=lambda f: val_f1[f])  # first of the ties: lowest
            test = rows[rows["split"] == "test"]
            t_f1 = {r.feature: _f1(r.image_precision_at_select, r.image_recall_at_select)
                    for r in test.itertuples()}  # fmt: skip
            others = [v for f, v in t_f1.items() if f != best]
            p = (1 + sum(v >= t_f1[best] for v in others)) / (1 + len(others))
            expected.append((b, c, best, t_f1[best], np.mean(others), p))
    # Holm over all rows
    order = sorted(range(len(expected)), key=lambda i: expected[i][5])
    m, running, holm = len(expected), 0.0, {}
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * expected[i][5]))
        holm[i] = running
    got = _q(tiny, "semantic_probe").set_index(["backbone", "concept"])
    assert len(got) == len(expected)
    for i, (b, c, best, f1, rnd, p) in enumerate(expected):
        r = got.loc[(b, c)]
        assert r["feature"] == best
        assert r["test_f1"] == pytest.approx(f1)
        assert r["random_f1"] == pytest.approx(rnd)
        assert r["n_random"] == N_FEAT - 2  # the dead feature left out, and the chosen one
        assert r["p_value"] == pytest.approx(p)
        assert r["p_holm"] == pytest.approx(holm[i])
        assert r["significant"] == (holm[i] < 0.05)
    # every feature drawn, the dead one too: one more random feature
    everyone = _q(tiny, "semantic_probe", alive_only="false", backbone="clip")
    assert set(everyone["n_random"]) == {N_FEAT - 1} and set(everyone["backbone"]) == {"clip"}
    loose = _q(tiny, "semantic_probe", alpha="1.01")
    assert loose["significant"].all()


def test_sae_vs_baselines(tiny):
    base = tiny[2]["base"]
    for kind, keep in (("concept", lambda s: s in CONCEPTS), ("form", lambda s: s in FORMS),
                       ("concept_form", lambda s: ":" in s), ("all", lambda s: True)):  # fmt: skip
        got = _q(tiny, "sae_vs_baselines", kind=kind).set_index(["backbone", "method"])
        rows = base[base["concept"].map(keep)]
        assert len(got) == len(BACKBONES) * 3
        for (b, method), g in rows.groupby(["backbone", "method"]):
            r = got.loc[(b, method)]
            assert r["n_labels"] == len(g)
            assert r["mean_auroc"] == pytest.approx(g["auroc_test"].mean())
            if method == "sae":
                assert pd.isna(r["n_better_than_sae"]) and pd.isna(r["n_worse_than_sae"])
                continue
            better = int((g["diff_lo"] > 0).sum())
            worse = int((g["diff_hi"] < 0).sum())
            assert (r["n_better_than_sae"], r["n_worse_than_sae"]) == (better, worse)
            assert r["n_level_with_sae"] == len(g) - better - worse
        assert (got["n_better_than_sae"].fillna(0) > 0).any()  # the fixture has both kinds
        assert (got["n_worse_than_sae"].fillna(0) > 0).any()
    with pytest.raises(ValueError, match="kind must be"):
        _q(tiny, "sae_vs_baselines", kind="nope")


def test_seed_stability(tiny):
    stab = tiny[2]["stab"]
    got = _q(tiny, "seed_stability").set_index(["backbone", "kind"])
    assert len(got) == len(BACKBONES) * 3
    for (b, kind), g in stab.groupby(["backbone", "kind"]):
        rnd = stab[(stab["backbone"] == b) & (stab["kind"] == "random")]["mean_cos"].mean()
        r = got.loc[(b, kind)]
        assert r["n_pairs"] == len(g)
        assert r["mean_cos"] == pytest.approx(g["mean_cos"].mean())
        assert r["trained_minus_random"] == pytest.approx(g["mean_cos"].mean() - rnd)
    assert set(_q(tiny, "seed_stability", backbone="clip")["backbone"]) == {"clip"}


def test_compare_warehouse_records_the_backbones(tiny):
    import duckdb

    con = duckdb.connect(str(tiny[1]), read_only=True)
    try:
        rows = con.execute("select backbone, objective from backbones order by 1").fetchall()
        runs = con.execute("select run from runs order by 1").fetchall()
    finally:
        con.close()
    assert rows == [("clip", "clip"), ("supervised", "supervised")]
    assert [r[0] for r in runs] == sorted(BACKBONES)
