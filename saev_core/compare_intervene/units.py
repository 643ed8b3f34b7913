"""The PCA-vs-SAE comparison's units and the measurement of one concept: the output columns,
`PcaVsSaeConfig` (params.yaml `compare.pca_vs_sae`), `ProjectionUnit` (a PCA direction as a
one-unit dictionary, so that clamping it is a `FeatureEdit` clamp), the classifier's logit reader,
and `compare_concept`: every arm's edit with its random controls at each strength, the paired
bootstrap and sign flips (`adjust_pairs` Holm-adjusts them, `stronger` reads the verdict). The
package docstring (`saev_core.compare_intervene`) tells the whole of it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saev_core.intervene.splicing import FeatureEdit, Splice, random_direction
from saev_core.verdicts import adjust, mean_ci, resample_counts, sign_flip_pvalue, sign_flips

METHODS = ("sae", "pca", "random")

COLUMNS = (
    "backbone",
    "concept",
    "method",
    "unit",
    "strength",
    "n_images",
    "delta",
    "lo",
    "hi",
    "other_delta",
    "dx_norm",
    "select_split",
    "report_split",
    # the headline: control-adjusted pca - sae (pca rows), Holm over concepts x strengths
    "adj_diff",
    "adj_diff_lo",
    "adj_diff_hi",
    "adj_diff_p",
    "p_adjusted",
    "alpha",
    # unadjusted pca - sae (pca rows): direction and dose mixed
    "raw_diff",
    "raw_diff_lo",
    "raw_diff_hi",
    "raw_diff_p",
    # each arm beyond its own control, and per unit of perturbation
    "adj_delta",
    "adj_lo",
    "adj_hi",
    "delta_per_dx",
    "adj_delta_per_dx",
    "dx_norm_all",
    "n_tokens_edited",
    "n_tokens",
    "control_for",
    "n_directions",
    "other_abs_delta",
    "max_value",
    "logit_before",
    "layer",
)
STRINGS = ("backbone", "concept", "method", "select_split", "report_split", "control_for")
INTEGERS = ("unit", "n_images", "n_directions", "layer", "n_tokens_edited", "n_tokens")


@dataclass(frozen=True)
class PcaVsSaeConfig:
    """params.yaml `compare.intervene` (besides `backbone`): how the edits are measured."""

    strengths: tuple[float, ...] = (0.0, -2.0, -5.0)
    """Clamp values, as multiples of each unit's max (the demo's intervene.strengths)."""
    concepts: tuple[str, ...] = ()
    """Concepts to edit; empty = every label of the head with an sae and a pca baselines row."""
    split: str = "test"
    """The images the edits are measured on (must not be the select split of the baselines)."""
    max_images: int = 1000
    """At most this many images per concept (those of `split` that carry it, in id order)."""
    n_random: int = 5
    """Random residual directions per method, concept and strength (norm-matched controls; the
    control-adjusted headline needs at least one)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples of images for the 95% intervals (shared by a concept's rows)."""
    n_permutations: int = 9999
    """Sign flips of the paired permutation test (exact when 2^n_images is no more)."""
    alpha: float = 0.05
    """`stronger` needs the Holm-adjusted p of the adjusted difference below this."""
    batch_size: int = 128
    """Images per forward pass of the unedited model."""
    stack_rows: int = 1024
    """Images x conditions per forward pass after the edited layer (edit and its controls)."""
    batch_images: int = 256
    """Images per batch streamed from the shards to find each PCA direction's max."""
    val_fraction: float = 0.1
    """A source without its own val split: the share held out as val (the extract stage's)."""
    seed: int = 0
    """Seed of the random directions, the bootstrap and the permutations."""
    device: str = "cpu"
    """Torch device the classifier runs on ("auto": CUDA, else MPS, else CPU)."""

    def __post_init__(self) -> None:
        if isinstance(self.strengths, (str, bytes)) or not self.strengths:
            raise ValueError("compare.intervene.strengths: give at least one strength")
        for name in ("max_images", "batch_size", "stack_rows", "batch_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"compare.intervene.{name} must be >= 1")
        if self.n_random < 1:
            raise ValueError(
                "compare.intervene.n_random must be >= 1: the control-adjusted pca - sae "
                "needs each arm's norm-matched random directions"
            )
        if self.n_bootstrap < 10 or self.n_permutations < 100:
            raise ValueError("compare.intervene: n_bootstrap >= 10 and n_permutations >= 100")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"compare.intervene.alpha must lie in (0, 1), got {self.alpha}")


# ---------------------------------------------------------------------------------------------
# a PCA direction as a one-unit dictionary, and the classifier's logits


class ProjectionUnit:
    """One direction `u` (unit norm) centred on `mean_d`, shaped as a one-feature ReLU SAE for
    `intervene.Splice`: `encode(x) = relu((x - mean_d) . u)` ([n, 1]), `W_dec = u` ([1, d]),
    `norm_scale = 1`. A `FeatureEdit("clamp", (0,), s, max_acts=(M,))` then moves each token by
    `(s M - relu(p(x))) u`, the rest of x kept: as an SAE feature's clamp, a token whose
    projection is <= 0 is silent, untouched at s = 0 and moved by `s M` otherwise (module
    docstring)."""

    cfg = None  # `intervene.feature_values` calls `encode` for a dictionary without an SAE cfg
    norm_scale = 1.0

    def __init__(self, direction_d: Any, mean_d: Any) -> None:
        u = torch.as_tensor(np.asarray(direction_d, dtype=np.float64))
        norm = float(u.norm())
        if u.dim() != 1 or not np.isfinite(norm) or norm == 0:
            raise ValueError(f"ProjectionUnit: a nonzero [d_model] direction needed, got {u.shape}")
        mean = torch.as_tensor(np.asarray(mean_d, dtype=np.float64))
        if mean.shape != u.shape:
            raise ValueError(f"ProjectionUnit: mean {tuple(mean.shape)} vs direction {u.shape}")
        self.u = (u / norm).float()
        self.mean = mean.float()
        self.W_dec = self.u[None, :]

    def to(self, device: Any) -> ProjectionUnit:
        self.u, self.mean = self.u.to(device), self.mean.to(device)
        self.W_dec = self.u[None, :]
        return self

    def projection(self, x_nd: torch.Tensor) -> torch.Tensor:
        """[n] the signed centred projection `(x - mean) . u`."""
        return (x_nd.float() - self.mean) @ self.u

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.projection(x_nd))[:, None]


