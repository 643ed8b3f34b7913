"""Label association per (label, feature): AUROC and the best-F1 threshold with its precision and
recall, exact or within a bound that is reported with every number.

Exact while small. While a level's budget units fit in `StatsConfig.exact_codes` (its non-zero
codes, its items, their (item, label) pairs, and the (code, label of its item) pairs that
`exact_level` expands every code into: a code of an item with 8 labels counts 1 + 8), `ExactBuffer` keeps them as (item, feature, value) and `exact_level`
computes AUROC from mid-ranks (Mann-Whitney; ties 1/2 as in scikit-learn; every item without a
code ties at 0) and the best F1 over every threshold "code >= t", t > 0, whose optimum lies at a
positive's code. Bounds are then 0 and no further pass is made. A corpus past the budget (the
buffer is dropped at once, so memory stays bounded) takes the histogram route below.

Histograms. The first streamed pass (`saev_core.stats._Accumulator`) keeps, at each level (patches;
images scored by their highest patch code), a log-spaced histogram of every feature's codes over
all items and over the positives of each label, and per (feature, bin) the smallest and largest
code that fell in the bin (the label histograms and min / max start when the exact buffer
overflows, from the batches it held). From these, every comparison across bins is exact, the zero bin is an
exact tie (counted 1/2, as scikit-learn does) and so is a bin holding one value (min == max); only
the positive-negative pairs inside a bin holding several values are unknown, so

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
among them (`stats._Accumulator._count_at`), exactly on either route.

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


class Refiner:
    """Refinement passes at one level: `plan`, then `update` per batch, then `absorb`."""

    def __init__(
        self,
        level: Level,
        n_labels: int,
        d_sae: int,
        tol: float,
        device: torch.device,
        fdtype: torch.dtype,
        n_children: int = N_CHILDREN,
        max_splits: int = MAX_SPLITS,
        max_children: int = MAX_CHILDREN,
    ) -> None:
        self.level, self.cells = level, level.cells
        self.n_labels, self.s, self.tol = n_labels, d_sae, tol
        self.device, self.fdtype = device, fdtype
        self.R, self.max_splits = n_children, max_splits
        self.max_children = max_children
        self.plan_ = None
        if self.cells is not None:
            self._settle(*_table_metrics(self.cells))

    def _settle(self, m: dict[str, np.ndarray], w: np.ndarray, ub: np.ndarray) -> None:
        """Write every pair's current numbers; keep the cells of pairs still above tol."""
        c = self.cells
        for k in _KEYS:
            getattr(self.level, k)[c.label, c.feature] = m[k]
        open_ = (m["auroc_err"] > self.tol) | (m["f1_err"] > self.tol)
        pn = (c.n_pos * c.n_neg).astype(np.float64)
        # how much of the pair's bound a cell carries (AUROC share, or F1 excess)
        score = np.maximum(0.5 * w / pn[c.pair], np.where(w > 0, ub - m["f1"][c.pair], 0.0))
        keep = open_[c.pair]
        if not keep.any():
            self.cells = None
            return
        new_id = np.cumsum(open_) - 1
        pairs = {k: getattr(c, k)[open_] for k in ("label", "feature", "n_pos", "n_neg")}
        pairs |= {k: getattr(c, k)[open_] for k in ("pos0", "neg0")}
        cellv = {k: getattr(c, k)[keep] for k in ("lo", "hi", "vmin", "vmax", "pos", "all")}
        self.cells = _Cells(**pairs, pair=new_id[c.pair[keep]], depth=c.depth[keep], **cellv)
        self.score, self.w = score[keep], w[keep]
        self.auroc_err, self.f1_err, self.f1 = (m[k][open_] for k in ("auroc_err", "f1_err", "f1"))

    def plan(self) -> bool:
        """Choose the cells to split in the next pass; False when nothing is left to do."""
        self.plan_ = None
        c = self.cells
        if c is None:
            return False
        pn = (c.n_pos * c.n_neg).astype(np.float64)[c.pair]
        cand = np.flatnonzero(self.w > 0)
        # per pair: cells by their share of the bound, best first
        order = cand[np.lexsort((-self.score[cand], c.pair[cand]))]
        pr = c.pair[order]
        first = np.r_[True, pr[1:] != pr[:-1]]
        start = np.maximum.accumulate(np.where(first, np.arange(len(pr)), 0))
        rank = np.arange(len(pr)) - start
        # AUROC: split until the rest of the bound is under tol / 2
        share = 0.5 * self.w[order] / pn[order]
        cum = np.cumsum(share)
        before = cum - share - (cum - share)[start]
        need_a = (self.auroc_err[pr] - before) > self.tol / 2
        need_f = (self.f1_err[pr] > self.tol) & (self.score[order] > self.tol / 2)
        pick = order[(need_a | need_f) & (rank < self.max_splits)]
        # children per cell: a few per code it holds (enough to part distinct values), at most R
        n_ch = np.minimum(self.R, np.maximum(4, 4 * c.all[pick]))
        if n_ch.sum() > self.max_children:  # the largest shares first; the rest wait a pass
            by = np.argsort(-self.score[pick], kind="stable")
            pick = pick[by[np.cumsum(n_ch[by]) <= self.max_children]]
        if len(pick) == 0:
            return False
        feat = c.feature[c.pair[pick]]
        # one split cell per distinct (feature, lo, hi): the tree is shared by the labels
        key = np.stack([feat.astype(np.float64), c.lo[pick], c.hi[pick]], 1)
        _, first_of, cell_of = np.unique(key, axis=0, return_index=True, return_inverse=True)
        cell_of = cell_of.reshape(-1)
        u_pick = pick[first_of]
        n_cells = len(u_pick)
        vmin, vmax, lo, hi = c.vmin[u_pick], c.vmax[u_pick], c.lo[u_pick], c.hi[u_pick]
        r = np.minimum(self.R, np.maximum(4, 4 * c.all[u_pick])).astype(np.int64)
        off = np.cumsum(r) - r  # cell i's children are off[i] .. off[i] + r[i] - 1
        eoff = off + np.arange(n_cells)  # and its r[i] + 1 edges start here
        cell_e = np.repeat(np.arange(n_cells), r + 1)
        j = np.arange(int(r.sum()) + n_cells) - eoff[cell_e]
        # log-spaced from the cell's smallest to its largest code; the ends are the cell's own
        edges = vmin[cell_e] * (vmax / vmin)[cell_e] ** (j / r[cell_e])
        edges = np.where(j == 0, lo[cell_e], np.where(j == r[cell_e], hi[cell_e], edges))
        while True:  # keep each cell's edges non-decreasing whatever the rounding
            bad = np.flatnonzero((edges[1:] < edges[:-1]) & (cell_e[1:] == cell_e[:-1]))
            if len(bad) == 0:
                break
            edges[bad + 1] = edges[bad]
        unit_key = cell_of * self.n_labels + c.label[c.pair[pick]]
        order_u = np.argsort(unit_key)
        r_u = r[cell_of[order_u]]
        uoff = np.cumsum(r_u) - r_u  # unit u's children (positives) start here
        dev, fd = self.device, self.fdtype
        layers = []
        depth = c.depth[u_pick]
        for d in np.unique(depth):
            ids = np.flatnonzero(depth == d)
            ids = ids[np.lexsort((lo[ids], feat[first_of[ids]]))]
            lo_u = np.unique(lo[ids])
            rank_lo = np.searchsorted(lo_u, lo[ids], side="right")
            f_ids = feat[first_of[ids]].astype(np.int64)
            layers.append(
                {
                    "key": torch.from_numpy(f_ids * (len(lo_u) + 1) + rank_lo).to(dev),
                    "lo_u": torch.from_numpy(lo_u).to(dev, fd),
                    "m": len(lo_u) + 1,
                    "feat": torch.from_numpy(f_ids).to(dev),
                    "hi": torch.from_numpy(hi[ids]).to(dev, fd),
                    "cell": torch.from_numpy(ids.astype(np.int64)).to(dev),
                }
            )
        feat_mask = torch.zeros(self.s, dtype=torch.bool, device=dev)
        feat_mask[torch.from_numpy(np.unique(feat)).to(dev)] = True
        n_children = int(r.sum())

        def t(x, dtype=torch.int64):
            return torch.from_numpy(x).to(dev, dtype)

        self.plan_ = {
            "pick": pick,
            "cell_of": cell_of,
            "unit_of": np.argsort(order_u),  # pick j -> unit index
            "r": r,
            "off": off,
            "eoff": eoff,
            "uoff": uoff,
            "edges": edges,
            "layers": layers,
            "feat_mask": feat_mask,
            "r_t": t(r),
            "off_t": t(off),
            "eoff_t": t(eoff),
            "uoff_t": t(uoff),
            "edges_t": t(edges, fd),
            "lvmin": t(np.log(vmin), torch.float64),
            "lspan": t(np.log(vmax / vmin), torch.float64),
            "unit_key": t(unit_key[order_u]),
            "all": torch.zeros(n_children, dtype=torch.int64, device=dev),
            "min": torch.full((n_children,), np.inf, dtype=fd, device=dev),
            "max": torch.full((n_children,), -np.inf, dtype=fd, device=dev),
            "pos": torch.zeros(int(r_u.sum()), dtype=torch.int64, device=dev),
        }
        return True

    def feature_mask(self) -> torch.Tensor | None:
        """[d_sae] bool: features with a cell to count this pass (None: no pass planned)."""
        return None if self.plan_ is None else self.plan_["feat_mask"]

    def update(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
        n_rows: int,
        label_rows: np.ndarray,
        label_codes: np.ndarray,
    ) -> None:
        """Count non-zero `(row, col, val)` entries (val in the first pass's dtype) that fall in a
        split cell; rows own the `(label_rows, label_codes)` pairs (sorted by row)."""
        p = self.plan_
        if p is None or len(rows) == 0:
            return
        keep = torch.nonzero(p["feat_mask"][cols]).squeeze(1)
        rows, cols, vals = rows[keep], cols[keep], vals[keep].to(self.fdtype)
        if len(rows) == 0:
            return
        dev = self.device
        for layer in p["layers"]:
            rank = torch.searchsorted(layer["lo_u"], vals, right=True)
            idx = torch.searchsorted(layer["key"], cols * layer["m"] + rank, right=True) - 1
            idx_c = idx.clamp_min(0)
            ok = (idx >= 0) & (layer["feat"][idx_c] == cols) & (vals < layer["hi"][idx_c])
            hit = torch.nonzero(ok).squeeze(1)
            if len(hit) == 0:
                continue
            cell = layer["cell"][idx_c[hit]]
            v = vals[hit]
            r, e0, edges = p["r_t"][cell], p["eoff_t"][cell], p["edges_t"]
            k = torch.floor(r * (torch.log(v.double()) - p["lvmin"][cell]) / p["lspan"][cell])
            k = torch.minimum(k.long().clamp_min(0), r - 1)
            for _ in range(self.R):  # the float estimate can be one off: settle on exact edges
                down = v < edges[e0 + k]
                up = v >= edges[e0 + k + 1]
                if not bool((down | up).any()):
                    break
                k = torch.minimum((k - down.long() + up.long()).clamp_min(0), r - 1)
            child = p["off_t"][cell] + k
            p["all"].index_add_(0, child, torch.ones_like(child))
            p["min"].scatter_reduce_(0, child, v, "amin")
            p["max"].scatter_reduce_(0, child, v, "amax")
            if len(label_rows) == 0:
                continue
            lr = torch.from_numpy(label_rows).to(dev)
            lc = torch.from_numpy(label_codes).to(dev)
            counts_n = torch.bincount(lr, minlength=n_rows)
            starts_n = torch.cumsum(counts_n, 0) - counts_n
            r_hit = rows[hit]
            cnt = counts_n[r_hit]
            entry = torch.repeat_interleave(torch.arange(len(hit), device=dev), cnt)
            if len(entry) == 0:
                continue
            offset = torch.cumsum(cnt, 0) - cnt
            within = torch.arange(len(entry), device=dev) - offset[entry]
            label = lc[starts_n[r_hit[entry]] + within]
            ukey = cell[entry] * self.n_labels + label
            uk = p["unit_key"]
            u = torch.searchsorted(uk, ukey).clamp_max(len(uk) - 1)
            found = torch.nonzero(uk[u] == ukey).squeeze(1)
            slot = p["uoff_t"][u[found]] + k[entry[found]]
            p["pos"].index_add_(0, slot, torch.ones_like(slot))

    def absorb(self) -> None:
        """Replace the split cells by their non-empty children and recompute the pairs."""
        p, c = self.plan_, self.cells
        self.plan_ = None
        all_f = p["all"].cpu().numpy()
        min_f = p["min"].cpu().numpy().astype(np.float64)
        max_f = p["max"].cpu().numpy().astype(np.float64)
        pos_f = p["pos"].cpu().numpy()
        pick, cell_of, unit_of = p["pick"], p["cell_of"], p["unit_of"]
        r_pick = p["r"][cell_of]
        rep = np.repeat(np.arange(len(pick)), r_pick)  # one row per child of every pick
        seg = np.cumsum(r_pick) - r_pick
        k = np.arange(len(rep)) - seg[rep]
        ch = p["off"][cell_of][rep] + k
        ch_all, ch_min, ch_max = all_f[ch], min_f[ch], max_f[ch]
        ch_pos = pos_f[p["uoff"][unit_of][rep] + k]
        nz = ch_all > 0
        outside = (nz & ((ch_min < c.vmin[pick][rep]) | (ch_max > c.vmax[pick][rep]))).any()
        sum_all, sum_pos = np.add.reduceat(ch_all, seg), np.add.reduceat(ch_pos, seg)
        if outside or (sum_all != c.all[pick]).any() or (sum_pos != c.pos[pick]).any():
            raise ValueError(
                "a refinement pass over the batches counted other codes than the first pass: "
                "`batches` must yield the same data every time it is called"
            )
        e = p["eoff"][cell_of][rep] + k
        new = {
            "pair": c.pair[pick][rep][nz],
            "lo": p["edges"][e][nz],
            "hi": p["edges"][e + 1][nz],
            "vmin": ch_min[nz],
            "vmax": ch_max[nz],
            "pos": ch_pos[nz],
            "all": ch_all[nz],
            "depth": c.depth[pick][rep][nz] + 1,
        }
        rest = np.ones(len(c.pair), bool)
        rest[pick] = False
        merged = {k_: np.concatenate([getattr(c, k_)[rest], v]) for k_, v in new.items()}
        order = np.lexsort((merged["lo"], merged["pair"]))
        for k_, v in merged.items():
            setattr(c, k_, v[order])
        self._settle(*_table_metrics(c))


