"""Scoring the fitted units: each image's highest patch value per unit (`image_scores`), the
image labels (`image_labels_of`, `label_matrix`), AUROC and its bootstrap (`auroc_matrix`,
`bootstrap_auroc`), and the tidy table (`COLUMNS`) of each method's best unit per concept
(`select_and_report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from saev_core import shards
from saev_core.baselines.units import BaselinesConfig, Units

COLUMNS = (
    "method",
    "concept",
    "unit",
    "sign",
    "auroc_val",
    "auroc_test",
    "lo",
    "hi",
    "n_units",
    "diff_lo",
    "diff_hi",
    "diff_p",
    "n_test_images",
    "n_test_pos",
    "select_split",
    "report_split",
    "direction",
)


def image_scores(
    units: dict[str, Units], batches: Any, n_prefix_tokens: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each image's highest patch value of every unit: `(image_id [i], {method: [i, u]})`.

    `batches` yields `(image_id, token, acts)` with each image's tokens together and contiguous
    (`loaders.iter_image_batches`); tokens below `n_prefix_tokens` (CLS, registers) are skipped.
    A two-sided method's units m..2m-1 hold the highest negated value (minus the lowest).
    """
    ids: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in units}
    for image_id, token, acts in batches:
        keep = np.asarray(token) >= n_prefix_tokens
        image_id, acts = np.asarray(image_id)[keep], np.asarray(acts, np.float32)[keep]
        if len(image_id) == 0:
            continue
        starts = np.r_[0, np.flatnonzero(np.diff(image_id)) + 1]
        ids.append(image_id[starts])
        for name, u in units.items():
            p_nm = u.project(acts)
            hi = np.maximum.reduceat(p_nm, starts, axis=0)
            if u.two_sided:
                hi = np.concatenate([hi, -np.minimum.reduceat(p_nm, starts, axis=0)], axis=1)
            parts[name].append(hi)
    if not ids:
        raise ValueError("image_scores: the batches held no patch tokens")
    image_id = np.concatenate(ids)
    if len(np.unique(image_id)) != len(image_id):
        raise ValueError("image_scores: an image's tokens arrived split across batches")
    return image_id, {name: np.concatenate(p) for name, p in parts.items()}


