"""Per-feature statistics of a trained SAE over activation shards, streamed: `compute_stats`.

`compute_stats` runs the SAE encoder over batches of activations (all tokens of an image in one
batch) and keeps only running counts, sums, histograms and a top-k buffer per feature
(`saev_core.stats.accumulator._Accumulator`), so memory is bounded by one batch of codes plus
O(d_sae x (n_top + n_patches + n_labels x n_bins)) and the fixed budgets of
`saev_core.stats.assoc` (exact label scores while the corpus is small; bounded refinement passes
past that) whatever the corpus size. Per feature it measures: frequency over tokens, images, CLS
and patches; mean (when firing) and max; a log-spaced histogram; the top-k exemplar images (ranked
by their highest patch); association with every label at patch and image level (AUROC, best-F1
precision and recall, mean inside vs outside, each exact or with its proven error bound); where on
the patch grid it fires; and its nearest decoder neighbours (`decoder_neighbors`).
`exemplar_heatmaps` is a second pass over the exemplar images only, for the per-patch heat maps.
`saev_core.stats.tables.write_stats` writes the result as the warehouse's tables.

Shape suffixes: `n` tokens in a batch, `s` = d_sae, `d` = d_model, `i` images in a batch, `t` the
top-k slots, `l` labels, `h` histogram bins (n_bins log bins plus bin 0, which holds exact zeros).
Only the non-zero codes are touched after encoding (SAE codes are sparse), as `(rows, cols, vals)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from saev_core.stats.accumulator import _Accumulator
from saev_core.stats.config import Batches, StatsConfig
from saev_core.stats.features import FeatureStats
from saev_core.stats.labels import _ImageLabels, _PatchLabels
from saev_core.stats.refine import Refiner


def compute_stats(
    sae: torch.nn.Module,
    batches: Batches | Callable[[], Batches],
    patch_labels: pd.DataFrame | pa.Table | None,
    label_names: Sequence[str] | None,
    n_prefix_tokens: int,
    cfg: StatsConfig,
    run: str,
    progress: bool = True,
    *,
    image_labels: pd.DataFrame | pa.Table | None = None,
    patch_grid: tuple[int, int] | None = None,
    has_cls: bool | None = None,
    thresholds: dict[str, np.ndarray] | None = None,
) -> FeatureStats:
    """Stream `(image_id [n], token [n], acts [n, d_model])` batches through `sae.encode`.

    Every token of an image must arrive in one batch (the per-image loader guarantees it); an
    image seen in two batches raises, as it would corrupt the per-image max and `freq_images`.
    `patch_labels` is a long table (`image_id`, `token`, `label`): one row per patch and concept.
    `label_names` picks and orders the labels to score (None: every label in the table); rows
    with other labels are ignored. Tokens `0 .. n_prefix_tokens-1` are CLS and registers; only
    patch tokens (`token >= n_prefix_tokens`) enter the label statistics and the exemplars (images
    ranked by their highest patch code, as in the paper); frequencies and `max_act` count every
    token the batches hold (the stats stage streams only the tokens the SAE was trained on, see
    `StatsConfig.tokens`), `freq_cls` the CLS token alone. `has_cls` says whether token 0 is CLS
    (the shard manifest's `tokens.has_cls`; None: it is whenever n_prefix_tokens >= 1).

    Label association (`saev_core.stats.assoc`) is exact from ranks while each level's non-zero
    codes fit in `cfg.exact_codes`; past that it comes from histograms with a proven error bound.
    `batches` is an iterable of batches, or a callable returning a fresh iterator over the same
    batches each time: then up to `cfg.refine_passes` further passes, over the few histogram cells
    that carry the bound, bring every AUROC and best-F1 threshold within `cfg.assoc_tol`; with a
    plain iterable the first pass's bounds are reported. Either way `auroc_err` / `f1_err` (and the
    image-level ones) hold each pair's proven bound, and `refine_passes` the passes made.

    Image-level association scores each image by its highest patch code against the image's
    labels: `image_labels` is a long table (`image_id`, `label`); None derives them from
    `patch_labels` (an image carries every label one of its patches carries). Precision and
    recall are reported at the threshold ("code >= t", t > 0) with the best F1.

    `thresholds` (`{"threshold": [l, s], "image_threshold": [l, s]}`, rows in the order of the
    scored labels, NaN = none; typically the select split's best-F1 thresholds) are fixed cuts
    "code >= t" (t = 0: "code > 0"): the first pass also counts, per pair, the items reaching the
    cut and the positives among them, exactly on either route, and reports
    `precision_at_select` / `recall_at_select` (and the image-level ones) at them.

    `patch_grid` (rows, cols) places patch `token - n_prefix_tokens` on the image for the spatial
    statistics; None takes a square grid when the patch count is a square, else one row.
    Each feature's `cfg.n_neighbors` nearest other features by decoder cosine come from
    `sae.W_dec` ([d_sae, d_model]).

    The SAE is moved to `cfg.device` (in place, as `nn.Module.to` does).
    """
    if n_prefix_tokens < 0:
        raise ValueError(f"n_prefix_tokens must be >= 0, got {n_prefix_tokens}")
    if not run:
        raise ValueError("run must be a non-empty name")
    device = _resolve_device(cfg.device)
    d_sae = int(sae.cfg.d_sae)
    d_model = int(sae.W_dec.shape[1])
    sae = sae.to(device)
    if label_names is None:
        label_names = _all_label_names(patch_labels, image_labels)
    labels = _PatchLabels(patch_labels, label_names, n_prefix_tokens)
    img_labels = _ImageLabels(image_labels, labels)
    acc = _Accumulator(d_sae, len(labels.names), n_prefix_tokens, cfg, device, patch_grid)
    acc.set_thresholds(thresholds)
    # whether token 0 is CLS is the manifest's to say (`tokens.has_cls`); None: any prefix
    acc.has_cls = n_prefix_tokens >= 1 and (has_cls is None or bool(has_cls))
    seen: set[int] = set()
    with torch.inference_mode():
        first = batches() if callable(batches) else batches
        for batch in tqdm(first, desc=f"stats {run}", unit="batch", disable=not progress):
            image_id, token, acts = _check_batch(batch, d_model)
            if len(image_id) == 0:
                continue
            uniq, inv = np.unique(image_id, return_inverse=True)
            again = seen.intersection(uniq.tolist())
            if again:
                raise ValueError(
                    f"image(s) {sorted(again)[:5]} appear in more than one batch; every token of "
                    "an image must arrive in the same batch (use the per-image loader)"
                )
            seen.update(uniq.tolist())
            x = torch.from_numpy(acts).to(device, torch.float32)
            rows, cols, vals = _positive_codes(sae, x, d_sae)
            label_rows, label_codes = labels.lookup(image_id, token)
            acc.update(
                (rows, cols, vals),
                token,
                uniq,
                inv,
                label_rows,
                label_codes,
                img_labels.lookup(uniq),
            )
        neighbor, neighbor_cos = decoder_neighbors(sae.W_dec, cfg.n_neighbors)
    if acc.n_tokens == 0:
        raise ValueError(f"compute_stats({run!r}): the batches held no activations")
    stats = acc.finish(run, labels.names, n_images=len(seen))
    stats.neighbor, stats.neighbor_cos = neighbor, neighbor_cos
    if callable(batches):
        _refine(sae, batches, acc, labels, img_labels, stats, cfg, progress)
    return stats


def _refine(
    sae: Any,
    batches: Callable[[], Batches],
    acc: _Accumulator,
    labels: _PatchLabels,
    img_labels: _ImageLabels,
    stats: FeatureStats,
    cfg: StatsConfig,
    progress: bool,
) -> None:
    """Passes over the batches that count only the cells of the (label, feature) pairs whose
    bound exceeds cfg.assoc_tol, until none does or cfg.refine_passes are spent."""
    refiners = [
        Refiner(lv, acc.n_labels, acc.s, cfg.assoc_tol, acc.device, acc.fdtype) for lv in acc.levels
    ]
    d_model, s, dev = int(sae.W_dec.shape[1]), acc.s, acc.device
    for n_pass in range(1, cfg.refine_passes + 1):
        if not any([r.plan() for r in refiners]):
            break
        patch_ref, image_ref = refiners
        img_mask = image_ref.feature_mask()
        with torch.inference_mode():
            desc = f"refine {stats.run} {n_pass}"
            for batch in tqdm(batches(), desc=desc, unit="batch", disable=not progress):
                image_id, token, acts = _check_batch(batch, d_model)
                if len(image_id) == 0:
                    continue
                uniq, inv = np.unique(image_id, return_inverse=True)
                x = torch.from_numpy(acts).to(dev, torch.float32)
                rows, cols, vals = _positive_codes(sae, x, s)
                vals = vals.float()
                # the same patch codes and image maxima as the first pass (_Accumulator.update)
                token_n = torch.from_numpy(token).to(dev)
                p = torch.nonzero(token_n[rows] >= acc.n_prefix_tokens).squeeze(1)
                rows, cols, vals = rows[p], cols[p], vals[p]
                patch_ref.update(rows, cols, vals, len(token), *labels.lookup(image_id, token))
                if img_mask is None:
                    continue
                q = torch.nonzero(img_mask[cols]).squeeze(1)
                img = torch.from_numpy(inv).to(dev)[rows[q]]
                key, slot = torch.unique(img * s + cols[q], return_inverse=True)
                img_max = torch.zeros(len(key), dtype=torch.float32, device=dev)
                img_max.scatter_reduce_(0, slot, vals[q], "amax")
                image_ref.update(key // s, key % s, img_max, len(uniq), *img_labels.lookup(uniq))
        for r in refiners:
            if r.plan_ is not None:
                r.absorb()
        stats.refine_passes = n_pass
    for lv, prefix in zip(acc.levels, ("", "image_"), strict=True):
        for k in ("auroc", "auroc_err", "threshold", "precision", "recall", "f1_err"):
            setattr(stats, prefix + k, getattr(lv, k))


def decoder_neighbors(
    W_dec_sd: torch.Tensor, n: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's `n` nearest other features by cosine of decoder rows, best first.

    Computed `chunk` rows at a time, so memory is chunk x d_sae whatever d_sae is; a zero row
    has cosine 0 to everything. Among the kept neighbours, ties go to the lower feature index
    (which of several features tied at the cut-off is kept is up to `torch.topk`).
    """
    W = W_dec_sd.detach().float()
    s = W.shape[0]
    n = min(n, s - 1)
    if n <= 0:
        return np.zeros((s, 0), np.int64), np.zeros((s, 0), np.float64)
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx_out = torch.empty(s, n, dtype=torch.int64)
    cos_out = torch.empty(s, n, dtype=torch.float32)
    for lo in range(0, s, chunk):
        hi = min(lo + chunk, s)
        cos = unit[lo:hi] @ unit.T
        cos[torch.arange(hi - lo), torch.arange(lo, hi)] = -math.inf  # not its own neighbour
        # top-n (a full sort of d_sae columns costs ~10x more), then order those by cosine
        # and index, so that equal cosines list the lower feature first
        val, idx = torch.topk(cos, n, dim=1)
        by_idx = torch.argsort(idx, dim=1)
        val, idx = val.gather(1, by_idx), idx.gather(1, by_idx)
        by_val = torch.argsort(val, dim=1, descending=True, stable=True)
        idx_out[lo:hi] = idx.gather(1, by_val).cpu()
        cos_out[lo:hi] = val.gather(1, by_val).cpu()
    return idx_out.numpy(), cos_out.numpy().astype(np.float64)


def exemplar_heatmaps(
    sae: torch.nn.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    stats: FeatureStats,
    n_heatmaps: int,
    device: str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """The feature's code on every patch of its first `n_heatmaps` exemplar images.

    A second pass over the same batches that encodes only the images some feature keeps as an
    exemplar. Returns `[d_sae, n_heatmaps, n_patches]` float32, NaN where a feature has fewer
    exemplars (or a patch was not recorded). Sets `stats.heatmaps` too.
    """
    dev = _resolve_device(device)
    s, t = stats.d_sae, min(n_heatmaps, stats.top_image.shape[1])
    n_patches = stats.grid[0] * stats.grid[1]
    out = np.full((s, t, n_patches), np.nan, np.float32)
    if t == 0:
        stats.heatmaps = out
        return out
    feat, rank = np.nonzero(stats.top_value[:, :t] > 0)
    pair_image = stats.top_image[feat, rank]
    order = np.argsort(pair_image, kind="stable")
    feat, rank, pair_image = feat[order], rank[order], pair_image[order]
    wanted = np.unique(pair_image)
    d_model = int(sae.W_dec.shape[1])
    sae = sae.to(dev)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=f"heatmaps {stats.run}", disable=not progress):
            image_id, token, acts = _check_batch(batch, d_model)
            keep = np.isin(image_id, wanted) & (token >= stats.n_prefix_tokens)
            keep &= token - stats.n_prefix_tokens < n_patches
            if not keep.any():
                continue
            image_id, token, acts = image_id[keep], token[keep], acts[keep]
            f_ns = sae.encode(torch.from_numpy(acts).to(dev, torch.float32)).float().cpu()
            uniq, inv = np.unique(image_id, return_inverse=True)
            # row of every (image in batch, patch position); -1 where a patch is missing
            row_ip = np.full((len(uniq), n_patches), -1, np.int64)
            row_ip[inv, token - stats.n_prefix_tokens] = np.arange(len(image_id))
            lo = np.searchsorted(pair_image, uniq, side="left")
            hi = np.searchsorted(pair_image, uniq, side="right")
            sel = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)])
            if len(sel) == 0:
                continue
            local = np.searchsorted(uniq, pair_image[sel])
            rows = row_ip[local]  # [pairs, patches]
            vals = f_ns.numpy()[np.maximum(rows, 0), feat[sel][:, None]]
            out[feat[sel], rank[sel]] = np.where(rows >= 0, vals, np.nan)
    stats.heatmaps = out
    return out


