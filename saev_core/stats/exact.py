"""The exact route of label association: `ExactBuffer` keeps a level's non-zero codes while they
fit the `StatsConfig.exact_codes` budget, and `exact_level` computes AUROC from mid-ranks and the
best-F1 threshold from them.

The budget's units, the memory it costs (~160 bytes per unit at the peak of `exact_level`) and
when the histogram route takes over are described in the docstring of `saev_core.stats.assoc`.
"""

from __future__ import annotations

import numpy as np
import torch

from saev_core.stats.assoc import _KEYS


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
