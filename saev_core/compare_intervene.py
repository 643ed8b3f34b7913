"""The best PCA direction's intervention beside the best SAE feature's (issue 15.5).

The baselines step (`saev_core.baselines`) asks whether an SAE *detects* concepts that simpler
bases of the same activations do not. This module asks the causal half: does editing along the
best PCA direction move the classifier as much as editing the best SAE feature? On a backbone
with a classifier head (the supervised demo ViT, whose head reads the concepts), for each concept
the head predicts, on the report split's images that carry the concept (test, never the select
split where both units were chosen), at each strength `s` (default the demo's intervene sweep
0, -2, -5), every token at the SAE's layer is edited in one of three ways:

- `sae`: the concept's best SAE feature (the baselines table's `sae` row: best image-level AUROC
  on the select split, the same rule that picks the PCA component) is clamped to
  `s x max_act` (its max observed activation, stats `features.parquet`), as the demo's intervene
  stage does: `x' = x + (s max_act - f(x)) W_dec[f] / norm_scale`, the SAE's error term kept.
- `pca`: with `u` the best PCA component for the concept, oriented by its `sign` (unit norm;
  baselines `direction`), `mu` the PCA's mean and `p(x) = (x - mu) . u` the centred projection
  the baselines stage scored, the unit's value is `relu(p(x))` and is clamped to `s x M`:
  `x' = x + (s M - relu(p(x))) u`, everything orthogonal to `u` left as it was. The ReLU makes
  the clamp mean what the SAE's does at every `s`: an SAE feature is >= 0, so clamping it to 0
  removes only its positive activation and leaves a token where it is silent untouched; clamping
  the signed projection to 0 would instead be mean-ablation along `u` of every token, pushing
  the tokens with a negative projection *up* the concept's direction. So at `s = 0` only tokens
  with `p > 0` move (to `p = 0`), and at `s < 0` a token with `p <= 0` moves by `s M` (to
  `p + s M`), as a silent SAE feature set to `s max_act` adds `s max_act` decoder rows. `M` is
  the largest centred projection over the tokens and splits the stats run took `max_act` over
  (its `run.parquet` records both), so both doses are the same multiple of each unit's largest
  observed value; `mu` is the mean of the PCA's own fit sample, drawn again with the baselines'
  `n_fit` and `seed` (the table's metadata), i.e. `PCA.mean_`.
- `random`: each method's edit with its change of every token replaced by a random unit vector
  of the same norm (`n_random` seeded directions, the same ones for both methods; `control_for`
  says which method's norms they carry): moving the residual stream as far, in no particular
  direction.

Measured per image: the change of the concept's logit (`delta`) and the mean change of the other
concepts' logits (`other_delta`; `other_abs_delta` its mean absolute value: specificity); each
row has the mean over images with a percentile bootstrap 95% interval (`lo`, `hi`; random rows:
the per-image mean over the directions). The bootstrap draws and sign flips are shared by every
row of a concept, so all differences below are paired over the same images.

The two arms are not dose-matched: each clamps to `s` times its own max, and a PCA direction
(edited on every token, with a max set by outliers) can move x orders of magnitude further than
a sparse SAE feature. So the headline is not pca - sae but the *control-adjusted* paired
difference per image, `adj = (pca - random_pca) - (sae - random_sae)`: each arm's effect beyond
a random direction moved exactly as far on every token (each control norm-matched to its own
arm). On the arm rows, `adj_delta` (`adj_lo`, `adj_hi`) is the arm's `delta` minus its
control's, per image; on the `pca` rows, `adj_diff` (`adj_diff_lo`, `adj_diff_hi`) is the mean
of `adj` with its paired bootstrap CI and `adj_diff_p` its two-sided paired sign-flip p-value
(`verdicts.sign_flip_pvalue`), Holm-adjusted over every concept x strength of the run as
`p_adjusted` (`verdicts.adjust`, as the demo's intervene verdicts are). `raw_diff`
(`raw_diff_lo`, `raw_diff_hi`, `raw_diff_p`) keeps the unadjusted pca - sae, which mixes the
direction's effect with its dose. `stronger` (the summary, the query) reads the adjusted
difference: the arm whose adjusted effect goes further the way the clamp pushes, when its CI
excludes 0 *and* `p_adjusted < alpha` (0.05), else `level`.

The dose: `dx_norm` is the mean |dx| over the tokens the edit changed (`n_tokens_edited` of
them: at `s = 0` only those where the unit is positive), `dx_norm_all` the mean |dx| over all
`n_tokens` tokens of the edited images (unchanged ones count 0): the two arms' sizes compare on
the latter. `delta_per_dx` and `adj_delta_per_dx` are `delta` and `adj_delta` per unit of
`dx_norm_all`: the effect per unit of perturbation. `out_dir/pca_vs_sae.parquet` holds the rows
(written atomically, NaN written as null); `pca_vs_sae` returns a small summary for the DVC
metrics file that says plainly, per strength, on which concepts the SAE's edit does not move its
concept more than the PCA direction's.

Before anything runs, the baselines table must have been computed with this SAE (`sae_dir`):
its metadata's SAE path (or its weights' sha256, when recorded) and its `sae` rows' unit
directions, which must be the SAE's own decoder rows (`check_baselines_sae`).

The edits go through `saev_core.intervene` unchanged: a PCA direction is wrapped as a one-unit
dictionary (`ProjectionUnit`: encode = relu of the centred projection, decoder row = `u`), so
clamping it is a `FeatureEdit` clamp, and every edit runs with its random-direction controls
stacked in one forward pass (`stacked_splice`).

Shape suffixes: `n` images, `c` the head's labels, `d` d_model, `k` random directions.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saev_core.intervene import FeatureEdit, Splice, random_direction
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

    from saev_core.backbone import classifier_blocks
    from saev_core.hypotheses import Reader
    from saev_core.intervene import measure_layout

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

    from saev_core.backbone import load_classifier

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


# ---------------------------------------------------------------------------------------------
# provenance: the baselines' SAE, the stats' tokens


def baselines_meta(path: str | Path) -> dict[str, Any]:
    """The JSON `write_baselines` put in the table's schema metadata ({} when none)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"saev")
    return json.loads(raw) if raw else {}