def logit_reader(model: Any, preprocess: Any) -> Any:
    """A `hypotheses.Reader` over an image classifier whose `forward` returns the head's logits
    ([B, C]) instead of probabilities: `Reader.probs_stacked` then stacks edits over logits."""
    from PIL import Image

    from saev_core.backbone.hooks import classifier_blocks
    from saev_core.hypotheses.readers import Reader
    from saev_core.intervene.layout import measure_layout

    blocks = classifier_blocks(model)
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    labels = [id2label[i] for i in sorted(id2label)]
    layout = measure_layout(model, blocks, preprocess([Image.new("RGB", (32, 32), (128,) * 3)]))
    multi = model.config.problem_type == "multi_label_classification"

    def forward(px: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=px).logits

    kind = "multilabel" if multi else "softmax"
    return Reader(kind, labels, blocks, layout, preprocess, forward, model=model)


def load_logit_reader(backbone_dir: str | Path, device: str = "cpu") -> Any:
    """`logit_reader` of the classifier saved in `backbone_dir` (the demo ViT's layout)."""
    from transformers import AutoImageProcessor

    from saev_core.backbone.load import load_classifier

    model, _ = load_classifier(backbone_dir, device=device)
    processor = AutoImageProcessor.from_pretrained(str(backbone_dir))

    def prep(images: list[Any]) -> torch.Tensor:
        return processor(images=images, return_tensors="pt")["pixel_values"].to(device)

    return logit_reader(model, prep)


