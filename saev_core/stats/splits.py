"""Choose on one split, report on another: stats per split, shuffled-label controls, merging.

The stats stage runs `compute_stats` once per split (each image lies in one split, so the encode
cost is that of one pass over all of them). A label's best feature is chosen on the select split
and its scores are read on the report split, so the reported AUROC carries no selection bias.
`merge_stats` then adds the per-split results into the per-feature statistics (frequencies,
`max_act`, histograms, exemplars, spatial counts) over every streamed split.

The maximum AUROC over d_sae features grows with d_sae even when no feature means anything, so
every label is also scored as a shuffled copy (`shuffled_labels`): the images' label sets are
permuted across the split's images with a fixed seed, each patch mask moving with its image, which
keeps the label's prevalence and spatial shape but breaks its tie to the content. The best AUROC
any feature reaches on that copy (`FeatureStats.control_auroc`, with its proven error bound
`control_auroc_err`) is the bar a leader of an SAE of that width has to clear; `pop_controls`
moves it out of the label arrays. Compare it with the leader's select-split AUROC (both are
maxima over features on the select split), not with the report split's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from saev_core.stats.compute import _all_label_names
from saev_core.stats.config import LABEL_FIELDS, StatsConfig
from saev_core.stats.features import FeatureStats

CONTROL_PREFIX = "shuffled:"
"""Name prefix of a label's shuffled-label control inside `compute_stats` (never written)."""

# how merge_stats combines each FeatureStats field across splits
_SUM = (
    "n_tokens",
    "n_images",
    "n_cls",
    "n_patches",
    "n_fires",
    "n_fires_images",
    "n_fires_cls",
    "n_fires_patches",
    "sum_act",
    "hist",
)
_MAX = ("max_act",)
_TOP = ("top_value", "top_image", "top_token")
_SAME = ("run", "hist_edges", "n_prefix_tokens", "grid", "neighbor", "neighbor_cos")
_LABELS = (
    "label_names",
    *LABEL_FIELDS,
    "control_auroc",
    "control_image_auroc",
    "control_auroc_err",
    "control_image_auroc_err",
    "refine_passes",
)


def resolve_splits(cfg: StatsConfig, present: Sequence[str]) -> tuple[str, str]:
    """(select_split, report_split) among the `present` streamed splits (in `cfg.splits` order).

    "auto" reports on test when streamed, else on the last present split, and selects on val,
    or (when val is the report split) on the present split before it (train for a flat folder's
    train/val split). Raises when fewer than two splits have images.
    """
    present = list(present)
    for name in ("select_split", "report_split"):
        value = getattr(cfg, name)
        if value != "auto" and value not in present:
            raise ValueError(
                f"stats.{name} {value!r} has no images in the shard set (streamed: {present})"
            )
    if len(present) < 2:
        raise ValueError(
            f"stats needs two splits with images, to choose features on one and report on the "
            f"other; stats.splits {list(cfg.splits)} gives only {present}"
        )
    report = cfg.report_split
    if report == "auto":
        others = [s for s in present if s != cfg.select_split]
        report = "test" if "test" in others else others[-1]
    select = cfg.select_split
    if select == "auto":
        others = [s for s in present if s != report]
        select = "val" if "val" in others else others[-1]
    if select == report:
        raise ValueError(f"stats.select_split and report_split are both {select!r}")
    return select, report


def _frame(table: pd.DataFrame | pa.Table | None) -> pd.DataFrame | None:
    return table.to_pandas() if isinstance(table, pa.Table) else table


def shuffled_labels(
    patch_labels: pd.DataFrame | pa.Table | None,
    image_labels: pd.DataFrame | pa.Table | None,
    label_names: Sequence[str] | None,
    image_ids: np.ndarray,
    seed: int = 0,
) -> tuple[pd.DataFrame | None, pd.DataFrame | None, list[str]]:
    """The label tables plus, per label, a control copy with the labels permuted across images.

    `image_ids` are the split's images: image `ids[j]` receives the labels (and the patch masks)
    of image `ids[perm[j]]`, one permutation (`default_rng(seed)`) for all labels. Returns
    `(patch_labels, image_labels, names)` with `names` = the real labels, then the controls
    (`CONTROL_PREFIX + label`), for `compute_stats(..., label_names=names)`. An `image_labels` of
    None stays None (compute_stats derives image labels from the patches, the shuffled ones too).
    """
    patch, image = _frame(patch_labels), _frame(image_labels)
    names = list(label_names) if label_names is not None else _all_label_names(patch, image)
    clash = [n for n in names if n.startswith(CONTROL_PREFIX)]
    if clash:
        raise ValueError(f"label names {clash} start with {CONTROL_PREFIX!r}, kept for controls")
    ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    perm = np.random.default_rng(seed).permutation(len(ids))
    new_id = pd.Series(ids, index=ids[perm])  # source image -> the image that receives its labels

    def shuffle(table: pd.DataFrame) -> pd.DataFrame:
        t = table[table["label"].isin(names) & table["image_id"].isin(ids)].copy()
        t["image_id"] = new_id.loc[t["image_id"].to_numpy()].to_numpy()
        t["label"] = CONTROL_PREFIX + t["label"].astype(str)
        return pd.concat([table, t], ignore_index=True)

    patch = shuffle(patch) if patch is not None else None
    image = shuffle(image) if image is not None else None
    return patch, image, names + [CONTROL_PREFIX + n for n in names]