def check_baselines_sae(
    table: Any, meta: dict[str, Any], sae_dir: str | Path, W_dec: Any, where: str
) -> None:
    """Refuse a baselines table (`where`) computed with another SAE than the one in `sae_dir`
    (decoder `W_dec` [d_sae, d]): its units were chosen on another dictionary. Checked, each
    when the table has it: the SAE weights sha256 its metadata records (`sae_sha256`); the SAE
    directory it records (`sae`), which must be `sae_dir` or a copy with the same weights'
    sha256; and, always, every `sae` row's `direction`, which `baselines` takes from the SAE's
    decoder row of its `unit` (unit norm, times its `sign`): a digest of the weights that no mtime or path
    changes, so a retrained SAE at the same path is caught too."""
    from saev_core.sae_io import sae_sha256

    ours = sae_sha256(sae_dir)
    recorded_sha = meta.get("sae_sha256")
    if recorded_sha and recorded_sha != ours:
        raise ValueError(
            f"{where} was computed with an SAE with weights sha256 {recorded_sha}, but the SAE "
            f"{sae_dir} has weights sha256 {ours}: rerun the baselines step"
        )
    recorded = meta.get("sae")
    if recorded and Path(recorded).resolve() != Path(sae_dir).resolve():
        theirs = None
        try:
            theirs = sae_sha256(recorded)
        except FileNotFoundError:
            pass
        if theirs != ours:
            raise ValueError(
                f"{where} was computed with the SAE {recorded}, not {sae_dir} "
                f"({'not found' if theirs is None else f'weights sha256 {theirs} vs {ours}'}): "
                "its best SAE features belong to another dictionary"
            )
    W = np.asarray(W_dec.detach().float().cpu() if hasattr(W_dec, "detach") else W_dec, float)
    for r in table[table["method"] == "sae"].itertuples():
        unit = int(r.unit)
        if not 0 <= unit < len(W):
            raise ValueError(
                f"{where}: the sae row of {r.concept!r} names feature {unit}, but the SAE "
                f"{sae_dir} has {len(W)}: computed with another SAE"
            )
        sign = int(getattr(r, "sign", 1) or 1)  # 1 for an SAE's (one-sided) units
        w = sign * W[unit] / max(float(np.linalg.norm(W[unit])), 1e-12)
        gap = float(np.abs(np.asarray(r.direction, float) - w).max())
        if not gap <= 1e-4:
            raise ValueError(
                f"{where}: the sae row of {r.concept!r} (feature {unit}) has a direction "
                f"{gap:.3g} away from the decoder row of {sae_dir}: the baselines were computed "
                "with another SAE (retrained since?); rerun the baselines step"
            )


