"""Label association per (label, feature): AUROC and the best-F1 threshold with its precision and
recall, exact or within a bound that is reported with every number. This module holds the
histogram route's metrics and first pass (`metrics_2d`, `associate`); the exact route is
`saev_core.stats.exact`, the refinement passes `saev_core.stats.refine.Refiner`.

Exact while small. While a level's budget units fit in `StatsConfig.exact_codes` (its non-zero
codes, its items, their (item, label) pairs, and the (code, label of its item) pairs that
`exact_level` expands every code into: a code of an item with 8 labels counts 1 + 8), `ExactBuffer`
keeps them as (item, feature, value) and `exact_level` computes AUROC from mid-ranks (Mann-Whitney;
ties 1/2 as in scikit-learn; every item without a code ties at 0) and the best F1 over every
threshold "code >= t", t > 0, whose optimum lies at a positive's code. Bounds are then 0 and no
further pass is made. A corpus past the budget (the buffer is dropped at once, so memory stays
bounded) takes the histogram route below.

Histograms. The first streamed pass (`saev_core.stats.accumulator._Accumulator`) keeps, at each
level (patches; images scored by their highest patch code), a log-spaced histogram of every
feature's codes over all items and over the positives of each label, and per (feature, bin) the
smallest and largest code that fell in the bin (the label histograms and min / max start when the
exact buffer overflows, from the batches it held). From these, every comparison across bins is
exact, the zero bin is an exact tie (counted 1/2, as scikit-learn does) and so is a bin holding one
value (min == max); only the positive-negative pairs inside a bin holding several values are
unknown, so

    auroc_err = 1/2 * sum over bins with min < max of pos_b * neg_b / (P * N)

bounds |AUROC - exact|. For the best F1 ("code >= t", t > 0: the feature must fire), every bin is
an achievable threshold (its smallest code) with exact precision and recall, and a threshold inside
bin b can do no better than 2 TP(>= b) / (TP(>= b) + FP(> b) + P), so `f1_err` = the largest such
bound over mixed bins minus the best F1 found bounds how far the reported threshold's F1 lies from
the best over all thresholds. Both bounds are 0 where the answer is exact.

Refinement. Where a pair's bound exceeds `tol` and the batches can be streamed again, each further
pass splits the few cells (bins, then sub-bins) that carry most of the bound into log-spaced
children (four per code the cell holds, 4 to `n_children`) spanning the cell's actual [min, max]
and counts, for those cells only, every code of the feature (with each child's min and max) and the
positives of each label that asked. A split depends only on the cell, so the cells form one tree
per (level, feature) and a cell that several labels split is counted once. Tightly clustered codes
are resolved because children span the codes' real range, tied codes end in one-value cells
(exact), heavy tails because children are log-spaced. Passes stop when every pair is within `tol`
or after `StatsConfig.refine_passes`; what is left is in `auroc_err` / `f1_err` (and a single-pass
caller gets the first pass's bounds).

Fixed thresholds. A threshold chosen on another split (`compute_stats(thresholds=...)`: the select
split's best-F1 cut per pair) is a cut between codes, so precision and recall at it need no
histogram: the first pass counts, per (label, feature), the items reaching it and the positives
among them (`accumulator._Accumulator._count_at`), exactly on either route.

Memory. The exact route holds at most `exact_codes` budget units per level: the buffer ~20 bytes
per code while streaming, and `exact_level`'s sort and rank arrays up to ~160 bytes per unit at
its peak (measured: ~86 B per unit without labels, ~130 B with one label per item, ~156 B with
eight), so ~650 MB per level at the default 4M. The
histograms are O(n_labels x d_sae x n_bins) as before; a refinement pass holds at most
`max_children` children (count, min, max, and a count per asking label), and between passes the
cells of the pairs still above `tol` (no more than the first pass's bins plus `max_children` per
pass made). Nothing grows with the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

N_CHILDREN = 64
"""Most children per split cell (4 per code it holds, at least 4): 64 log-spaced sub-cells shrink
a smooth cell's bound ~64-fold."""
MAX_SPLITS = 64
"""Cells a pair may split per pass (those carrying most of its bound); MAX_CHILDREN caps the sum."""
MAX_CHILDREN = 1 << 23
"""Children counted per level and pass (~24 bytes each, plus 8 per asking label)."""
_CHUNK = 1 << 20  # cells per block of the vectorised metrics (bounds their temporaries)


@dataclass
class Level:
    """Association at one level (patches or images), [n_labels, d_sae] each, NaN where the
    label has no positives or no negatives; `cells` holds the pairs still above tolerance."""

    auroc: np.ndarray
    auroc_err: np.ndarray
    threshold: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1_err: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray
    cells: _Cells | None = None