class ExactBuffer:
    """Every non-zero code of one level as (item, feature, value) plus the items' labels, kept
    while codes + label pairs + items + (code, label) pairs fit in `max_codes` (~160 bytes per
    unit at the peak of `exact_level`, see the module docstring): then the association is computed exactly from ranks
    (`exact_level`) with no histogram bound and no further pass. Past the budget the buffer is
    dropped (`full`), its batches handed back once for the histograms, which take over."""

    def __init__(self, max_codes: int) -> None:
        self.max_codes, self.n, self.n_items, self.full = max_codes, 0, 0, False
        self.parts: list[tuple] = []  # (rows, cols, vals32, n_rows, label_rows, label_codes)
        self.offsets: list[int] = []

    def add(
        self,
        n_rows: int,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals32: torch.Tensor,
        label_rows: np.ndarray,
        label_codes: np.ndarray,
    ) -> list[tuple] | None:
        """Keep one batch (`n_rows` items; rows index them). Returns None while the level stays
        exact; else the batches that the histograms have not seen yet (the buffered ones when
        this batch overflows it, then none), the caller adding this batch itself."""
        offset = self.n_items
        self.n_items += n_rows
        if self.full:
            return []
        # what exact_level holds: codes, label pairs, items, and one entry per (code, label of
        # its item), which it expands every code into (an item with 8 labels: 8 per code)
        rows_np = rows.cpu().numpy().astype(np.int64)
        per_row = np.bincount(label_rows.astype(np.int64), minlength=n_rows)
        n_pairs = int(per_row[rows_np].sum()) if len(rows_np) else 0
        self.n += len(rows) + len(label_rows) + n_rows + n_pairs
        if self.n > self.max_codes:
            replay, self.parts, self.offsets, self.full = self.parts, [], [], True
            return replay
        self.parts.append(
            (
                rows_np,
                cols.cpu().numpy().astype(np.int64),
                vals32.cpu().numpy().astype(np.float32),
                n_rows,
                label_rows.astype(np.int64),
                label_codes.astype(np.int64),
            )
        )
        self.offsets.append(offset)
        return None

    def level(self, n_items: int, n_pos: np.ndarray, n_labels: int, s: int) -> dict | None:
        """exact_level over the buffer (None when it overflowed)."""
        if self.full:
            return None

        def cat(i: int, offset: bool = False) -> np.ndarray:
            xs = [
                x[i] + (o if offset else 0) for x, o in zip(self.parts, self.offsets, strict=True)
            ]
            return np.concatenate(xs) if xs else np.zeros(0, np.int64)

        item, feat, val = cat(0, True), cat(1), cat(2).astype(np.float64)
        lab_item, lab_code = cat(4, True), cat(5)
        return exact_level(item, feat, val, lab_item, lab_code, n_items, n_pos, n_labels, s)