def auroc_matrix(s_iu: np.ndarray, y_il: np.ndarray) -> np.ndarray:
    """`[u, l]` AUROC of every score column against every label column (ties count one half).

    Mann-Whitney from average ranks, so it equals `sklearn.metrics.roc_auc_score` column by
    column; NaN where a label has no positive or no negative image.
    """
    s_iu = np.asarray(s_iu, dtype=np.float64)
    y = np.asarray(y_il, dtype=np.float64)
    r_iu = rankdata(s_iu, axis=0)
    n_pos = y.sum(0)
    n_neg = len(y) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (r_iu.T @ y - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    out[:, (n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def bootstrap_auroc(s_i: np.ndarray, y_i: np.ndarray, idx_bi: np.ndarray) -> np.ndarray:
    """AUROC of one score column on each bootstrap draw of images (`idx_bi`, rows of indices);
    NaN for a draw with no positive or no negative."""
    s = np.asarray(s_i, np.float64)[idx_bi]
    y = np.asarray(y_i, bool)[idx_bi]
    r = rankdata(s, axis=1)
    n_pos = y.sum(1).astype(np.float64)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        a = ((r * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    a[(n_pos == 0) | (n_neg == 0)] = np.nan
    return a


def label_matrix(
    image_id: np.ndarray, image_labels: pd.DataFrame, names: Sequence[str]
) -> np.ndarray:
    """`[i, l]` booleans: does image i carry label l (long `image_id`, `label` table)."""
    y = np.zeros((len(image_id), len(names)), dtype=bool)
    i = pd.Index(np.asarray(image_id, np.int64)).get_indexer(
        image_labels["image_id"].astype(np.int64)
    )
    j = pd.Index([str(n) for n in names]).get_indexer(image_labels["label"].astype(str))
    ok = (i >= 0) & (j >= 0)
    y[i[ok], j[ok]] = True
    return y


def select_and_report(
    units: dict[str, Units],
    select: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray],
    report: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray],
    names: Sequence[str],
    cfg: BaselinesConfig,
) -> pd.DataFrame:
    """The tidy table: per method and concept the best unit on `select`, reported on `report`.

    `select` and `report` are `(image_id, scores {method: [i, u]}, labels [i, l])`. Ties on the
    select split go to the lowest unit. The bootstrap draws are shared by every row; with an
    "sae" method, each other row's `diff_lo`/`diff_hi` is the CI of its AUROC minus the SAE's on
    the same draws and `diff_p` the two-sided paired bootstrap p (2 x the smaller share of draws
    on either side of 0, at most 1); NaN for the SAE's own rows and without an SAE.
    """
    _, s_sel, y_sel = select
    _, s_rep, y_rep = report
    rng = np.random.default_rng(cfg.seed)
    idx_bi = rng.integers(0, len(y_rep), size=(cfg.n_boot, len(y_rep)))
    q = (1 - cfg.ci) / 2
    rows, boots = [], []
    for name, u in units.items():
        a_sel = auroc_matrix(s_sel[name], y_sel)  # [u, l]
        for j, concept in enumerate(names):
            col = a_sel[:, j]
            if np.isnan(col).all():
                continue  # no positive or no negative on the select split
            best = int(np.argmax(np.where(np.isnan(col), -np.inf, col)))
            comp, sign = u.unit(best)
            s_i = s_rep[name][:, best]
            test = auroc_matrix(s_i[:, None], y_rep[:, [j]])[0, 0]
            boot_all = bootstrap_auroc(s_i, y_rep[:, j], idx_bi)  # [b], NaN on one-class draws
            boots.append(boot_all)
            boot = boot_all[~np.isnan(boot_all)]
            lo, hi = np.quantile(boot, [q, 1 - q]) if len(boot) else (np.nan, np.nan)
            rows.append(
                {
                    "method": name,
                    "concept": str(concept),
                    "unit": comp,
                    "sign": sign,
                    "auroc_val": float(col[best]),
                    "auroc_test": float(test),
                    "lo": float(lo),
                    "hi": float(hi),
                    "n_units": int(col.shape[0]),
                    "diff_lo": np.nan,
                    "diff_hi": np.nan,
                    "diff_p": np.nan,
                    "n_test_images": int(len(y_rep)),
                    "n_test_pos": int(y_rep[:, j].sum()),
                    "select_split": cfg.select_split,
                    "report_split": cfg.report_split,
                    "direction": (sign * u.directions_md[comp]).astype(np.float32).tolist(),
                }
            )
    sae_boot = {r["concept"]: b for r, b in zip(rows, boots, strict=True) if r["method"] == "sae"}
    for r, b in zip(rows, boots, strict=True):
        ref = sae_boot.get(r["concept"])
        if r["method"] == "sae" or ref is None:
            continue
        diff = (b - ref)[~(np.isnan(b) | np.isnan(ref))]  # same draws: paired
        if len(diff):
            r["diff_lo"], r["diff_hi"] = (float(v) for v in np.quantile(diff, [q, 1 - q]))
            r["diff_p"] = float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def image_labels_of(shard_dir: str | Path) -> pd.DataFrame:
    """The shard set's image labels as a long (image_id, label) table, as the stats stage takes
    them: `images.parquet` `labels`, else every label one of the image's patches carries."""
    shard_dir = Path(shard_dir)
    if (shard_dir / shards.IMAGES).exists():
        images = shards.read_images(shard_dir)
        if "labels" in images.columns:
            long = images[["image_id", "labels"]].explode("labels").dropna()
            return long.rename(columns={"labels": "label"}).reset_index(drop=True)
    patch = shards.read_patch_labels(shard_dir)
    if len(patch) == 0:
        raise ValueError(
            f"{shard_dir}: no image labels ({shards.IMAGES} 'labels') and no patch labels"
        )
    return patch[["image_id", "label"]].drop_duplicates().reset_index(drop=True)
