"""`_Accumulator`: the state of one streamed stats pass (counts, sums, histograms, top-k buffers,
label counts, spatial counts), kept on the encoding device and turned into a `FeatureStats`.

`compute_stats` (`saev_core.stats.compute`) feeds it every batch's non-zero codes (`update`) and
calls `finish` at the end; label association is exact from the buffered codes while they fit
(`saev_core.stats.exact.ExactBuffer`), else from the histograms (`saev_core.stats.assoc`).

Over 400 lines because it is one class holding one streaming pass's state: every counter
`update` adds to is read back by `finish`, so cutting it would split that state across modules.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from saev_core.stats.assoc import associate
from saev_core.stats.config import StatsConfig
from saev_core.stats.exact import ExactBuffer
from saev_core.stats.features import FeatureStats


class _Accumulator:
    """Running per-feature counts, sums, histograms and top-k buffers, kept on `device`."""

    def __init__(
        self,
        d_sae: int,
        n_labels: int,
        n_prefix_tokens: int,
        cfg: StatsConfig,
        device: torch.device,
        patch_grid: tuple[int, int] | None = None,
    ) -> None:
        s, h, t = d_sae, cfg.n_bins + 1, cfg.n_top
        self.cfg = cfg
        if patch_grid is not None and (len(patch_grid) != 2 or min(patch_grid) < 1):
            raise ValueError(f"patch_grid must be (rows, cols) >= 1, got {patch_grid}")
        self.patch_grid = tuple(int(x) for x in patch_grid) if patch_grid else None
        self.s, self.h, self.n_labels = s, h, n_labels
        self.n_prefix_tokens = n_prefix_tokens
        self.has_cls = n_prefix_tokens >= 1  # token 0 is CLS; compute_stats sets it from has_cls
        self.at: dict | None = None  # fixed thresholds to count at (set_thresholds)
        self.device = device
        # MPS has no float64; elsewhere sums of millions of codes keep full precision
        self.fdtype = torch.float32 if device.type == "mps" else torch.float64
        self.edges = cfg.hist_edges()
        self.inner_edges = torch.tensor(self.edges[1:-1], dtype=self.fdtype, device=device)
        self.n_tokens = self.n_cls = self.n_patches = 0
        z = {"device": device}
        self.n_fires = torch.zeros(s, dtype=torch.int64, **z)
        self.n_fires_images = torch.zeros(s, dtype=torch.int64, **z)
        self.n_fires_cls = torch.zeros(s, dtype=torch.int64, **z)
        self.n_fires_patches = torch.zeros(s, dtype=torch.int64, **z)
        self.sum_act = torch.zeros(s, dtype=self.fdtype, **z)
        self.sum_patch = torch.zeros(s, dtype=self.fdtype, **z)
        self.max_act = torch.zeros(s, dtype=torch.float32, **z)
        # bin 0 (zeros) of each histogram is filled in at the end from the counts
        self.hist_sh = torch.zeros(s, h, dtype=torch.int64, **z)
        self.patch_hist_sh = torch.zeros(s, h, dtype=torch.int64, **z)
        self.pos_hist_lsh = torch.zeros(n_labels, s, h, dtype=torch.int64, **z)
        self.sum_in_ls = torch.zeros(n_labels, s, dtype=self.fdtype, **z)
        self.n_pos = torch.zeros(n_labels, dtype=torch.int64, **z)
        # image level: each image's highest patch code, as histograms like the patch ones
        self.img_hist_sh = torch.zeros(s, h, dtype=torch.int64, **z)
        self.img_pos_hist_lsh = torch.zeros(n_labels, s, h, dtype=torch.int64, **z)
        # smallest and largest code per (feature, bin): a one-value bin is an exact tie, and
        # the range is where refinement splits it (saev_core.stats.assoc)
        inf = {"dtype": torch.float32, **z}
        self.patch_min_sh = torch.full((s, h), math.inf, **inf)
        self.patch_max_sh = torch.full((s, h), -math.inf, **inf)
        self.img_min_sh = torch.full((s, h), math.inf, **inf)
        self.img_max_sh = torch.full((s, h), -math.inf, **inf)
        # every non-zero code while the corpus is small enough: exact association from ranks
        self.exact_patch = ExactBuffer(cfg.exact_codes)
        self.exact_image = ExactBuffer(cfg.exact_codes)
        self.sum_img = torch.zeros(s, dtype=self.fdtype, **z)
        self.sum_img_in_ls = torch.zeros(n_labels, s, dtype=self.fdtype, **z)
        self.n_pos_img = torch.zeros(n_labels, dtype=torch.int64, **z)
        # firing counts per patch position, grown when a later batch has more patches
        n_p = self.patch_grid[0] * self.patch_grid[1] if self.patch_grid else 0
        self.spatial_sp = torch.zeros(s, n_p, dtype=torch.int64, **z)
        # top-k buffers are [t, s] so that merging is a sort along dim 0
        self.top_value_ts = torch.full((t, s), -1.0, dtype=torch.float32, **z)
        self.top_image_ts = torch.full((t, s), -1, dtype=torch.int64, **z)
        self.top_token_ts = torch.full((t, s), -1, dtype=torch.int64, **z)

    def set_thresholds(self, thresholds: dict[str, np.ndarray] | None) -> None:
        """Fixed per-pair thresholds to count precision and recall at (compute_stats)."""
        self.at = None
        if thresholds is None:
            return
        unknown = set(thresholds) - {"threshold", "image_threshold"}
        if unknown:
            raise ValueError(f"thresholds: unknown key(s) {sorted(unknown)}")
        shape = (self.n_labels, self.s)
        self.at = {}
        for level, key in (("patch", "threshold"), ("image", "image_threshold")):
            t = np.asarray(thresholds.get(key, np.full(shape, np.nan)), dtype=np.float64)
            if t.shape != shape:
                raise ValueError(f"thresholds[{key!r}] has shape {t.shape}, expected {shape}")
            if (t < 0).any():
                raise ValueError(f"thresholds[{key!r}] must be >= 0 or NaN")
            z = {"dtype": torch.int64, "device": self.device}
            self.at[level] = {
                "given": ~np.isnan(t),
                # NaN: no cut, nothing counted (+inf is reached by no code)
                "t": torch.from_numpy(np.where(np.isnan(t), np.inf, t)).to(self.device),
                "labels": torch.from_numpy(np.flatnonzero(~np.isnan(t).all(1))).to(self.device),
                "all": torch.zeros(shape, **z),
                "pos": torch.zeros(shape, **z),
            }

    def _count_at(
        self,
        level: str,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals32: torch.Tensor,
        n_rows: int,
        label_rows: np.ndarray,
        label_codes: np.ndarray,
    ) -> None:
        """Count the codes (all, and those of the label's positives) that reach each pair's fixed
        threshold: exact comparisons of the float32 codes with the float64 thresholds."""
        at = self.at[level]
        t_ls, vals, ls = at["t"], vals32.double(), at["labels"]
        if len(ls) == 0:
            return
        t_use = t_ls[ls]  # only labels with a threshold (the controls have none)
        step = max(1, (1 << 22) // len(ls))
        for lo in range(0, len(cols), step):
            c, v = cols[lo : lo + step], vals[lo : lo + step]
            ge_lc = (v[None, :] >= t_use[:, c]).long()  # codes > 0, so t = 0 is "code > 0"
            slot = (ls[:, None] * self.s + c[None, :]).reshape(-1)
            at["all"].view(-1).index_add_(0, slot, ge_lc.reshape(-1))
        if len(label_rows) == 0 or len(rows) == 0:
            return
        dev = self.device
        lr = torch.from_numpy(label_rows).to(dev)
        lc = torch.from_numpy(label_codes).to(dev)
        counts_n = torch.bincount(lr, minlength=n_rows)
        starts_n = torch.cumsum(counts_n, 0) - counts_n
        cnt = counts_n[rows]
        entry = torch.repeat_interleave(torch.arange(len(rows), device=dev), cnt)
        within = torch.arange(len(entry), device=dev) - (torch.cumsum(cnt, 0) - cnt)[entry]
        label = lc[starts_n[rows[entry]] + within]
        col = cols[entry]
        ge = (vals[entry] >= t_ls[label, col]).long()
        at["pos"].view(-1).index_add_(0, label * self.s + col, ge)

    def _at_select(self, level: str, n_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) [l, s] at the fixed thresholds of one level."""
        at = self.at[level]
        pred = at["all"].cpu().numpy().astype(np.float64)
        tp = at["pos"].cpu().numpy().astype(np.float64)
        p = np.asarray(n_pos, dtype=np.float64)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(at["given"] & (pred > 0), tp / pred, np.nan)
            recall = np.where(at["given"] & (p > 0), tp / p, np.nan)
        return precision, recall

    def update(
        self,
        code: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        token: np.ndarray,
        uniq: np.ndarray,
        inv: np.ndarray,
        label_rows: np.ndarray,
        label_codes: np.ndarray,
        image_label_pairs: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Add one batch: `code` is its positive codes (rows, cols, vals), rows into `token`."""
        dev, s, h = self.device, self.s, self.h
        n = len(token)
        token_n = torch.from_numpy(token).to(dev)
        is_cls_n = (token_n == 0) if self.has_cls else torch.zeros_like(token_n, dtype=bool)
        is_patch_n = token_n >= self.n_prefix_tokens
        self.n_tokens += n
        self.n_cls += int(is_cls_n.sum())
        self.n_patches += int(is_patch_n.sum())

        rows, cols, vals32 = code[0], code[1], code[2].float()
        vals = vals32.to(self.fdtype)
        bins = 1 + torch.bucketize(vals, self.inner_edges, right=True)
        self.n_fires += torch.bincount(cols, minlength=s)
        self.n_fires_cls += torch.bincount(cols[is_cls_n[rows]], minlength=s)
        self.sum_act.index_add_(0, cols, vals)
        self.hist_sh.view(-1).index_add_(0, cols * h + bins, torch.ones_like(cols))
        self.max_act.scatter_reduce_(0, cols, vals32, "amax")
        n_img = len(uniq)
        img = torch.from_numpy(inv).to(dev)[rows]
        fired_is = torch.zeros(n_img * s, dtype=torch.bool, device=dev)
        fired_is[img * s + cols] = True
        self.n_fires_images += fired_is.view(n_img, s).sum(0)

        # the non-zero codes on patch tokens (one mask, then plain gathers)
        p = torch.nonzero(is_patch_n[rows]).squeeze(1)
        rows, cols, vals32, vals, bins, img = (x[p] for x in (rows, cols, vals32, vals, bins, img))
        self.n_fires_patches += torch.bincount(cols, minlength=s)
        self.sum_patch.index_add_(0, cols, vals)
        self.patch_hist_sh.view(-1).index_add_(0, cols * h + bins, torch.ones_like(cols))
        if len(rows):
            pos = token_n[rows] - self.n_prefix_tokens
            n_p = self.spatial_sp.shape[1]
            need = int(pos.max()) + 1
            if need > n_p:
                if self.patch_grid is not None:
                    raise ValueError(f"patch {need - 1} lies outside patch_grid {self.patch_grid}")
                self.spatial_sp = torch.nn.functional.pad(self.spatial_sp, (0, need - n_p))
                n_p = need
            self.spatial_sp.view(-1).index_add_(0, cols * n_p + pos, torch.ones_like(cols))

        # exemplars: each image's max over its patch tokens (the paper ranks images by their
        # highest patch and shows patches as a heat map)
        slot = img * s + cols
        img_max_is = torch.zeros(n_img * s, dtype=torch.float32, device=dev)
        img_max_is.scatter_reduce_(0, slot, vals32, "amax")
        # the first row (lowest index) reaching the image's max gives the exemplar's token
        at_max = torch.nonzero(vals32 == img_max_is[slot]).squeeze(1)
        first_row = torch.full((n_img * s,), n, dtype=torch.int64, device=dev)
        first_row.scatter_reduce_(0, slot[at_max], rows[at_max], "amin")
        img_max_is = img_max_is.view(n_img, s)
        token_pad = torch.cat([token_n, token_n.new_full((1,), -1)])
        cand_token = token_pad[first_row.view(n_img, s)]
        cand_value = torch.where(img_max_is > 0, img_max_is, -1.0)
        cand_image = torch.from_numpy(uniq).to(dev)[:, None].expand(n_img, s)
        self._merge_top(cand_value, cand_image, cand_token)

        # image level: the non-zero image maxima, binned like the codes
        nz = torch.nonzero(img_max_is.view(-1) > 0).squeeze(1)
        img_rows, img_cols = nz // s, nz % s
        img_vals32 = img_max_is.view(-1)[nz]
        img_vals = img_vals32.to(self.fdtype)
        img_bins = 1 + torch.bucketize(img_vals, self.inner_edges, right=True)
        self.img_hist_sh.view(-1).index_add_(0, img_cols * h + img_bins, torch.ones_like(img_cols))
        self.sum_img.index_add_(0, img_cols, img_vals)

        if not self.n_labels:
            return
        # label statistics: exact from the buffered codes while they fit (saev_core.stats.assoc);
        # the label histograms are built only once a level's buffer overflows (its batches so
        # far replayed into them)
        levels = (
            ("patch", (rows, cols, vals32), n, (label_rows, label_codes), self.n_pos),
            ("image", (img_rows, img_cols, img_vals32), n_img, image_label_pairs, self.n_pos_img),
        )
        for level, entries, n_rows, (lab_rows, lab_codes), n_pos in levels:
            n_pos += torch.bincount(torch.from_numpy(lab_codes).to(dev), minlength=self.n_labels)
            if self.at is not None:
                self._count_at(level, *entries, n_rows, lab_rows, lab_codes)
            buf = self.exact_patch if level == "patch" else self.exact_image
            replay = buf.add(n_rows, *entries, lab_rows, lab_codes)
            if replay is None:
                continue
            for part in replay:
                self._label_hists(
                    level, *(torch.from_numpy(x).to(dev) for x in part[:3]), *part[3:]
                )
            self._label_hists(level, *entries, n_rows, lab_rows, lab_codes)

    def _label_hists(
        self,
        level: str,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals32: torch.Tensor,
        n_rows: int,
        label_rows: np.ndarray,
        label_codes: np.ndarray,
    ) -> None:
        """Add non-zero codes to one level's label histograms and per-bin min / max."""
        h = self.h
        vals = vals32.to(self.fdtype)
        bins = 1 + torch.bucketize(vals, self.inner_edges, right=True)
        if level == "patch":
            lo, hi, into = self.patch_min_sh, self.patch_max_sh, (self.pos_hist_lsh, self.sum_in_ls)
        else:
            lo, hi = self.img_min_sh, self.img_max_sh
            into = (self.img_pos_hist_lsh, self.sum_img_in_ls)
        lo.view(-1).scatter_reduce_(0, cols * h + bins, vals32, "amin")
        hi.view(-1).scatter_reduce_(0, cols * h + bins, vals32, "amax")
        if len(label_rows):
            self._update_labels((rows, cols, vals, bins), n_rows, label_rows, label_codes, into)

    def _merge_top(self, value: torch.Tensor, image: torch.Tensor, token: torch.Tensor) -> None:
        t = self.top_value_ts.shape[0]
        value = torch.cat([self.top_value_ts, value])
        image = torch.cat([self.top_image_ts, image])
        token = torch.cat([self.top_token_ts, token])
        # rank by value, ties by image id, so the answer does not depend on how batches split
        by_image = torch.argsort(image, dim=0, stable=True)
        value, image, token = (x.gather(0, by_image) for x in (value, image, token))
        by_value = torch.argsort(value, dim=0, descending=True, stable=True)[:t]
        self.top_value_ts = value.gather(0, by_value)
        self.top_image_ts = image.gather(0, by_value)
        self.top_token_ts = token.gather(0, by_value)

    def _update_labels(
        self,
        entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        n: int,
        label_rows: np.ndarray,
        label_codes: np.ndarray,
        into: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Add non-zero `(row, col, val, bin)` entries to the histograms of their rows' labels.

        Rows are tokens (patch level) or images in the batch (image level); `into` is
        `(pos_hist_lsh, sum_in_ls)` of that level.
        """
        rows, cols, vals, bins = entries
        pos_hist_lsh, sum_in_ls = into
        dev, s, h = self.device, self.s, self.h
        label_rows_t = torch.from_numpy(label_rows).to(dev)
        label_codes_t = torch.from_numpy(label_codes).to(dev)
        # label pairs are sorted by row: row r owns pairs starts[r] .. starts[r] + counts[r]
        counts_n = torch.bincount(label_rows_t, minlength=n)
        starts_n = torch.cumsum(counts_n, 0) - counts_n
        # pair every non-zero code with every label of its token
        c = counts_n[rows]
        entry = torch.repeat_interleave(torch.arange(len(rows), device=dev), c)
        offset = torch.cumsum(c, 0) - c
        within = torch.arange(len(entry), device=dev) - offset[entry]
        label = label_codes_t[starts_n[rows[entry]] + within]
        col = cols[entry]
        pos_hist_lsh.view(-1).index_add_(
            0, (label * s + col) * h + bins[entry], torch.ones_like(col)
        )
        sum_in_ls.view(-1).index_add_(0, label * s + col, vals[entry])

    def finish(self, run: str, label_names: tuple[str, ...], n_images: int) -> FeatureStats:
        def cpu(x: torch.Tensor) -> np.ndarray:
            return x.cpu().numpy()

        n_fires, n_fires_patches = cpu(self.n_fires), cpu(self.n_fires_patches)
        hist = cpu(self.hist_sh)
        hist[:, 0] = self.n_tokens - n_fires
        patch_hist = cpu(self.patch_hist_sh)
        patch_hist[:, 0] = self.n_patches - n_fires_patches
        img_hist = cpu(self.img_hist_sh)
        img_hist[:, 0] = n_images - img_hist[:, 1:].sum(1)
        tol = self.cfg.assoc_tol
        # kept for the refinement passes (compute_stats -> _refine)
        self.levels = (
            associate(
                self.pos_hist_lsh, self.sum_in_ls, cpu(self.n_pos), patch_hist, self.sum_patch,
                self.patch_min_sh, self.patch_max_sh, self.edges, tol,
                self.exact_patch.level(self.n_patches, cpu(self.n_pos), self.n_labels, self.s),
            ),
            associate(
                self.img_pos_hist_lsh, self.sum_img_in_ls, cpu(self.n_pos_img), img_hist,
                self.sum_img, self.img_min_sh, self.img_max_sh, self.edges, tol,
                self.exact_image.level(n_images, cpu(self.n_pos_img), self.n_labels, self.s),
            ),
        )  # fmt: skip
        patch, image = (vars(lv) for lv in self.levels)
        at_select = {}
        if self.at is not None:
            for level, prefix, n_pos in (
                ("patch", "", self.n_pos),
                ("image", "image_", self.n_pos_img),
            ):
                prec, rec = self._at_select(level, cpu(n_pos))
                at_select[prefix + "precision_at_select"] = prec
                at_select[prefix + "recall_at_select"] = rec
        spatial = cpu(self.spatial_sp)
        n_p = spatial.shape[1]
        if self.patch_grid is not None:
            grid = self.patch_grid
        else:
            side = math.isqrt(n_p)
            grid = (side, side) if side * side == n_p and n_p else (1, max(n_p, 1))
            if n_p == 0:
                spatial = np.zeros((self.s, 1), np.int64)
        return FeatureStats(
            run=run,
            label_names=label_names,
            hist_edges=self.edges,
            n_prefix_tokens=self.n_prefix_tokens,
            n_tokens=self.n_tokens,
            n_images=n_images,
            n_cls=self.n_cls,
            n_patches=self.n_patches,
            n_fires=n_fires,
            n_fires_images=cpu(self.n_fires_images),
            n_fires_cls=cpu(self.n_fires_cls),
            n_fires_patches=n_fires_patches,
            sum_act=cpu(self.sum_act).astype(np.float64),
            max_act=cpu(self.max_act).astype(np.float64),
            hist=hist,
            top_value=cpu(self.top_value_ts).T.astype(np.float64),
            top_image=cpu(self.top_image_ts).T,
            top_token=cpu(self.top_token_ts).T,
            auroc=patch["auroc"],
            mean_in=patch["mean_in"],
            mean_out=patch["mean_out"],
            n_pos=cpu(self.n_pos),
            threshold=patch["threshold"],
            precision=patch["precision"],
            recall=patch["recall"],
            image_auroc=image["auroc"],
            image_mean_in=image["mean_in"],
            image_mean_out=image["mean_out"],
            image_threshold=image["threshold"],
            image_precision=image["precision"],
            image_recall=image["recall"],
            image_n_pos=cpu(self.n_pos_img),
            auroc_err=patch["auroc_err"],
            f1_err=patch["f1_err"],
            image_auroc_err=image["auroc_err"],
            image_f1_err=image["f1_err"],
            grid=grid,
            spatial=spatial,
            neighbor=np.zeros((self.s, 0), np.int64),
            neighbor_cos=np.zeros((self.s, 0), np.float64),
            **at_select,
        )
