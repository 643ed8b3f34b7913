"""What an edit did: the metrics of one condition against the unedited predictions.

Per image and concept the change in probability (`_effects`); for a classifier or probe the
target's change, its prediction flips and those of the other concepts (`_classification_metrics`);
for segmentation the per-pixel rates, each class's share of pixels and the change in mIoU
against the masks (`_segmentation_metrics`); the mean of a kind of controls
(`_control_summary`) and the edit's change of every concept (`_specificity`). Every interval
uses the hypothesis's one bootstrap weight matrix `W`, so all are paired over images.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from saev_core.hypotheses.readers import Reader
from saev_core.verdicts import boot_means, mean_ci, percentile_ci, ratio_ci

# ---------------------------------------------------------------------------------------------
# measuring


def _effects(reader: Reader, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Per image and concept, the change in its probability [n, C] (segmentation: the image's
    mean change over patches)."""
    d = p1 - p0
    return d.mean(axis=1) if reader.kind == "segmentation" else d


def _classification_metrics(reader, p0, p1, j, W, prefix, ci=True) -> dict[str, Any]:
    y0, y1 = reader.predictions(p0), reader.predictions(p1)
    others = [k for k in range(p0.shape[1]) if k != j]
    d = p1[:, j] - p0[:, j]
    flip_t = (y0[:, j] != y1[:, j]).astype(float)
    flip_o = (y0[:, others] != y1[:, others]).mean(axis=1) if others else np.zeros(len(d))
    out = {"p_after": float(p1[:, j].mean()), "delta": float(d.mean())}
    out["target_change_rate"] = float(flip_t.mean())
    out["other_change_rate"] = float(flip_o.mean())
    if ci:
        out["delta_lo"], out["delta_hi"] = mean_ci(d, W)
        out["target_change_lo"], out["target_change_hi"] = mean_ci(flip_t, W)
        out["other_change_lo"], out["other_change_hi"] = mean_ci(flip_o, W)
    abs_o = np.abs(p1[:, others] - p0[:, others]).mean() if others else 0.0
    out["other_abs_delta"] = float(abs_o)
    return {prefix + k: v for k, v in out.items()}


def _miou_rows(conf_flat: np.ndarray, c: int) -> np.ndarray:
    """mIoU of each row of flattened [m, c * c] confusion matrices, as `probes.miou_from_confusion`
    defines it (classes without pixels in target or prediction do not count)."""
    conf = conf_flat.reshape(-1, c, c)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    valid = union > 0
    iou = np.where(valid, tp / np.where(valid, union, 1), 0.0)
    n_valid = valid.sum(1)
    return np.where(n_valid > 0, iou.sum(1) / np.maximum(1, n_valid), np.nan)


def _segmentation_metrics(reader, p0, p1, j, gt, W, prefix, ci=True) -> dict[str, Any]:
    """p: [n, patches, classes]; gt: [n, patches] class index."""
    c = p0.shape[-1]
    a0, a1 = p0.argmax(-1), p1.argmax(-1)
    d = (p1[..., j] - p0[..., j]).mean(axis=1)
    was_t = a0 == j
    out = {"p_after": float(p1[..., j].mean()), "delta": float(d.mean())}
    lost = (was_t & (a1 != j)).sum(1)
    out["target_change_rate"] = float(lost.sum() / max(1, was_t.sum()))
    moved = (~was_t & (a1 != a0)).sum(1)
    out["other_change_rate"] = float(moved.sum() / max(1, (~was_t).sum()))
    if ci:
        out["delta_lo"], out["delta_hi"] = mean_ci(d, W)
        out["target_change_lo"], out["target_change_hi"] = ratio_ci(lost, was_t.sum(1), W)
        out["other_change_lo"], out["other_change_hi"] = ratio_ci(moved, (~was_t).sum(1), W)
    others = [k for k in range(c) if k != j]
    out["other_abs_delta"] = float(np.abs(p1[..., others] - p0[..., others]).mean())
    # per class: change in the fraction of the image's pixels (patches) predicted as it
    frac0 = np.stack([(a0 == k).mean(1) for k in range(c)], 1)
    frac1 = np.stack([(a1 == k).mean(1) for k in range(c)], 1)
    if ci:
        out["class_pixel_change"] = json.dumps(
            dict(zip(reader.labels, np.round((frac1 - frac0).mean(0), 5).tolist(), strict=True))
        )
    conf0 = _confusions(a0, gt, c).reshape(len(a0), -1)
    conf1 = _confusions(a1, gt, c).reshape(len(a0), -1)
    m0, m1 = (float(_miou_rows(x.sum(0, keepdims=True), c)[0]) for x in (conf0, conf1))
    out["miou_before"], out["miou_after"], out["miou_delta"] = m0, m1, m1 - m0
    if ci:
        diffs = _miou_rows(W @ conf1, c) - _miou_rows(W @ conf0, c)
        out["miou_delta_lo"], out["miou_delta_hi"] = percentile_ci(diffs)
    return {prefix + k: v for k, v in out.items()}


def _control_summary(reader, p0, p1s, j, gt, W, prefix) -> dict[str, Any]:
    """The controls of one kind (p1s [K, n, ...]): their mean effect on the target, with the
    bootstrap interval of the per-image mean over the K controls, and their mean rates."""
    if len(p1s) == 0:
        return {}
    each = [
        _segmentation_metrics(reader, p0, p1, j, gt, W, "", ci=False)
        if reader.kind == "segmentation"
        else _classification_metrics(reader, p0, p1, j, W, "", ci=False)
        for p1 in p1s
    ]
    out = {k: float(np.mean([m[k] for m in each])) for k in each[0]}
    per_image = np.mean([_effects(reader, p0, p1)[:, j] for p1 in p1s], axis=0)
    out["delta_lo"], out["delta_hi"] = mean_ci(per_image, W)
    return {prefix + k: v for k, v in out.items()}


def _specificity(reader, p0, p1, j, W, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per concept: the edit's mean change of its probability, with a bootstrap 95%
    interval over the same resampled images; for segmentation also the share of the pixels
    predicted as that concept before whose prediction changes (`change_rate`), next to the edit's
    target and other change rates."""
    eff = _effects(reader, p0, p1)  # [n, C]
    lo, hi = percentile_ci(boot_means(W, eff))
    rows = []
    seg = reader.kind == "segmentation"
    if seg:
        a0, a1 = p0.argmax(-1), p1.argmax(-1)
        was_t = a0 == j
        t_rate = float((was_t & (a1 != j)).sum() / max(1, was_t.sum()))
        o_rate = float((~was_t & (a1 != a0)).sum() / max(1, (~was_t).sum()))
    for k, label in enumerate(reader.labels):
        row = {**base, "concept": label, "delta": float(eff[:, k].mean()),
               "delta_lo": float(lo[k]), "delta_hi": float(hi[k])}  # fmt: skip
        if seg:
            was = a0 == k
            row["change_rate"] = float((was & (a1 != a0)).sum() / max(1, was.sum()))
            row["target_change_rate"], row["other_change_rate"] = t_rate, o_rate
        rows.append(row)
    return rows


def _confusions(pred: np.ndarray, gt: np.ndarray, c: int) -> np.ndarray:
    """Per image [n, c, c] confusion matrices (target x prediction)."""
    flat = gt * c + pred
    return np.stack([np.bincount(f, minlength=c * c).reshape(c, c) for f in flat])