def stats_tokens_and_splits(stats_dir: str | Path) -> tuple[str, list[str]]:
    """The token policy and the splits the stats run streamed (its `run.parquet` `tokens` and
    `splits`): the tokens its `max_act` is the max over, so that M covers the same ones."""
    import pyarrow.parquet as pq

    from saev_core.loaders import TOKEN_CHOICES

    path = Path(stats_dir) / "run.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the stats run's token policy and splits are needed to take "
            "each PCA direction's max over the tokens the SAE's max_act covers"
        )
    rows = pq.read_table(path).to_pylist()
    row = rows[0] if rows else {}
    tokens, splits = row.get("tokens"), row.get("splits")
    if tokens not in TOKEN_CHOICES or not splits:
        raise ValueError(
            f"{path} records tokens {tokens!r} and splits {splits!r}: stats written before "
            "they were recorded; rerun the stats step"
        )
    return str(tokens), [s for s in str(splits).split(",") if s]


# ---------------------------------------------------------------------------------------------
# the PCA direction's mean and max, from the shards


def pca_mean(shard_dir: str | Path, layer: int, n_fit: int, seed: int) -> np.ndarray:
    """`PCA.mean_` of the baselines step: the mean of its fit sample (`n_fit` train patch
    tokens drawn with `seed`, `loaders.sample_rows`, as `baselines.sae_vs_baselines` draws)."""
    from saev_core import loaders

    x = loaders.sample_rows(shard_dir, layer, n_fit, seed, ["train"], "patches")
    return np.asarray(x, dtype=np.float64).mean(0)


def max_projections(
    shard_dir: str | Path,
    layer: int,
    mean_d: np.ndarray,
    directions_cd: np.ndarray,
    tokens: str,
    batch_images: int,
    splits: list[str] | None = None,
) -> np.ndarray:
    """[c] the largest `(x - mean) . u_c` over every token of policy `tokens` in `splits`
    (None: every split)."""
    from saev_core import loaders

    U = np.asarray(directions_cd, dtype=np.float64).T
    best = np.full(U.shape[1], -np.inf)
    batches = loaders.iter_image_batches(shard_dir, layer, batch_images, splits, tokens=tokens)
    for _, _, acts in batches:
        p = (np.asarray(acts, np.float64) - mean_d) @ U
        best = np.maximum(best, p.max(0))
    return best


# ---------------------------------------------------------------------------------------------
# the stage


