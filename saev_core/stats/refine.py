"""`Refiner`: the refinement passes of the histogram route at one level (patches or images).

Where a (label, feature) pair's proven bound exceeds `tol` after the first pass, each further pass
splits the cells carrying most of the bound into log-spaced children and counts the feature's
codes in them again; `plan` picks the cells, `update` counts a batch, `absorb` folds the counts
into the level. The method and its bounds are described in `saev_core.stats.assoc`.
"""

from __future__ import annotations

import numpy as np
import torch

from saev_core.stats.assoc import (
    _KEYS,
    MAX_CHILDREN,
    MAX_SPLITS,
    N_CHILDREN,
    Level,
    _Cells,
    _table_metrics,
)


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