def _positive_codes(sae: Any, x_nd: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, ...]:
    """(rows, cols, vals) of the positive codes, row-major: `sae.encode_sparse` where it exists."""
    if hasattr(sae, "encode_sparse"):
        return sae.encode_sparse(x_nd)
    f_ns = sae.encode(x_nd)
    if tuple(f_ns.shape) != (x_nd.shape[0], d_sae):
        raise ValueError(
            f"sae.encode returned shape {tuple(f_ns.shape)}, expected {(x_nd.shape[0], d_sae)}"
        )
    rows, cols = torch.nonzero(f_ns > 0, as_tuple=True)
    return rows, cols, f_ns[rows, cols]


def _all_label_names(patch_labels: Any, image_labels: Any) -> list[str]:
    names: set[str] = set()
    for table in (patch_labels, image_labels):
        if table is None or "label" not in (
            table.column_names if isinstance(table, pa.Table) else table.columns
        ):
            continue  # _PatchLabels / _ImageLabels name the missing column
        col = table.column("label").to_pylist() if isinstance(table, pa.Table) else table["label"]
        names.update(str(x) for x in col if x is not None and x == x)
    return sorted(names)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"stats.device: not a torch device: {name!r}") from e


def _check_batch(batch: Any, d_model: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        image_id, token, acts = batch
    except (TypeError, ValueError) as e:
        raise ValueError("each batch must be a tuple (image_id, token, acts)") from e
    image_id = np.asarray(image_id, dtype=np.int64)
    token = np.asarray(token, dtype=np.int64)
    acts = np.asarray(acts, dtype=np.float32)
    if acts.ndim != 2 or acts.shape[1] != d_model:
        raise ValueError(
            f"acts must have shape [n, {d_model}] (d_model of the SAE), got {acts.shape}"
        )
    if image_id.shape != (len(acts),) or token.shape != (len(acts),):
        raise ValueError(
            f"image_id {image_id.shape} and token {token.shape} must be 1-D of length {len(acts)}"
        )
    if len(token) and token.min() < 0:
        raise ValueError(f"token indices must be >= 0, got {token.min()}")
    return image_id, token, acts