def exact_level(
    item: np.ndarray,
    feat: np.ndarray,
    val: np.ndarray,
    lab_item: np.ndarray,
    lab_code: np.ndarray,
    n_items: int,
    n_pos: np.ndarray,
    n_labels: int,
    s: int,
) -> dict[str, np.ndarray]:
    """Exact AUROC (Mann-Whitney with mid-ranks: ties count 1/2, as sklearn) and best-F1
    threshold per (label, feature) from every non-zero code (float32 values, as float64) of
    items 0.. (ids need not be dense; `n_items` counts them, the ones without a code score 0)."""
    out = {k: np.full((n_labels, s), np.nan) for k in _KEYS}
    P = n_pos.astype(np.float64)
    N = n_items - P
    feat = feat.astype(np.int64)
    # codes sorted by (feature, value): one int64 key, a positive float32's bits order like it
    key = (feat << 32) | val.astype(np.float32).view(np.int32).astype(np.int64)
    order = np.argsort(key)
    key, item, feat, val = key[order], item[order], feat[order], val[order]
    nnz = np.bincount(feat, minlength=s)
    gstart = np.cumsum(nnz) - nnz
    Z = (n_items - nnz).astype(np.float64)
    sum_all = np.bincount(feat, weights=val, minlength=s)
    # tie runs: left / right = how many codes sort below v / up to v
    new_run = np.ones(len(key), bool)
    new_run[1:] = key[1:] != key[:-1]
    run_first = np.flatnonzero(new_run)
    run = np.cumsum(new_run) - 1
    # every (code, label of its item), in (feature, value) order
    o = np.argsort(lab_item, kind="stable")
    lab_item, lab_code = lab_item[o], lab_code[o]
    n_ids = int(max(item.max(initial=-1), lab_item.max(initial=-1))) + 1
    cnt_id = np.bincount(lab_item, minlength=n_ids)
    start_id = np.cumsum(cnt_id) - cnt_id
    c = cnt_id[item]
    hit = np.flatnonzero(c)
    c = c[hit]
    e = np.repeat(hit, c)
    within = np.arange(len(e)) - np.repeat(np.cumsum(c) - c, c)
    lab = lab_code[np.repeat(start_id[item[hit]], c) + within]
    f_e, v_e = feat[e], val[e]
    left = run_first[run[e]]
    right = np.append(run_first[1:], len(key))[run[e]]
    rank = Z[f_e] + (left + right + 1) / 2 - gstart[f_e]  # 1-based mid-rank among all items
    cnt_ge = (gstart[f_e] + nnz[f_e] - left).astype(np.float64)  # items scoring >= v
    pair = lab * s + f_e
    r_nz = np.bincount(pair, weights=rank, minlength=n_labels * s).reshape(n_labels, s)
    p_nz = np.bincount(pair, minlength=n_labels * s).reshape(n_labels, s)
    sum_in = np.bincount(pair, weights=v_e, minlength=n_labels * s).reshape(n_labels, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_pos = r_nz + (P[:, None] - p_nz) * (Z[None, :] + 1) / 2
        out["auroc"] = (r_pos - P[:, None] * (P[:, None] + 1) / 2) / (P * N)[:, None]
        out["mean_in"] = np.where(P[:, None] > 0, sum_in / P[:, None], np.nan)
        out["mean_out"] = np.where(N[:, None] > 0, (sum_all - sum_in) / N[:, None], np.nan)
    # best F1 of "code >= v": the optimum sits at a positive's code, where TP = the label's
    # codes >= v and cnt_ge are predicted; pairs grouped by (label, feature), values ascending
    o = np.argsort(lab.astype(np.int16) if n_labels < 2**15 else lab, kind="stable")
    pair_o, v_o, cnt_o, lowest_o = pair[o], v_e[o], cnt_ge[o], left[o] == gstart[f_e[o]]
    n = len(o)
    if n:
        grp_new = np.ones(n, bool)
        grp_new[1:] = pair_o[1:] != pair_o[:-1]
        grp_id = np.cumsum(grp_new) - 1
        grp_first = np.flatnonzero(grp_new)
        gsize = np.diff(np.append(grp_first, n))
        gpos = np.arange(n) - grp_first[grp_id]
        tie_new = grp_new.copy()
        tie_new[1:] |= v_o[1:] != v_o[:-1]
        tie_first = np.flatnonzero(tie_new)
        tp = (gsize[grp_id] - gpos[tie_first][np.cumsum(tie_new) - 1]).astype(np.float64)
        lb = pair_o // s
        f1 = 2 * tp / (cnt_o + P[lb])
        gmax = np.maximum.reduceat(f1, grp_first)
        # ties: the lowest threshold, the first maximum of the (ascending) group
        hit = np.flatnonzero(f1 == gmax[grp_id])
        best = hit[np.r_[True, grp_id[hit][1:] != grp_id[hit][:-1]]]
        lb, fb = lb[best], pair_o[best] % s
        # the feature's smallest non-zero code as threshold is "code > 0"
        out["threshold"][lb, fb] = np.where(lowest_o[best], 0.0, v_o[best])
        out["precision"][lb, fb] = tp[best] / cnt_o[best]
        out["recall"][lb, fb] = tp[best] / P[lb]
    bad = ~((P > 0) & (N > 0))
    for k in ("auroc", "threshold", "precision", "recall"):
        out[k][bad] = np.nan
    out["auroc_err"] = np.where(np.isnan(out["auroc"]), np.nan, 0.0)
    out["f1_err"] = np.where(np.isnan(out["auroc"]), np.nan, 0.0)
    return out
