"""The PCA-vs-SAE stage: `pca_vs_sae` runs `units.compare_concept` for every concept the head
predicts, `write_pca_vs_sae` writes `pca_vs_sae.parquet` atomically (NaN as null), and `summary`
is the DVC metrics file's small summary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saev_core.compare_intervene.inputs import (
    baselines_meta,
    check_baselines_sae,
    max_projections,
    pca_mean,
    stats_tokens_and_splits,
)
from saev_core.compare_intervene.units import (
    COLUMNS,
    INTEGERS,
    STRINGS,
    Arm,
    PcaVsSaeConfig,
    ProjectionUnit,
    adjust_pairs,
    compare_concept,
    load_logit_reader,
    logits,
    stronger,
)

# ---------------------------------------------------------------------------------------------
# the stage


def pca_vs_sae(
    backbone_dir: str | Path,
    shard_dir: str | Path,
    sae_dir: str | Path,
    stats_dir: str | Path,
    baselines_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    backbone: str = "supervised",
    progress: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Edit each concept's best SAE feature and best PCA direction in the classifier at the SAE's
    layer, with random-direction controls (module docstring); write
    `out_dir/pca_vs_sae.parquet` and return the summary for `metrics/compare/intervene.json`.
    `params` are `PcaVsSaeConfig` fields."""
    import pandas as pd

    from saev_core.baselines.run import best_direction, read_baselines
    from saev_core.baselines.units import BaselinesConfig
    from saev_core.config import from_dict
    from saev_core.sae.checks import check_sae_matches, check_sae_model, check_stats_match
    from saev_core.sae.model import SAE

    cfg = from_dict(PcaVsSaeConfig, dict(params), where="params: compare.intervene")
    t0 = time.perf_counter()
    device = _device(cfg.device)
    check_sae_model(sae_dir, str(backbone_dir))
    check_sae_matches(sae_dir, shard_dir)
    check_stats_match(stats_dir, sae_dir)
    tokens, splits = stats_tokens_and_splits(stats_dir)
    sae = SAE.load(sae_dir, device=device).eval()
    if "layer" not in sae.extra:
        raise ValueError(f"{sae_dir}/cfg.json records no layer: which block would it edit?")
    layer = int(sae.extra["layer"])

    table = read_baselines(baselines_path)
    meta = baselines_meta(baselines_path)
    check_baselines_sae(table, meta, sae_dir, sae.W_dec, str(baselines_path))
    bcfg = meta.get("cfg") or {}
    select_split = str(bcfg.get("select_split", table["select_split"].iloc[0]))
    if cfg.split == select_split:
        raise ValueError(
            f"compare.intervene.split is {cfg.split!r}, the split the baselines chose each unit "
            "on: the effects would not be held out"
        )
    reader = load_logit_reader(backbone_dir, device)
    heads = [x for x in reader.labels if x != "background"]
    have = {m: set(table.loc[table["method"] == m, "concept"]) for m in ("sae", "pca")}
    wanted = list(cfg.concepts) or heads
    unknown = [c for c in wanted if c not in heads]
    if unknown:
        raise ValueError(f"compare.intervene.concepts {unknown} are not labels of the head {heads}")
    skipped = {c: "no sae or pca row in the baselines table" for c in wanted
               if c not in have["sae"] or c not in have["pca"]}  # fmt: skip
    concepts = [c for c in wanted if c not in skipped]
    if not concepts:
        raise ValueError(
            f"no concept of {wanted} has both an sae and a pca row in {baselines_path}"
        )

    max_act = pd.read_parquet(Path(stats_dir) / "features.parquet").set_index("feature")["max_act"]
    # the baselines' fit sample again (the flow records its cfg; else BaselinesConfig's defaults)
    n_fit, fit_seed = int(bcfg.get("n_fit", BaselinesConfig.n_fit)), int(bcfg.get("seed", 0))
    mean_d = pca_mean(shard_dir, layer, n_fit, fit_seed)
    dirs_cd = np.stack([best_direction(table, c, "pca") for c in concepts])
    # M over the tokens and splits the stats' max_act is over: the same dose on both arms
    M_c = max_projections(shard_dir, layer, mean_d, dirs_cd, tokens, cfg.batch_images, splits)

    pixels_all, records = _images(reader, data_dir, cfg)
    l0_all = logits(reader, pixels_all, cfg.batch_size)
    rows: list[dict[str, Any]] = []
    for c, concept in enumerate(concepts):
        idx = np.array([i for i, r in enumerate(records) if concept in r.labels], dtype=int)
        idx = idx[: cfg.max_images]
        if len(idx) == 0:
            skipped[concept] = f"no {cfg.split} image carries it"
            continue
        feat = int(_row(table, "sae", concept)["unit"])
        if float(max_act.get(feat, 0.0)) <= 0 or float(M_c[c]) <= 0:
            skipped[concept] = "its unit never takes a positive value (max 0)"
            continue
        arms = {
            "sae": Arm("sae", feat, sae, feat, float(max_act[feat])),
            "pca": Arm("pca", int(_row(table, "pca", concept)["unit"]),
                       ProjectionUnit(dirs_cd[c], mean_d).to(device), 0, float(M_c[c])),
        }  # fmt: skip
        rows += compare_concept(
            reader, pixels_all[idx], l0_all[idx], concept, layer, arms, cfg, sae.cfg.d_model,
            labels=heads,
        )  # fmt: skip
        if progress:
            print(f"compare intervene: {concept} on {len(idx)} {cfg.split} images", flush=True)
    if not rows:
        raise ValueError(f"no concept could be edited: {skipped}")
    adjust_pairs(rows, cfg.alpha)  # Holm over every concept x strength
    for r in rows:
        r.update(backbone=backbone, select_split=select_split, report_split=cfg.split)
    path = write_pca_vs_sae(
        rows,
        Path(out_dir) / "pca_vs_sae.parquet",
        {"backbone": backbone, "backbone_dir": str(backbone_dir), "sae_dir": str(sae_dir),
         "shard_dir": str(shard_dir), "baselines": str(baselines_path), "layer": layer,
         "tokens": tokens, "splits": splits, "correction": "holm", "cfg": asdict(cfg)},
    )  # fmt: skip
    out = summary(pd.DataFrame(rows), cfg.alpha)
    out.update(backbone=backbone, layer=layer, skipped=skipped)
    if progress:
        print(f"compare intervene: {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _device(device: str) -> str:
    from saev_core.backbone.model import pick_device

    return pick_device(None if device == "auto" else device)


def _row(table: Any, method: str, concept: str) -> Any:
    rows = table[(table["method"] == method) & (table["concept"] == concept)]
    return rows.iloc[0]


def _images(reader: Any, data_dir: str | Path, cfg: PcaVsSaeConfig) -> tuple[torch.Tensor, list]:
    """The split's images, preprocessed by the classifier's processor, and their records."""
    from saev_core.data.images import open_image
    from saev_core.data.records import load_records

    records = load_records(data_dir, [cfg.split], cfg.val_fraction)
    if not records:
        raise ValueError(f"{data_dir}: no {cfg.split} images")
    pixels = [reader.preprocess([open_image(r) for r in records[i : i + 256]])
              for i in range(0, len(records), 256)]  # fmt: skip
    return torch.cat(pixels), records


def _cell(v: Any) -> Any:
    """A value for the Parquet: NaN as null (DuckDB orders NaN above every number, so
    `NaN > 0` is true there: a missing value must not read as a large one)."""
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    return v


def write_pca_vs_sae(
    rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """The rows as Parquet with `COLUMNS` (atomically; NaN as null; `meta` as JSON in the
    schema metadata)."""
    import pyarrow as pa

    from saev_core.shards import atomic_write_table

    schema = pa.schema(
        [(c, pa.string()) if c in STRINGS else (c, pa.int64()) if c in INTEGERS
         else (c, pa.float64()) for c in COLUMNS]
    )  # fmt: skip
    t = pa.Table.from_pylist([{c: _cell(r.get(c)) for c in COLUMNS} for r in rows], schema=schema)
    t = t.replace_schema_metadata({b"saev": json.dumps(meta or {}).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(t, path)
    return path


def _mean(values: Any) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def summary(table: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Per strength, means over concepts: each method's change of the concept's logit (`delta`,
    and its random controls'), its change beyond its own control (`adj_delta`), its dose (mean
    |dx| over all tokens of the edited images) and effect per unit of it, and its specificity;
    the mean adjusted and raw pca - sae; and on which concepts the PCA direction's edit moves
    its concept further beyond its control than the SAE feature's (`pca_stronger`), the SAE's
    further (`sae_stronger`), or neither is shown (`level`): `stronger` on the adjusted
    difference's CI and Holm-adjusted p < `alpha`. `sae_not_stronger` lists the first and the
    last: where the SAE does not beat PCA."""
    out: dict[str, Any] = {"n_concepts": int(table["concept"].nunique()), "alpha": alpha,
                           "correction": "holm", "by_strength": {}}  # fmt: skip
    for s, g in table.groupby("strength", sort=True):
        entry: dict[str, Any] = {}
        for method in ("sae", "pca"):
            arm = g[g["method"] == method]
            rnd = g[(g["method"] == "random") & (g["control_for"] == method)]
            entry[f"{method}_delta"] = _mean(arm["delta"])
            if len(rnd):
                entry[f"random_{method}_delta"] = _mean(rnd["delta"])
            for col in ("adj_delta", "dx_norm_all", "adj_delta_per_dx", "other_abs_delta"):
                if col in arm:
                    entry[f"{method}_{col}"] = _mean(arm[col])
        pca = g[g["method"] == "pca"]
        if "adj_diff" not in pca:
            pca = pca.assign(adj_diff=np.nan, adj_diff_lo=np.nan, adj_diff_hi=np.nan,
                             raw_diff=np.nan, p_adjusted=np.nan)  # fmt: skip
        entry["mean_adj_diff"] = _mean(pca["adj_diff"])
        entry["mean_raw_diff"] = _mean(pca["raw_diff"])
        who = {r.concept: stronger(_f(r.adj_diff_lo), _f(r.adj_diff_hi), _f(r.p_adjusted),
                                   float(s), alpha) for r in pca.itertuples()}  # fmt: skip
        entry["pca_stronger"] = sorted(c for c, w in who.items() if w == "pca")
        entry["sae_stronger"] = sorted(c for c, w in who.items() if w == "sae")
        entry["level"] = sorted(c for c, w in who.items() if w == "level")
        entry["sae_not_stronger"] = sorted(c for c, w in who.items() if w != "sae")
        out["by_strength"][f"{float(s):g}"] = entry
    return out


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)
