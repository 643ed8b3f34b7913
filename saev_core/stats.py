"""Per-feature statistics of a trained SAE over activation shards, streamed, written as Parquet.

`compute_stats` runs the SAE encoder over batches of activations (all tokens of an image in one
batch) and keeps only running counts, sums, histograms and a top-k buffer per feature, so memory is
bounded by one batch of codes plus O(d_sae x (n_top + n_patches + n_labels x n_bins)) and the
fixed budgets of `saev_core.label_stats` (exact label scores while the corpus is small; bounded
refinement passes past that) whatever the corpus size. Per feature it measures: frequency over tokens, images, CLS and patches; mean
(when firing) and max; a log-spaced histogram; the top-k exemplar images (ranked by their highest
patch); association with every label at patch and image level (AUROC, best-F1 precision and
recall, mean inside vs outside, each exact or with its proven error bound); where on the patch grid it fires; and its nearest decoder
neighbours. `exemplar_heatmaps` is a second pass over the exemplar images only, for the per-patch
heat maps. `saev_core.stats_tables.write_stats` writes the result as the warehouse's tables.

Shape suffixes: `n` tokens in a batch, `s` = d_sae, `d` = d_model, `i` images in a batch, `t` the
top-k slots, `l` labels, `h` histogram bins (n_bins log bins plus bin 0, which holds exact zeros).
Only the non-zero codes are touched after encoding (SAE codes are sparse), as `(rows, cols, vals)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from saev_core import label_stats

Batches = Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class StatsConfig:
    """The `stats` section of params.yaml."""

    n_top: int = 16
    """Exemplar images kept per feature, ranked by the image's highest token value."""
    batch_images: int = 64
    """Images per batch the caller's per-image loader yields (all tokens of an image together)."""
    n_bins: int = 60
    """Log-spaced histogram bins from hist_min to hist_max (10 per decade), plus one zero bin."""
    hist_min: float = 1e-3
    """Lower edge of the first log bin; smaller positive codes are counted in that bin."""
    hist_max: float = 1e3
    """Upper edge of the last log bin; larger codes are counted in that bin."""
    device: str = "cpu"
    """Torch device that encodes and accumulates: "cpu", "cuda", "cuda:1", "mps" or "auto"."""
    splits: tuple[str, ...] = ("train", "val", "test")
    """Image splits the stats stage streams, each apart (those the shard set lacks are skipped):
    label scores are written per split, frequencies, max_act and exemplars are over all of them."""
    select_split: str = "auto"
    """Split on which a label's best feature is chosen (leaders, interventions); "auto": val, or
    train when the report split is val."""
    report_split: str = "auto"
    """Split on which the chosen feature's scores are reported; must differ from select_split.
    "auto": test when streamed, else the last split of `splits`."""
    controls: bool = True
    """Also score, per label, a copy whose labels are shuffled across the split's images (masks
    move with their image): its best AUROC over all features is what selection alone reaches."""
    control_seed: int = 0
    """Seed of the shuffled-label controls' permutation."""
    tokens: Literal["trained", "all", "patches", "prefix"] = "trained"
    """Tokens to stream: "trained" = the policy the SAE was trained with (its cfg.json)."""
    prefix_apart: bool = False
    """For an SAE trained on patches only: also encode CLS and registers, in a pass of their own,
    so that freq_cls is measured without mixing them into freq, max_act or the exemplars."""
    n_neighbors: int = 8
    """Nearest other features by decoder cosine kept per feature (0: none)."""
    n_heatmaps: int = 8
    """Exemplars per feature (at most n_top) whose per-patch codes are kept for heat maps, from a
    second pass that encodes only the exemplar images; 0: none."""
    assoc_tol: float = 0.002
    """Largest proven bound accepted on a (label, feature)'s AUROC error and best-F1 shortfall
    before a refinement pass re-streams the batches (see saev_core.label_stats)."""
    refine_passes: int = 4
    """Most refinement passes over the batches (0: the first pass only; the bounds are stored)."""
    exact_codes: int = 4_000_000
    """Budget units per level kept to score labels exactly from ranks, with no bound and no
    refinement pass: non-zero codes + items + (item, label) pairs + (code, label of its item)
    pairs. Up to ~160 bytes per unit at the peak of the exact computation (~650 MB per level at
    the default; saev_core.label_stats); a larger corpus falls back to the histograms (0: always)."""

    def __post_init__(self) -> None:
        if self.n_top < 1:
            raise ValueError(f"stats.n_top must be >= 1, got {self.n_top}")
        if self.batch_images < 1:
            raise ValueError(f"stats.batch_images must be >= 1, got {self.batch_images}")
        if self.n_bins < 2:
            raise ValueError(f"stats.n_bins must be >= 2, got {self.n_bins}")
        if not (0 < self.hist_min < self.hist_max and math.isfinite(self.hist_max)):
            raise ValueError(
                f"stats.hist_min/hist_max must satisfy 0 < hist_min < hist_max < inf, "
                f"got {self.hist_min}, {self.hist_max}"
            )
        if not self.device:
            raise ValueError("stats.device must be a torch device string or 'auto', got ''")
        if isinstance(self.splits, str) or not self.splits:
            raise ValueError(f"stats.splits must be a non-empty list of names, got {self.splits!r}")
        if not all(isinstance(s, str) and s for s in self.splits):
            raise ValueError(f"stats.splits must hold non-empty strings, got {self.splits!r}")
        if self.n_neighbors < 0:
            raise ValueError(f"stats.n_neighbors must be >= 0, got {self.n_neighbors}")
        for name in ("select_split", "report_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"stats.{name} must be a split name or 'auto'")
        for name in ("select_split", "report_split"):
            value = getattr(self, name)
            if value != "auto" and value not in self.splits:
                raise ValueError(f"stats.{name} {value!r} is not one of stats.splits {self.splits}")
        if self.select_split == self.report_split != "auto":
            raise ValueError(
                f"stats.select_split and report_split are both {self.select_split!r}: choose a "
                "feature on one split and report it on another"
            )
        if self.tokens not in ("trained", "all", "patches", "prefix"):
            raise ValueError(
                f"stats.tokens must be trained|all|patches|prefix, got {self.tokens!r}"
            )
        if self.n_heatmaps < 0:
            raise ValueError(f"stats.n_heatmaps must be >= 0, got {self.n_heatmaps}")
        if not (0 < self.assoc_tol < 1):
            raise ValueError(f"stats.assoc_tol must be in (0, 1), got {self.assoc_tol}")
        if self.exact_codes < 0:
            raise ValueError(f"stats.exact_codes must be >= 0, got {self.exact_codes}")
        if self.refine_passes < 0:
            raise ValueError(f"stats.refine_passes must be >= 0, got {self.refine_passes}")

    def hist_edges(self) -> np.ndarray:
        """The n_bins + 1 log-spaced edges of the non-zero histogram bins."""
        return np.logspace(math.log10(self.hist_min), math.log10(self.hist_max), self.n_bins + 1)


# FeatureStats fields indexed by label first ([l] or [l, s]): stats_splits slices them (shuffled
# controls) and takes them from one split when merging; a new per-label field belongs here.
LABEL_FIELDS = (
    "auroc",
    "mean_in",
    "mean_out",
    "n_pos",
    "threshold",
    "precision",
    "recall",
    "image_auroc",
    "image_mean_in",
    "image_mean_out",
    "image_threshold",
    "image_precision",
    "image_recall",
    "image_n_pos",
    "auroc_err",
    "image_auroc_err",
    "f1_err",
    "image_f1_err",
    "precision_at_select",
    "recall_at_select",
    "image_precision_at_select",
    "image_recall_at_select",
)


@dataclass
class FeatureStats:
    """Everything `compute_stats` measured, as numpy arrays indexed by feature (and label)."""

    run: str
    label_names: tuple[str, ...]
    # [n_bins + 1] log-spaced edges; hist bin 0 = exact zeros, bin b >= 1 = [edge b-1, edge b)
    hist_edges: np.ndarray
    n_prefix_tokens: int
    n_tokens: int
    n_images: int
    n_cls: int  # CLS tokens seen (0 when the backbone has none)
    n_patches: int  # patch tokens seen
    n_fires: np.ndarray  # [s] tokens where the feature is > 0
    n_fires_images: np.ndarray  # [s] images where it is > 0 on any token
    n_fires_cls: np.ndarray  # [s]
    n_fires_patches: np.ndarray  # [s]
    sum_act: np.ndarray  # [s] sum of the codes (zeros add nothing)
    max_act: np.ndarray  # [s]
    hist: np.ndarray  # [s, h] counts over all tokens
    top_value: np.ndarray  # [s, t] images by their highest patch code, best first; -1 = empty
    top_image: np.ndarray  # [s, t]
    top_token: np.ndarray  # [s, t] the patch token where that image reaches its max
    auroc: np.ndarray  # [l, s] patch-level AUROC, NaN when a class is empty
    mean_in: np.ndarray  # [l, s] mean code on patches carrying the label
    mean_out: np.ndarray  # [l, s] mean code on the other patches
    n_pos: np.ndarray  # [l] patches carrying the label
    # best threshold by F1 ("code >= threshold"; threshold 0 means "code > 0"), patch level
    threshold: np.ndarray  # [l, s] NaN when no threshold finds a positive
    precision: np.ndarray  # [l, s]
    recall: np.ndarray  # [l, s]
    # the same at image level, where an image's score is its highest patch code
    image_auroc: np.ndarray  # [l, s]
    image_mean_in: np.ndarray  # [l, s]
    image_mean_out: np.ndarray  # [l, s]
    image_threshold: np.ndarray  # [l, s]
    image_precision: np.ndarray  # [l, s]
    image_recall: np.ndarray  # [l, s]
    image_n_pos: np.ndarray  # [l] images carrying the label
    grid: tuple[int, int]  # patch grid (rows, cols); patch p sits at (p // cols, p % cols)
    spatial: np.ndarray  # [s, rows * cols] firing count per patch position
    neighbor: np.ndarray  # [s, m] nearest other features by decoder cosine, best first
    neighbor_cos: np.ndarray  # [s, m]
    # [s, t_h, rows * cols] codes on every patch of the first t_h exemplars (NaN: no exemplar)
    heatmaps: np.ndarray | None = None
    # the split(s) the batches came from ("" = not said); "val+test" for merged splits
    split: str = ""
    # [l] the best AUROC any feature reaches on the label's shuffled-label control (patch and
    # image level, see saev_core.stats_splits); None when no control was scored
    control_auroc: np.ndarray | None = None
    control_image_auroc: np.ndarray | None = None
    # [l] proven bounds on those maxima: the exact best lies within control_auroc +- this
    control_auroc_err: np.ndarray | None = None
    control_image_auroc_err: np.ndarray | None = None
    # [l, s] proven bounds (saev_core.label_stats): |auroc - exact AUROC| <= auroc_err, and the
    # reported threshold's F1 is within f1_err of the best F1 over all thresholds; 0 = exact
    auroc_err: np.ndarray | None = None
    f1_err: np.ndarray | None = None
    image_auroc_err: np.ndarray | None = None
    image_f1_err: np.ndarray | None = None
    refine_passes: int = 0  # passes over the batches after the first, to tighten those bounds
    # [l, s] precision and recall at a fixed threshold per pair chosen elsewhere (the select
    # split's best-F1 `threshold` / `image_threshold`, `compute_stats(thresholds=...)`), exact
    # counts; NaN where no threshold was given, nothing reaches it (precision) or the label has
    # no positives (recall); None when no thresholds were given
    precision_at_select: np.ndarray | None = None
    recall_at_select: np.ndarray | None = None
    image_precision_at_select: np.ndarray | None = None
    image_recall_at_select: np.ndarray | None = None

    @property
    def d_sae(self) -> int:
        return int(self.n_fires.shape[0])

    @property
    def freq(self) -> np.ndarray:
        return self.n_fires / max(self.n_tokens, 1)

    @property
    def freq_images(self) -> np.ndarray:
        return self.n_fires_images / max(self.n_images, 1)

    @property
    def freq_cls(self) -> np.ndarray:
        """NaN for every feature when there was no CLS token."""
        return self.n_fires_cls / self.n_cls if self.n_cls else np.full(self.d_sae, np.nan)

    @property
    def freq_patches(self) -> np.ndarray:
        return (
            self.n_fires_patches / self.n_patches if self.n_patches else np.full(self.d_sae, np.nan)
        )

    @property
    def spatial_summary(self) -> dict[str, np.ndarray]:
        """Where each feature fires over the patch grid: centroid, spread and entropy.

        `spatial_entropy` is the Shannon entropy of the firing positions divided by log(#positions):
        0 when it always fires at one position, 1 when evenly everywhere; `spatial_std` is the
        root-mean-square distance (in patches) of its firing positions from their centroid.
        """
        rows, cols = self.grid
        counts = self.spatial.astype(np.float64)
        total = counts.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            prob = counts / total[:, None]
            r = np.arange(rows * cols) // cols
            c = np.arange(rows * cols) % cols
            row_mean, col_mean = prob @ r, prob @ c
            var = prob @ (r**2) - row_mean**2 + prob @ (c**2) - col_mean**2
            plogp = np.where(prob > 0, prob * np.log(np.where(prob > 0, prob, 1)), 0.0)
            n_pos = rows * cols
            entropy = -plogp.sum(1) / math.log(n_pos) if n_pos > 1 else np.zeros(len(counts))
        none = total == 0
        nan = np.nan
        return {
            "centroid_row": np.where(none, nan, row_mean),
            "centroid_col": np.where(none, nan, col_mean),
            "spatial_std": np.where(none, nan, np.sqrt(np.maximum(var, 0))),
            "spatial_entropy": np.where(none, nan, entropy),
        }

    @property
    def mean_act(self) -> np.ndarray:
        """Mean code over the tokens where the feature fires; NaN for dead features."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_fires > 0, self.sum_act / self.n_fires, np.nan)


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

    Label association (`saev_core.label_stats`) is exact from ranks while each level's non-zero
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
        label_stats.Refiner(lv, acc.n_labels, acc.s, cfg.assoc_tol, acc.device, acc.fdtype)
        for lv in acc.levels
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


class _PatchLabels:
    """The long (image_id, token, label) table, sorted for vectorised look-ups per batch."""

    def __init__(
        self,
        table: pd.DataFrame | pa.Table | None,
        label_names: Sequence[str] | None,
        n_prefix_tokens: int,
    ) -> None:
        if table is None:
            table = pd.DataFrame({"image_id": [], "token": [], "label": []})
        if isinstance(table, pa.Table):
            table = table.to_pandas()
        missing = {"image_id", "token", "label"} - set(table.columns)
        if missing:
            raise ValueError(
                f"patch_labels lacks column(s) {sorted(missing)}; has {list(table.columns)}"
            )
        if label_names is None:
            label_names = sorted(table["label"].dropna().astype(str).unique())
        names = tuple(str(n) for n in label_names)
        if len(set(names)) != len(names):
            raise ValueError(f"label_names has duplicates: {list(names)}")
        self.names = names
        codes = pd.Categorical(table["label"], categories=list(names)).codes.astype(np.int64)
        keep = codes >= 0
        image_id = table["image_id"].to_numpy(dtype=np.int64)[keep]
        token = table["token"].to_numpy(dtype=np.int64)[keep]
        codes = codes[keep]
        if len(token) and token.min() < n_prefix_tokens:
            bad = int(token.min())
            raise ValueError(
                f"patch_labels has token {bad}, but tokens below n_prefix_tokens={n_prefix_tokens} "
                "are CLS/registers and carry no patch label"
            )
        self.stride = int(token.max()) + 1 if len(token) else 1
        if len(image_id) and np.abs(image_id).max() >= (2**62) // self.stride:
            raise ValueError(f"image_id {np.abs(image_id).max()} too large to index patch labels")
        keys = image_id * self.stride + token
        # one row per (patch, label) even if the table repeats one, so n_pos counts patches
        keys, codes = _unique_pairs(keys, codes)
        self.keys, self.codes = keys, codes

    def lookup(self, image_id: np.ndarray, token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in batch, label code) for every labelled token of a batch, sorted by row."""
        n = len(image_id)
        if len(self.keys) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ok = token < self.stride
        keys_n = np.where(ok, image_id * self.stride + np.minimum(token, self.stride - 1), -1)
        lo = np.searchsorted(self.keys, keys_n, side="left")
        hi = np.searchsorted(self.keys, keys_n, side="right")
        counts = np.where(ok, hi - lo, 0)
        rows = np.repeat(np.arange(n), counts)
        within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self.codes[lo[rows] + within]


class _ImageLabels:
    """Image-level labels as sorted (image_id, label code) pairs, for look-ups per batch."""

    def __init__(self, table: pd.DataFrame | pa.Table | None, patch: _PatchLabels) -> None:
        if table is None:
            # an image carries every label one of its patches carries
            ids, codes = patch.keys // patch.stride, patch.codes
        else:
            if isinstance(table, pa.Table):
                table = table.to_pandas()
            missing = {"image_id", "label"} - set(table.columns)
            if missing:
                raise ValueError(
                    f"image_labels lacks column(s) {sorted(missing)}; has {list(table.columns)}"
                )
            codes = pd.Categorical(table["label"], categories=list(patch.names)).codes
            keep = codes >= 0
            ids = table["image_id"].to_numpy(dtype=np.int64)[keep]
            codes = codes.astype(np.int64)[keep]
        self.ids, self.codes = _unique_pairs(ids, codes)

    def lookup(self, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into `uniq`, label code) for every label of the batch's images, by index."""
        lo = np.searchsorted(self.ids, uniq, side="left")
        hi = np.searchsorted(self.ids, uniq, side="right")
        counts = hi - lo
        idx = np.repeat(np.arange(len(uniq)), counts)
        within = np.arange(len(idx)) - np.repeat(np.cumsum(counts) - counts, counts)
        return idx, self.codes[lo[idx] + within]


def _unique_pairs(keys: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((codes, keys))
    keys, codes = keys[order], codes[order]
    if len(keys) > 1:
        new = np.ones(len(keys), bool)
        new[1:] = (keys[1:] != keys[:-1]) | (codes[1:] != codes[:-1])
        keys, codes = keys[new], codes[new]
    return keys, codes


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
        # the range is where refinement splits it (saev_core.label_stats)
        inf = {"dtype": torch.float32, **z}
        self.patch_min_sh = torch.full((s, h), math.inf, **inf)
        self.patch_max_sh = torch.full((s, h), -math.inf, **inf)
        self.img_min_sh = torch.full((s, h), math.inf, **inf)
        self.img_max_sh = torch.full((s, h), -math.inf, **inf)
        # every non-zero code while the corpus is small enough: exact association from ranks
        self.exact_patch = label_stats.ExactBuffer(cfg.exact_codes)
        self.exact_image = label_stats.ExactBuffer(cfg.exact_codes)
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
        # label statistics: exact from the buffered codes while they fit (saev_core.label_stats);
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
            label_stats.associate(
                self.pos_hist_lsh, self.sum_in_ls, cpu(self.n_pos), patch_hist, self.sum_patch,
                self.patch_min_sh, self.patch_max_sh, self.edges, tol,
                self.exact_patch.level(self.n_patches, cpu(self.n_pos), self.n_labels, self.s),
            ),
            label_stats.associate(
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
