"""The `stats` section's options (`StatsConfig`), the batches `compute_stats` reads, and the
per-label fields of `FeatureStats`.

`Batches` is what the per-image loader yields: `(image_id [n], token [n], acts [n, d_model])`
for all tokens of `StatsConfig.batch_images` images at a time. `LABEL_FIELDS` lists the
`FeatureStats` fields indexed by label first, which `saev_core.stats.splits` slices and merges.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

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
    before a refinement pass re-streams the batches (see saev_core.stats.assoc)."""
    refine_passes: int = 4
    """Most refinement passes over the batches (0: the first pass only; the bounds are stored)."""
    exact_codes: int = 4_000_000
    """Budget units per level kept to score labels exactly from ranks, with no bound and no
    refinement pass: non-zero codes + items + (item, label) pairs + (code, label of its item)
    pairs. Up to ~160 bytes per unit at the peak of the exact computation (~650 MB per level at
    the default; saev_core.stats.assoc); a larger corpus falls back to the histograms (0: always)."""

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


# FeatureStats fields indexed by label first ([l] or [l, s]): splits.py slices them (shuffled
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