@dataclass
class _Cells:
    """Non-empty cells of the unsettled pairs, sorted by (pair, lo); cells of a pair are disjoint
    and cover its non-zero codes. `all` counts every item of the feature in the cell."""

    label: np.ndarray  # [a]
    feature: np.ndarray  # [a]
    n_pos: np.ndarray  # [a] P
    n_neg: np.ndarray  # [a] N
    pos0: np.ndarray  # [a] positives with code 0
    neg0: np.ndarray  # [a]
    pair: np.ndarray  # [c] index into the [a] arrays
    lo: np.ndarray  # [c] float64, the cell is [lo, hi)
    hi: np.ndarray
    vmin: np.ndarray  # [c] smallest and largest code in the cell
    vmax: np.ndarray
    pos: np.ndarray  # [c] int64
    all: np.ndarray  # [c] int64
    depth: np.ndarray  # [c] splits since the first pass's bin


def metrics_2d(
    pos: np.ndarray,
    neg: np.ndarray,
    vmin: np.ndarray,
    vmax: np.ndarray,
    pos0: np.ndarray,
    neg0: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per row (a pair), from its cells in ascending order of value (empty cells allowed).

    Returns per row auroc, auroc_err, threshold (0: "code > 0"; NaN: no positive fires),
    precision, recall, f1_err, f1; and per cell the AUROC weight `w` = pos * neg of a cell
    holding several values and the F1 upper bound `ub` of a threshold inside it.
    """
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    pos0, neg0 = pos0.astype(np.float64), neg0.astype(np.float64)
    n_pos, n_neg = pos0 + pos.sum(1), neg0 + neg.sum(1)
    pn = n_pos * n_neg
    neg_cum = np.cumsum(neg, 1)
    neg_below = neg_cum - neg  # negatives in lower cells (the zero bin added below)
    wins = 0.5 * pos0 * neg0 + (pos * (neg0[:, None] + neg_below + 0.5 * neg)).sum(1)
    w = np.where(vmin < vmax, pos * neg, 0.0)
    # predicting "cell >= c": true and false positives
    tp = (pos.sum(1)[:, None] - np.cumsum(pos, 1)) + pos
    fp = neg.sum(1)[:, None] - neg_below
    nonempty = (pos + neg) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (tp + fp + n_pos[:, None]), 0.0)
        f1 = np.where(nonempty, f1, -1.0)  # an empty cell is no threshold of its own
        r = np.arange(len(pos))
        best = np.argmax(f1, 1)  # ties: the lowest threshold
        f1_best = np.maximum(f1[r, best], 0.0)
        ok = f1_best > 0
        tp_b, fp_b = tp[r, best], fp[r, best]
        ub = np.where(w > 0, 2 * tp / (tp + fp - neg + n_pos[:, None]), 0.0)
        first = np.argmax(nonempty, 1)
        out = {
            "auroc": wins / pn,
            "auroc_err": 0.5 * w.sum(1) / pn,
            "threshold": np.where(ok, np.where(best == first, 0.0, vmin[r, best]), np.nan),
            "precision": np.where(ok, tp_b / (tp_b + fp_b), np.nan),
            "recall": np.where(ok, tp_b / n_pos, np.nan),
            "f1_err": np.maximum(ub.max(1, initial=0.0) - f1_best, 0.0),
            "f1": f1_best,
        }
    return out, w, ub


_KEYS = ("auroc", "auroc_err", "threshold", "precision", "recall", "f1_err")


def associate(
    pos_hist_lsh: torch.Tensor,
    sum_in_ls: torch.Tensor,
    n_pos: np.ndarray,
    all_hist_sh: np.ndarray,
    sum_all_s: torch.Tensor,
    vmin_sh: torch.Tensor,
    vmax_sh: torch.Tensor,
    edges: np.ndarray,
    tol: float,
    exact: dict[str, np.ndarray] | None = None,
) -> Level:
    """The first pass's association at one level, and the cells of the pairs above `tol`.

    `pos_hist_lsh` and `all_hist_sh` are histograms with bin 0 = zeros (filled in here for the
    positives) and bins 1.. = the log bins of `edges`; `vmin_sh` / `vmax_sh` the smallest and
    largest code per (feature, bin). `exact` (from `exact_level`) replaces the histogram
    estimates: no bound, no cells.
    """
    n_labels, s = pos_hist_lsh.shape[0], all_hist_sh.shape[0]
    n_total = int(all_hist_sh[0].sum()) if s else 0
    sum_all = sum_all_s.cpu().numpy().astype(np.float64)
    sum_in = sum_in_ls.cpu().numpy().astype(np.float64)
    vmin = vmin_sh.cpu().numpy().astype(np.float64)[:, 1:]
    vmax = vmax_sh.cpu().numpy().astype(np.float64)[:, 1:]
    all_nz = all_hist_sh[:, 1:]
    lv = Level(*(np.full((n_labels, s), np.nan) for _ in range(8)))
    cells = []
    step = max(1, _CHUNK // max(all_nz.shape[1], 1))
    for i in range(n_labels):
        n_p, n_n = int(n_pos[i]), n_total - int(n_pos[i])
        if n_p:
            lv.mean_in[i] = sum_in[i] / n_p
        if n_n:
            lv.mean_out[i] = (sum_all - sum_in[i]) / n_n
        if not (n_p and n_n) or exact is not None:
            continue
        pos_all = pos_hist_lsh[i].cpu().numpy()
        for lo in range(0, s, step):
            sl = slice(lo, lo + step)
            pos = pos_all[sl, 1:]
            pos0 = n_p - pos.sum(1)
            neg = all_nz[sl] - pos
            neg0 = all_hist_sh[sl, 0] - pos0
            m, _, _ = metrics_2d(pos, neg, vmin[sl], vmax[sl], pos0, neg0)
            for k in _KEYS:
                getattr(lv, k)[i, sl] = m[k]
            bad = np.flatnonzero((m["auroc_err"] > tol) | (m["f1_err"] > tol))
            if len(bad):
                cells.append((i, lo + bad, pos[bad], all_nz[sl][bad], pos0[bad], neg0[bad]))
    if exact is not None:
        for k in (*_KEYS, "mean_in", "mean_out"):
            setattr(lv, k, exact[k])
    lv.cells = _first_cells(cells, vmin, vmax, edges, n_total, n_pos) if cells else None
    return lv


def _first_cells(parts, vmin_sf, vmax_sf, edges, n_total, n_pos) -> _Cells:
    """The first pass's non-empty bins of the unsettled pairs as a cell table."""
    lo_b = np.concatenate([[0.0], edges[1:-1]])  # bin 1 holds everything below edges[1]
    hi_b = np.concatenate([edges[1:-1], [np.inf]])  # the last bin everything above
    label, feature, pos0, neg0, pair, pos, al, b = [], [], [], [], [], [], [], []
    a = 0
    for i, feats, pos_fb, all_fb, p0, n0 in parts:
        label.append(np.full(len(feats), i))
        feature.append(feats)
        pos0.append(p0)
        neg0.append(n0)
        r, c = np.nonzero(all_fb > 0)
        pair.append(a + r)
        pos.append(pos_fb[r, c])
        al.append(all_fb[r, c])
        b.append(c)
        a += len(feats)
    label, feature = np.concatenate(label), np.concatenate(feature)
    pair, b = np.concatenate(pair), np.concatenate(b)
    feat_c = feature[pair]
    p = n_pos[label].astype(np.int64)
    return _Cells(
        label=label,
        feature=feature,
        n_pos=p,
        n_neg=n_total - p,
        pos0=np.concatenate(pos0),
        neg0=np.concatenate(neg0),
        pair=pair,
        lo=lo_b[b],
        hi=hi_b[b],
        vmin=vmin_sf[feat_c, b],
        vmax=vmax_sf[feat_c, b],
        pos=np.concatenate(pos).astype(np.int64),
        all=np.concatenate(al).astype(np.int64),
        depth=np.zeros(len(pair), np.int64),
    )


def _table_metrics(c: _Cells) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """metrics_2d over the cell table, pairs padded to blocks of similar size."""
    n_pairs = len(c.label)
    counts = np.bincount(c.pair, minlength=n_pairs)
    start = np.cumsum(counts) - counts
    out = {k: np.empty(n_pairs) for k in (*_KEYS, "f1")}
    w_c, ub_c = np.zeros(len(c.pair)), np.zeros(len(c.pair))
    a = 0
    while a < n_pairs:
        b, width = a, 1
        while b < n_pairs and (b - a + 1) * max(width, counts[b]) <= _CHUNK:
            width = max(width, counts[b])
            b += 1
        b = max(b, a + 1)
        width = max(width, counts[a:b].max(initial=1))
        sel = slice(start[a], start[b - 1] + counts[b - 1])
        row = c.pair[sel] - a
        col = np.arange(sel.start, sel.stop) - start[c.pair[sel]]
        grid = {}
        for name, fill in (("pos", 0), ("all", 0), ("vmin", np.inf), ("vmax", -np.inf)):
            g = np.full((b - a, width), fill, np.float64)
            g[row, col] = getattr(c, name)[sel]
            grid[name] = g
        m, w, ub = metrics_2d(
            grid["pos"], grid["all"] - grid["pos"], grid["vmin"], grid["vmax"],
            c.pos0[a:b], c.neg0[a:b],
        )  # fmt: skip
        for k in out:
            out[k][a:b] = m[k]
        w_c[sel], ub_c[sel] = w[row, col], ub[row, col]
        a = b
    return out, w_c, ub_c
