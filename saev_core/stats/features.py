"""`FeatureStats`: the per-feature statistics of one stats run, as `compute_stats` returns them
and `saev_core.stats.tables.write_stats` writes them.

Shape suffixes as in `saev_core.stats.compute`: `s` = d_sae, `l` labels, `t` top-k slots, `h`
histogram bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
    # image level, see saev_core.stats.splits); None when no control was scored
    control_auroc: np.ndarray | None = None
    control_image_auroc: np.ndarray | None = None
    # [l] proven bounds on those maxima: the exact best lies within control_auroc +- this
    control_auroc_err: np.ndarray | None = None
    control_image_auroc_err: np.ndarray | None = None
    # [l, s] proven bounds (saev_core.stats.assoc): |auroc - exact AUROC| <= auroc_err, and the
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