def pca_vs_sae(
    backbone_dir: str | Path,
    shard_dir: str | Path,
    sae_dir: str | Path,
    stats_dir: str | Path,
    baselines_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    backbone: str = "supervised",
    progress: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Edit each concept's best SAE feature and best PCA direction in the classifier at the SAE's
    layer, with random-direction controls (module docstring); write
    `out_dir/pca_vs_sae.parquet` and return the summary for `metrics/compare/intervene.json`.
    `params` are `PcaVsSaeConfig` fields."""
    import pandas as pd

    from saev_core.baselines import BaselinesConfig, best_direction, read_baselines
    from saev_core.config import from_dict
    from saev_core.sae import SAE
    from saev_core.sae_io import check_sae_matches, check_sae_model, check_stats_match

    cfg = from_dict(PcaVsSaeConfig, dict(params), where="params: compare.intervene")
    t0 = time.perf_counter()
    device = _device(cfg.device)
    check_sae_model(sae_dir, str(backbone_dir))
    check_sae_matches(sae_dir, shard_dir)
    check_stats_match(stats_dir, sae_dir)
    tokens, splits = stats_tokens_and_splits(stats_dir)
    sae = SAE.load(sae_dir, device=device).eval()
    if "layer" not in sae.extra:
        raise ValueError(f"{sae_dir}/cfg.json records no layer: which block would it edit?")
    layer = int(sae.extra["layer"])

    table = read_baselines(baselines_path)
    meta = baselines_meta(baselines_path)
    check_baselines_sae(table, meta, sae_dir, sae.W_dec, str(baselines_path))
    bcfg = meta.get("cfg") or {}
    select_split = str(bcfg.get("select_split", table["select_split"].iloc[0]))
    if cfg.split == select_split:
        raise ValueError(
            f"compare.intervene.split is {cfg.split!r}, the split the baselines chose each unit "
            "on: the effects would not be held out"
        )
    reader = load_logit_reader(backbone_dir, device)
    heads = [x for x in reader.labels if x != "background"]
    have = {m: set(table.loc[table["method"] == m, "concept"]) for m in ("sae", "pca")}
    wanted = list(cfg.concepts) or heads
    unknown = [c for c in wanted if c not in heads]
    if unknown:
        raise ValueError(f"compare.intervene.concepts {unknown} are not labels of the head {heads}")
    skipped = {c: "no sae or pca row in the baselines table" for c in wanted
               if c not in have["sae"] or c not in have["pca"]}  # fmt: skip
    concepts = [c for c in wanted if c not in skipped]
    if not concepts:
        raise ValueError(
            f"no concept of {wanted} has both an sae and a pca row in {baselines_path}"
        )

    max_act = pd.read_parquet(Path(stats_dir) / "features.parquet").set_index("feature")["max_act"]
    # the baselines' fit sample again (the flow records its cfg; else BaselinesConfig's defaults)
    n_fit, fit_seed = int(bcfg.get("n_fit", BaselinesConfig.n_fit)), int(bcfg.get("seed", 0))
    mean_d = pca_mean(shard_dir, layer, n_fit, fit_seed)
    dirs_cd = np.stack([best_direction(table, c, "pca") for c in concepts])
    # M over the tokens and splits the stats' max_act is over: the same dose on both arms
    M_c = max_projections(shard_dir, layer, mean_d, dirs_cd, tokens, cfg.batch_images, splits)

    pixels_all, records = _images(reader, data_dir, cfg)
    l0_all = logits(reader, pixels_all, cfg.batch_size)
    rows: list[dict[str, Any]] = []
    for c, concept in enumerate(concepts):
        idx = np.array([i for i, r in enumerate(records) if concept in r.labels], dtype=int)
        idx = idx[: cfg.max_images]
        if len(idx) == 0:
            skipped[concept] = f"no {cfg.split} image carries it"
            continue
        feat = int(_row(table, "sae", concept)["unit"])
        if float(max_act.get(feat, 0.0)) <= 0 or float(M_c[c]) <= 0:
            skipped[concept] = "its unit never takes a positive value (max 0)"
            continue
        arms = {
            "sae": Arm("sae", feat, sae, feat, float(max_act[feat])),
            "pca": Arm("pca", int(_row(table, "pca", concept)["unit"]),
                       ProjectionUnit(dirs_cd[c], mean_d).to(device), 0, float(M_c[c])),
        }  # fmt: skip
        rows += compare_concept(
            reader, pixels_all[idx], l0_all[idx], concept, layer, arms, cfg, sae.cfg.d_model,
            labels=heads,
        )  # fmt: skip
        if progress:
            print(f"compare intervene: {concept} on {len(idx)} {cfg.split} images", flush=True)
    if not rows:
        raise ValueError(f"no concept could be edited: {skipped}")
    adjust_pairs(rows, cfg.alpha)  # Holm over every concept x strength
    for r in rows:
        r.update(backbone=backbone, select_split=select_split, report_split=cfg.split)
    path = write_pca_vs_sae(
        rows,
        Path(out_dir) / "pca_vs_sae.parquet",
        {"backbone": backbone, "backbone_dir": str(backbone_dir), "sae_dir": str(sae_dir),
         "shard_dir": str(shard_dir), "baselines": str(baselines_path), "layer": layer,
         "tokens": tokens, "splits": splits, "correction": "holm", "cfg": asdict(cfg)},
    )  # fmt: skip
    out = summary(pd.DataFrame(rows), cfg.alpha)
    out.update(backbone=backbone, layer=layer, skipped=skipped)
    if progress:
        print(f"compare intervene: {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _device(device: str) -> str:
    from saev_core.backbone import pick_device

    return pick_device(None if device == "auto" else device)


def _row(table: Any, method: str, concept: str) -> Any:
    rows = table[(table["method"] == method) & (table["concept"] == concept)]
    return rows.iloc[0]


def _images(reader: Any, data_dir: str | Path, cfg: PcaVsSaeConfig) -> tuple[torch.Tensor, list]:
    """The split's images, preprocessed by the classifier's processor, and their records."""
    from saev_core.data import load_records, open_image

    records = load_records(data_dir, [cfg.split], cfg.val_fraction)
    if not records:
        raise ValueError(f"{data_dir}: no {cfg.split} images")
    pixels = [reader.preprocess([open_image(r) for r in records[i : i + 256]])
              for i in range(0, len(records), 256)]  # fmt: skip
    return torch.cat(pixels), records


def _cell(v: Any) -> Any:
    """A value for the Parquet: NaN as null (DuckDB orders NaN above every number, so
    `NaN > 0` is true there: a missing value must not read as a large one)."""
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    return v


def write_pca_vs_sae(
    rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """The rows as Parquet with `COLUMNS` (atomically; NaN as null; `meta` as JSON in the
    schema metadata)."""
    import pyarrow as pa

    from saev_core.shards import atomic_write_table

    schema = pa.schema(
        [(c, pa.string()) if c in STRINGS else (c, pa.int64()) if c in INTEGERS
         else (c, pa.float64()) for c in COLUMNS]
    )  # fmt: skip
    t = pa.Table.from_pylist([{c: _cell(r.get(c)) for c in COLUMNS} for r in rows], schema=schema)
    t = t.replace_schema_metadata({b"saev": json.dumps(meta or {}).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(t, path)
    return path


def _mean(values: Any) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def summary(table: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Per strength, means over concepts: each method's change of the concept's logit (`delta`,
    and its random controls'), its change beyond its own control (`adj_delta`), its dose (mean
    |dx| over all tokens of the edited images) and effect per unit of it, and its specificity;
    the mean adjusted and raw pca - sae; and on which concepts the PCA direction's edit moves
    its concept further beyond its control than the SAE feature's (`pca_stronger`), the SAE's
    further (`sae_stronger`), or neither is shown (`level`): `stronger` on the adjusted
    difference's CI and Holm-adjusted p < `alpha`. `sae_not_stronger` lists the first and the
    last: where the SAE does not beat PCA."""
    out: dict[str, Any] = {"n_concepts": int(table["concept"].nunique()), "alpha": alpha,
                           "correction": "holm", "by_strength": {}}  # fmt: skip
    for s, g in table.groupby("strength", sort=True):
        entry: dict[str, Any] = {}
        for method in ("sae", "pca"):
            arm = g[g["method"] == method]
            rnd = g[(g["method"] == "random") & (g["control_for"] == method)]
            entry[f"{method}_delta"] = _mean(arm["delta"])
            if len(rnd):
                entry[f"random_{method}_delta"] = _mean(rnd["delta"])
            for col in ("adj_delta", "dx_norm_all", "adj_delta_per_dx", "other_abs_delta"):
                if col in arm:
                    entry[f"{method}_{col}"] = _mean(arm[col])
        pca = g[g["method"] == "pca"]
        if "adj_diff" not in pca:
            pca = pca.assign(adj_diff=np.nan, adj_diff_lo=np.nan, adj_diff_hi=np.nan,
                             raw_diff=np.nan, p_adjusted=np.nan)  # fmt: skip
        entry["mean_adj_diff"] = _mean(pca["adj_diff"])
        entry["mean_raw_diff"] = _mean(pca["raw_diff"])
        who = {r.concept: stronger(_f(r.adj_diff_lo), _f(r.adj_diff_hi), _f(r.p_adjusted),
                                   float(s), alpha) for r in pca.itertuples()}  # fmt: skip
        entry["pca_stronger"] = sorted(c for c, w in who.items() if w == "pca")
        entry["sae_stronger"] = sorted(c for c, w in who.items() if w == "sae")
        entry["level"] = sorted(c for c, w in who.items() if w == "level")
        entry["sae_not_stronger"] = sorted(c for c, w in who.items() if w != "sae")
        out["by_strength"][f"{float(s):g}"] = entry
    return out


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)