def pop_controls(stats: FeatureStats, n_real: int) -> FeatureStats:
    """Keep the first `n_real` labels; the controls after them become `control_auroc` and
    `control_image_auroc`, the best AUROC over features of each label's shuffled copy."""
    names = tuple(stats.label_names)
    controls = names[n_real:]
    if len(controls) != n_real or any(
        c != CONTROL_PREFIX + n for c, n in zip(controls, names[:n_real], strict=True)
    ):
        raise ValueError(f"expected {n_real} labels then their controls, got {list(names)}")
    out = {"label_names": names[:n_real]}
    for name in LABEL_FIELDS:
        value = getattr(stats, name, None)
        if value is not None:
            out[name] = value[:n_real]
    out["control_auroc"] = _best(stats.auroc[n_real:])
    out["control_image_auroc"] = _best(stats.image_auroc[n_real:])
    out["control_auroc_err"] = _best_err(stats.auroc[n_real:], _err(stats.auroc_err, n_real))
    out["control_image_auroc_err"] = _best_err(
        stats.image_auroc[n_real:], _err(stats.image_auroc_err, n_real)
    )
    return replace(stats, **out)


def _err(err_ls: np.ndarray | None, n_real: int) -> np.ndarray | None:
    return None if err_ls is None else np.asarray(err_ls, dtype=np.float64)[n_real:]


def _best_err(auroc_ls: np.ndarray, err_ls: np.ndarray | None) -> np.ndarray:
    """A proven bound on |max over features of the AUROC - the max of the exact AUROCs| per
    label: each exact AUROC lies in [auroc - err, auroc + err], so their maximum lies between the
    largest lower and the largest upper end. NaN where the max is NaN or no bound is known."""
    best = _best(auroc_ls)
    if err_ls is None:
        return np.full(len(best), np.nan)
    a = np.asarray(auroc_ls, dtype=np.float64)
    e = np.where(np.isnan(a), np.nan, np.asarray(err_ls, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        hi, lo = _best(a + e) - best, best - _best(a - e)
    return np.fmax(hi, lo)


def _best(auroc_ls: np.ndarray) -> np.ndarray:
    """Max over features per label, NaN where every feature is NaN."""
    a = np.asarray(auroc_ls, dtype=np.float64)
    if a.shape[1] == 0:
        return np.full(len(a), np.nan)
    return np.where(np.isnan(a).all(1), np.nan, np.nanmax(np.where(np.isnan(a), -np.inf, a), 1))


def merge_stats(parts: dict[str, FeatureStats], label_split: str) -> FeatureStats:
    """The per-feature statistics over every split in `parts` ({split: stats of that split}).

    Counts, sums and histograms add up, `max_act` is the maximum, the exemplars are the best
    `n_top` images of all splits (ties: lower image id, as within one run). The label fields are
    those of `label_split` (the select split: what a leader is chosen by). Heat maps are left out
    (`exemplar_heatmaps` computes them for the merged exemplars).
    """
    if label_split not in parts:
        raise ValueError(f"label split {label_split!r} not among {list(parts)}")
    stats = list(parts.values())
    first = stats[0]
    known = set(_SUM + _MAX + _TOP + _SAME + _LABELS + ("spatial", "heatmaps", "split"))
    unknown = [f.name for f in fields(FeatureStats) if f.name not in known]
    if unknown:
        raise ValueError(f"merge_stats does not know how to merge FeatureStats field(s) {unknown}")
    for st in stats[1:]:
        if st.run != first.run or st.n_prefix_tokens != first.n_prefix_tokens:
            raise ValueError("merge_stats: parts of different runs or token layouts")
        if not np.array_equal(st.hist_edges, first.hist_edges):
            raise ValueError("merge_stats: parts with different histogram edges")
    names = {f.name for f in fields(FeatureStats)}
    out: dict[str, Any] = {f: getattr(parts[label_split], f) for f in _LABELS if f in names}
    out.update({f: getattr(first, f) for f in _SAME})
    for f in _SUM:
        out[f] = sum(getattr(st, f) for st in stats)
    out["max_act"] = np.max([st.max_act for st in stats], axis=0)
    width = max(st.spatial.shape[1] for st in stats)
    out["spatial"] = sum(
        np.pad(st.spatial, ((0, 0), (0, width - st.spatial.shape[1]))) for st in stats
    )
    if any(st.grid != first.grid for st in stats):
        raise ValueError(f"merge_stats: parts with different patch grids {[s.grid for s in stats]}")
    n_top = first.top_value.shape[1]
    value = np.concatenate([st.top_value for st in stats], axis=1)
    image = np.concatenate([st.top_image for st in stats], axis=1)
    token = np.concatenate([st.top_token for st in stats], axis=1)
    # best value first, ties by image id; empty slots (-1) last
    order = np.lexsort((np.where(value > 0, image, np.iinfo(np.int64).max), -value), axis=-1)
    order = order[:, :n_top]
    out["top_value"] = np.take_along_axis(value, order, 1)
    out["top_image"] = np.take_along_axis(image, order, 1)
    out["top_token"] = np.take_along_axis(token, order, 1)
    out["heatmaps"] = None
    out["split"] = "+".join(parts)
    return FeatureStats(**out)