def logits(reader: Any, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
    """[n, C] logits of the unedited model."""
    return reader.probs(pixels, batch_size)


# ---------------------------------------------------------------------------------------------
# measuring one concept


@dataclass
class Arm:
    """One method's edit for a concept: which unit of which dictionary, and its max value."""

    method: str
    """sae or pca."""
    unit: int
    """The SAE feature, or the PCA component (the baselines table's `unit`)."""
    module: Any
    """The SAE, or the `ProjectionUnit` of the PCA direction."""
    index: int
    """The feature edited inside `module` (the SAE feature; 0 for a ProjectionUnit)."""
    max_value: float
    """Its max observed value: the SAE feature's max_act, the direction's max projection M."""

    def edit(self, strength: float) -> FeatureEdit:
        return FeatureEdit("clamp", (self.index,), float(strength), max_acts=(self.max_value,))


def edited_logits(
    reader: Any,
    pixels: torch.Tensor,
    layer: int,
    arm: Arm,
    strength: float,
    directions: list[torch.Tensor],
    stack_rows: int,
) -> tuple[np.ndarray, dict[str, float]]:
    """([1 + K, n, C] logits under the arm's edit, then under each of its K random-direction
    controls; the edit's dose `dose(...)` over the n images), one stacked forward pass per
    group. The controls move every token exactly as far as the edit: the same dose."""
    edit = arm.edit(strength)
    conditions = [Splice(layer, arm.module, edit)]
    conditions += [Splice(layer, arm.module, edit, direction=v) for v in directions]
    out = reader.probs_stacked(pixels, conditions, stack_rows)
    return out, dose(conditions[0].stats, len(pixels) * reader.layout.n_tokens)


def dose(stats: dict[str, float], n_tokens: int) -> dict[str, float]:
    """How far an edit moved x, from a splice's stats (`n_tokens` changed tokens, their `dx_sum`
    of |dx|) over `n_tokens` tokens in all: `dx_norm` (mean |dx| over changed tokens),
    `dx_norm_all` (over all of them), `n_tokens_edited`, `n_tokens`."""
    n_edited = int(stats.get("n_tokens", 0))
    total = float(stats.get("dx_sum", stats.get("dx_norm", 0.0) * n_edited))
    return {"dx_norm": total / max(1, n_edited), "dx_norm_all": total / max(1, n_tokens),
            "n_tokens_edited": n_edited, "n_tokens": int(n_tokens)}  # fmt: skip


def _changes(l0: np.ndarray, l1: np.ndarray, j: int, others: list[int]):
    """Per image: the change of logit j, the mean change of the others and of their |change|."""
    d = l1 - l0
    if others:
        return d[:, j], d[:, others].mean(1), np.abs(d[:, others]).mean(1)
    zero = np.zeros(len(d))
    return d[:, j], zero, zero


def stronger(
    adj_lo: float, adj_hi: float, p_adjusted: float, strength: float, alpha: float = 0.05
) -> str:
    """Which edit moves its concept further beyond its own norm-matched control, the way a clamp
    at `strength` pushes it (down for s <= 0, `verdicts.resolve_alternative`), by the paired
    interval of the control-adjusted (pca - random_pca) - (sae - random_sae): 'pca' or 'sae'
    when the interval excludes 0 and the Holm-adjusted p is below `alpha`, else 'level'."""
    finite = all(np.isfinite(v) for v in (adj_lo, adj_hi, p_adjusted))
    if not finite or not p_adjusted < alpha:
        return "level"
    pca_more_down, sae_more_down = adj_hi < 0, adj_lo > 0
    if strength <= 0:
        return "pca" if pca_more_down else "sae" if sae_more_down else "level"
    return "sae" if pca_more_down else "pca" if sae_more_down else "level"


def compare_concept(
    reader: Any,
    pixels: torch.Tensor,
    logits_before: np.ndarray,
    concept: str,
    layer: int,
    arms: dict[str, Arm],
    cfg: PcaVsSaeConfig,
    d_model: int,
    labels: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one concept (module docstring): per strength, a row per arm and one random
    row per arm; with both arms, the pca row carries the paired differences (`p_adjusted` is
    set over the whole run by `adjust_pairs`). `pixels` and `logits_before` ([n, C]) are the
    concept's images; `labels` are the concepts counted as "others" (default: every head label
    but `concept`)."""
    if concept not in reader.labels:
        raise ValueError(f"concept {concept!r} is not a label of the head ({reader.labels})")
    j = reader.labels.index(concept)
    others = [reader.labels.index(x) for x in (labels or reader.labels) if x != concept]
    n = len(pixels)
    if n == 0:
        raise ValueError(f"no image for concept {concept!r}")
    seed = [cfg.seed, zlib.crc32(concept.encode())]
    rng = np.random.default_rng(seed)
    W = resample_counts(n, cfg.n_bootstrap, rng)  # one draw of images for every row: paired
    flips = sign_flips(n, cfg.n_permutations, rng)
    directions = [
        random_direction(d_model, zlib.crc32(repr([*seed, k]).encode()))
        for k in range(cfg.n_random)
    ]
    rows = []
    for s in cfg.strengths:
        raw: dict[str, np.ndarray] = {}  # per image: the arm's change of the concept's logit
        adj: dict[str, np.ndarray] = {}  # ... minus its own controls' mean change
        for method, arm in arms.items():
            out, dx = edited_logits(reader, pixels, layer, arm, s, directions, cfg.stack_rows)
            t, o, oa = _changes(logits_before, out[0], j, others)
            ch = [_changes(logits_before, out[1 + k], j, others) for k in range(len(directions))]
            t_r, o_r, oa_r = (np.mean([c[i] for c in ch], axis=0) for i in range(3))
            raw[method], adj[method] = t, t - t_r
            lo, hi = mean_ci(adj[method], W)
            base = {"concept": concept, "unit": arm.unit, "strength": float(s), "n_images": n,
                    "max_value": arm.max_value, "layer": layer,
                    "logit_before": float(logits_before[:, j].mean()), **dx}  # fmt: skip
            rows.append({**base, "method": method, "control_for": None, "n_directions": 0,
                         **_summary(t, o, oa, W), "adj_delta": float(adj[method].mean()),
                         "adj_lo": lo, "adj_hi": hi,
                         "delta_per_dx": _per_dx(float(t.mean()), dx),
                         "adj_delta_per_dx": _per_dx(float(adj[method].mean()), dx)})  # fmt: skip
            rows.append({**base, "method": "random", "control_for": method,
                         "n_directions": len(directions), **_summary(t_r, o_r, oa_r, W),
                         "delta_per_dx": _per_dx(float(t_r.mean()), dx)})  # fmt: skip
        if "pca" in raw and "sae" in raw:
            paired = {}
            for name, d in (("raw", raw["pca"] - raw["sae"]), ("adj", adj["pca"] - adj["sae"])):
                lo, hi = mean_ci(d, W)
                paired.update({f"{name}_diff": float(d.mean()), f"{name}_diff_lo": lo,
                               f"{name}_diff_hi": hi,
                               f"{name}_diff_p": sign_flip_pvalue(d, "two-sided", flips)})  # fmt: skip
            for r in rows:
                if r["method"] == "pca" and r["strength"] == float(s):
                    r.update(paired)
    return rows


def adjust_pairs(rows: list[dict[str, Any]], alpha: float = 0.05) -> None:
    """Holm-adjust the adjusted difference's `adj_diff_p` over every pca row that has one (one
    family: every concept x strength of the run, `verdicts.adjust`), setting `p_adjusted` and
    `alpha` on those rows, in place."""
    pca = [r for r in rows if r.get("method") == "pca" and "adj_diff_p" in r]
    if not pca:
        return
    for r, p in zip(pca, adjust([r["adj_diff_p"] for r in pca], "holm"), strict=True):
        r["p_adjusted"], r["alpha"] = float(p), float(alpha)


def _per_dx(value: float, dx: dict[str, float]) -> float:
    """`value` per unit of the edit's mean |dx| over all tokens (NaN when it moved nothing)."""
    return value / dx["dx_norm_all"] if dx["dx_norm_all"] > 0 else float("nan")


def _summary(t: np.ndarray, o: np.ndarray, oa: np.ndarray, W: np.ndarray) -> dict[str, float]:
    lo, hi = mean_ci(t, W)
    return {"delta": float(t.mean()), "lo": lo, "hi": hi, "other_delta": float(o.mean()),
            "other_abs_delta": float(oa.mean())}  # fmt: skip
