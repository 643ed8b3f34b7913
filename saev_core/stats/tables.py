"""The Parquet tables of a stats run, the files the warehouse reads.

`write_stats` turns a `FeatureStats` (from `saev_core.stats.compute.compute_stats`) into
`features`, `top_examples`, `feature_labels`, `label_controls`, `neighbors`, `heatmaps` and
`run`, each with a `run` column so the warehouse can union runs, and writes them atomically next
to each other.
`feature_labels` and `label_controls` carry a `split` column: one block per split the stats stage
measured, so a feature can be chosen on one split and reported on another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.stats.features import FeatureStats

# Columns of run.parquet that come from the caller's `run_info` (types as written to Parquet).
RUN_INFO_COLUMNS: dict[str, pa.DataType] = {
    "run": pa.string(),
    "sae_dir": pa.string(),
    "shard_dir": pa.string(),
    "backbone": pa.string(),
    "layer": pa.int64(),
    "arch": pa.string(),
    "d_model": pa.int64(),
    "d_sae": pa.int64(),
    "k": pa.int64(),
    "l0": pa.float64(),
    "fvu": pa.float64(),
    "dead_frac": pa.float64(),
    "dense_frac": pa.float64(),
    "dense_frac_abs": pa.float64(),
    "manifest_sha256": pa.string(),
    "tokens": pa.string(),
    "has_cls": pa.bool_(),
    "splits": pa.string(),
    "select_split": pa.string(),
    "report_split": pa.string(),
    "cfg_json": pa.string(),
}


def features_table(stats: FeatureStats) -> pa.Table:
    """One row per feature: frequencies, values, log10 summaries and the activation histogram."""
    s = stats.d_sae
    freq, mean_act = stats.freq, stats.mean_act
    dead = stats.n_fires == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log10_freq = np.log10(freq)
        log10_mean = np.log10(mean_act)
    h = stats.hist.shape[1]
    hist = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (s + 1) * h, h, dtype=np.int32)),
        pa.array(stats.hist.reshape(-1).astype(np.int64)),
    )
    return pa.table(
        {
            "run": pa.array([stats.run] * s, pa.string()),
            "feature": pa.array(np.arange(s, dtype=np.int64)),
            "freq": pa.array(freq, pa.float64()),
            "freq_images": pa.array(stats.freq_images, pa.float64()),
            "freq_cls": _nullable(stats.freq_cls),
            "freq_patches": _nullable(stats.freq_patches),
            "n_fires": pa.array(stats.n_fires.astype(np.int64)),
            "mean_act": _nullable(mean_act),
            "max_act": pa.array(stats.max_act, pa.float64()),
            "log10_freq": _nullable(np.where(dead, np.nan, log10_freq)),
            "log10_mean_act": _nullable(np.where(dead, np.nan, log10_mean)),
            "hist": hist,
            **{k: _nullable(v) for k, v in stats.spatial_summary.items()},
            "spatial": _list_column(stats.spatial.astype(np.int64)),
        }
    )


def _list_column(x_sk: np.ndarray) -> pa.ListArray:
    """A [rows, k] array as a list column with k values per row."""
    rows, k = x_sk.shape
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32)), pa.array(x_sk.reshape(-1))
    )


def top_examples_table(stats: FeatureStats) -> pa.Table:
    """One row per (feature, rank); rank 1 is the image whose highest patch code is largest."""
    feature, slot = np.nonzero(stats.top_value > 0)
    return pa.table(
        {
            "run": pa.array([stats.run] * len(feature), pa.string()),
            "feature": pa.array(feature.astype(np.int64)),
            "rank": pa.array((slot + 1).astype(np.int32)),
            "image_id": pa.array(stats.top_image[feature, slot].astype(np.int64)),
            "token": pa.array(stats.top_token[feature, slot].astype(np.int32)),
            "value": pa.array(stats.top_value[feature, slot], pa.float64()),
        }
    )


def feature_labels_table(stats: FeatureStats) -> pa.Table:
    """One row per (feature, label): patch-level AUROC, mean code in and out, positives, and the
    same at image level, with the split they were measured on (`stats.split`, null when unsaid)."""
    n_labels, s = len(stats.label_names), stats.d_sae
    flat = {
        name: _nullable(getattr(stats, name).reshape(-1))
        for name in ("threshold", "precision", "recall")
    }
    image = {
        name: _nullable(getattr(stats, name).reshape(-1))
        for name in (
            "image_auroc",
            "image_mean_in",
            "image_mean_out",
            "image_threshold",
            "image_precision",
            "image_recall",
        )
    }
    return pa.table(
        {
            "run": pa.array([stats.run] * (n_labels * s), pa.string()),
            "split": pa.array([stats.split or None] * (n_labels * s), pa.string()),
            "feature": pa.array(np.tile(np.arange(s, dtype=np.int64), n_labels)),
            "label": pa.array(np.repeat(np.array(stats.label_names, dtype=object), s), pa.string()),
            "auroc": _nullable(stats.auroc.reshape(-1)),
            "mean_in": _nullable(stats.mean_in.reshape(-1)),
            "mean_out": _nullable(stats.mean_out.reshape(-1)),
            "n_pos": pa.array(np.repeat(stats.n_pos.astype(np.int64), s)),
            **flat,
            **image,
            "image_n_pos": pa.array(np.repeat(stats.image_n_pos.astype(np.int64), s)),
            # proven bounds (saev_core.stats.assoc): |auroc - exact| <= auroc_err; the threshold's
            # F1 is within f1_err of the best over all thresholds; 0 = exact
            **{
                name: _nullable(
                    np.full(n_labels * s, np.nan)
                    if getattr(stats, name) is None
                    else getattr(stats, name).reshape(-1)
                )
                for name in ("auroc_err", "f1_err", "image_auroc_err", "image_f1_err")
            },
            # precision and recall at the select split's best-F1 threshold of the pair, counted
            # exactly on this split (no selection on it); null where no threshold was carried
            **{
                name: _nullable(
                    np.full(n_labels * s, np.nan)
                    if getattr(stats, name, None) is None
                    else getattr(stats, name).reshape(-1)
                )
                for name in (
                    "precision_at_select",
                    "recall_at_select",
                    "image_precision_at_select",
                    "image_recall_at_select",
                )
            },
        }
    )


def label_controls_table(stats: FeatureStats) -> pa.Table:
    """One row per label: the best AUROC any feature reaches on its shuffled-label control
    (saev_core.stats.splits), at patch and image level, on `stats.split`."""
    n = len(stats.label_names)
    nan = np.full(n, np.nan)
    patch = nan if stats.control_auroc is None else stats.control_auroc
    image = nan if stats.control_image_auroc is None else stats.control_image_auroc
    err = {
        name: nan if getattr(stats, name, None) is None else getattr(stats, name)
        for name in ("control_auroc_err", "control_image_auroc_err")
    }
    return pa.table(
        {
            "run": pa.array([stats.run] * n, pa.string()),
            "split": pa.array([stats.split or None] * n, pa.string()),
            "label": pa.array(list(stats.label_names), pa.string()),
            "d_sae": pa.array([stats.d_sae] * n, pa.int64()),
            "control_auroc": _nullable(patch),
            # proven bound: the exact best AUROC lies within control_auroc +- control_auroc_err
            "control_auroc_err": _nullable(err["control_auroc_err"]),
            "control_image_auroc": _nullable(image),
            "control_image_auroc_err": _nullable(err["control_image_auroc_err"]),
        }
    )


def neighbors_table(stats: FeatureStats) -> pa.Table:
    """One row per (feature, rank): its nearest other features by decoder cosine."""
    s, m = stats.neighbor.shape
    return pa.table(
        {
            "run": pa.array([stats.run] * (s * m), pa.string()),
            "feature": pa.array(np.repeat(np.arange(s, dtype=np.int64), m)),
            "rank": pa.array(np.tile(np.arange(1, m + 1, dtype=np.int32), s)),
            "neighbor": pa.array(stats.neighbor.reshape(-1).astype(np.int64)),
            "cosine": pa.array(stats.neighbor_cos.reshape(-1), pa.float64()),
        }
    )


def heatmaps_table(stats: FeatureStats) -> pa.Table:
    """One row per (feature, rank) with a heat map: the code on every patch, row-major."""
    assert stats.heatmaps is not None
    has = ~np.all(np.isnan(stats.heatmaps), axis=2)
    feature, slot = np.nonzero(has)
    values = stats.heatmaps[feature, slot]
    return pa.table(
        {
            "run": pa.array([stats.run] * len(feature), pa.string()),
            "feature": pa.array(feature.astype(np.int64)),
            "rank": pa.array((slot + 1).astype(np.int32)),
            "image_id": pa.array(stats.top_image[feature, slot].astype(np.int64)),
            "values": pa.ListArray.from_arrays(
                pa.array(
                    np.arange(
                        0, (len(feature) + 1) * values.shape[1], values.shape[1], dtype=np.int32
                    )
                ),
                pa.array(values.reshape(-1), pa.float32(), mask=np.isnan(values.reshape(-1))),
            ),
        }
    )


def run_table(stats: FeatureStats, run_info: dict[str, Any]) -> pa.Table:
    """The one-row run table: `run_info` (see RUN_INFO_COLUMNS) plus what the stats measured."""
    unknown = sorted(set(run_info) - set(RUN_INFO_COLUMNS))
    if unknown:
        raise ValueError(
            f"run_info has unknown key(s) {unknown}; allowed: {list(RUN_INFO_COLUMNS)}"
        )
    info = dict(run_info)
    info.setdefault("run", stats.run)
    if info["run"] != stats.run:
        raise ValueError(f"run_info run {info['run']!r} differs from the stats run {stats.run!r}")
    if info.get("d_sae") is not None and int(info["d_sae"]) != stats.d_sae:
        raise ValueError(
            f"run_info d_sae {info['d_sae']} differs from the stats d_sae {stats.d_sae}"
        )
    if isinstance(info.get("cfg_json"), dict):
        info["cfg_json"] = json.dumps(info["cfg_json"], sort_keys=True, default=str)
    columns: dict[str, pa.Array] = {}
    for name, typ in RUN_INFO_COLUMNS.items():
        value = info.get(name)
        if value is not None and typ == pa.string():
            value = str(value)
        columns[name] = pa.array([value], typ)
    columns["n_tokens"] = pa.array([stats.n_tokens], pa.int64())
    columns["n_images"] = pa.array([stats.n_images], pa.int64())
    columns["n_prefix_tokens"] = pa.array([stats.n_prefix_tokens], pa.int64())
    columns["hist_edges"] = pa.array([stats.hist_edges.tolist()], pa.list_(pa.float64()))
    columns["grid_rows"] = pa.array([stats.grid[0]], pa.int64())
    columns["grid_cols"] = pa.array([stats.grid[1]], pa.int64())
    return pa.table(columns)


def write_stats(
    stats: FeatureStats,
    out_dir: str | Path,
    run_info: dict[str, Any],
    by_split: dict[str, FeatureStats] | None = None,
) -> dict[str, Path]:
    """Write the stats tables into `out_dir` as `<table>.parquet`, each atomically.

    Tables: features, top_examples, feature_labels, label_controls (null AUROCs where no
    shuffled-label control was scored), neighbors, heatmaps (when `exemplar_heatmaps` filled
    `stats.heatmaps`) and run. `stats` gives the per-feature tables;
    `by_split` ({split: stats of that split}, from the stats stage) gives feature_labels and
    label_controls, one block of rows per split (None: those of `stats` itself). All are written to `*.tmp` first and
    renamed only when every one succeeded, with `run.parquet` renamed last, so a directory with a
    `run.parquet` is a complete set.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = list((by_split or {"": stats}).values())
    tables = {
        "features": features_table(stats),
        "top_examples": top_examples_table(stats),
        "feature_labels": pa.concat_tables([feature_labels_table(st) for st in parts]),
        "label_controls": pa.concat_tables([label_controls_table(st) for st in parts]),
        "neighbors": neighbors_table(stats),
    }
    if stats.heatmaps is not None:
        tables["heatmaps"] = heatmaps_table(stats)
    tables["run"] = run_table(stats, run_info)
    paths = {name: out_dir / f"{name}.parquet" for name in tables}
    tmps = {name: path.with_name(path.name + ".tmp") for name, path in paths.items()}
    try:
        for name, table in tables.items():
            pq.write_table(table, tmps[name])
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for name in tables:
        os.replace(tmps[name], paths[name])
    return paths


def _nullable(x: np.ndarray) -> pa.Array:
    """float64 array with NaN written as null (SQL aggregates then skip it)."""
    x = np.asarray(x, dtype=np.float64)
    return pa.array(x, pa.float64(), mask=np.isnan(x))
