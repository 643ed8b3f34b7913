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
  the baselines stage scored, each token's projection is clamped to `s x M`:
  `x' = x + (s M - p(x)) u`, so `p(x') = s M` and everything orthogonal to `u` is left as it
  was. `M` is the largest centred projection over the tokens the SAE's `max_act` is taken over
  (the SAE's token policy, every split of the shard set), so both doses are the same multiple
  of each unit's largest observed value; `mu` is the mean of the PCA's own fit sample, drawn
  again with the baselines' `n_fit` and `seed` (the table's metadata), i.e. `PCA.mean_`.
- `random`: each method's edit with its change of every token replaced by a random unit vector
  of the same norm (`n_random` seeded directions, the same ones for both methods; `control_for`
  says which method's norms they carry): moving the residual stream as far, in no particular
  direction.

Measured per image: the change of the concept's logit (`delta`) and the mean change of the other
concepts' logits (`other_delta`; `other_abs_delta` its mean absolute value: specificity); each
row has the mean over images with a percentile bootstrap 95% interval (`lo`, `hi`; random rows:
the per-image mean over the directions). The bootstrap draws are shared by every row of a
concept, so the `pca` row's `diff`, `diff_lo`, `diff_hi` are the paired difference pca - sae
over the same images, and `diff_p` its two-sided paired sign-flip permutation p-value
(`verdicts.sign_flip_pvalue`); null on the other rows. `dx_norm` is the mean norm of the change
of x over the edited tokens. `out_dir/pca_vs_sae.parquet` holds the rows (written atomically);
`pca_vs_sae` returns a small summary for the DVC metrics file that says plainly, per strength,
on which concepts the SAE's edit does not move its concept more than the PCA direction's.

The edits go through `saev_core.intervene` unchanged: a PCA direction is wrapped as a one-unit
dictionary (`ProjectionUnit`: encode = centred projection, decoder row = `u`), so clamping it is
a `FeatureEdit` clamp, and every edit runs with its random-direction controls stacked in one
forward pass (`stacked_splice`).

Shape suffixes: `n` images, `c` the head's labels, `d` d_model, `k` random directions.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saev_core.intervene import FeatureEdit, Splice, random_direction
from saev_core.verdicts import mean_ci, resample_counts, sign_flip_pvalue, sign_flips

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
    "diff_lo",
    "diff_hi",
    "diff_p",
    "select_split",
    "report_split",
    # beyond the brief's columns
    "control_for",
    "n_directions",
    "diff",
    "other_abs_delta",
    "max_value",
    "logit_before",
    "layer",
)


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
    """Random residual directions per method, concept and strength (norm-matched controls)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples of images for the 95% intervals (shared by a concept's rows)."""
    n_permutations: int = 9999
    """Sign flips of the paired permutation test (exact when 2^n_images is no more)."""
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
        if self.n_random < 0:
            raise ValueError("compare.intervene.n_random must be >= 0")
        if self.n_bootstrap < 10 or self.n_permutations < 100:
            raise ValueError("compare.intervene: n_bootstrap >= 10 and n_permutations >= 100")


# ---------------------------------------------------------------------------------------------
# a PCA direction as a one-unit dictionary, and the classifier's logits


class ProjectionUnit:
    """One direction `u` (unit norm) centred on `mean_d`, shaped as a one-feature SAE for
    `intervene.Splice`: `encode(x) = (x - mean_d) . u` ([n, 1]), `W_dec = u` ([1, d]),
    `norm_scale = 1`. A `FeatureEdit("clamp", (0,), s, max_acts=(M,))` then moves each token by
    `(s M - p(x)) u`: its projection becomes `s M`, the rest of x stays."""

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

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor:
        return ((x_nd.float() - self.mean) @ self.u)[:, None]


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
) -> tuple[np.ndarray, float]:
    """([1 + K, n, C] logits under the arm's edit, then under each of its K random-direction
    controls; the edit's mean |dx| over edited tokens), one stacked forward pass per group."""
    edit = arm.edit(strength)
    conditions = [Splice(layer, arm.module, edit)]
    conditions += [Splice(layer, arm.module, edit, direction=v) for v in directions]
    out = reader.probs_stacked(pixels, conditions, stack_rows)
    return out, float(conditions[0].stats.get("dx_norm", 0.0))


def _changes(l0: np.ndarray, l1: np.ndarray, j: int, others: list[int]):
    """Per image: the change of logit j, the mean change of the others and of their |change|."""
    d = l1 - l0
    if others:
        return d[:, j], d[:, others].mean(1), np.abs(d[:, others]).mean(1)
    zero = np.zeros(len(d))
    return d[:, j], zero, zero


def stronger(diff_lo: float, diff_hi: float, strength: float) -> str:
    """Which edit moves its concept further the way a clamp at `strength` pushes it (down for
    s <= 0, `verdicts.resolve_alternative`), by the paired interval of pca - sae: 'pca', 'sae',
    or 'level' when the interval holds 0."""
    if not (np.isfinite(diff_lo) and np.isfinite(diff_hi)):
        return "level"
    pca_more_down, sae_more_down = diff_hi < 0, diff_lo > 0
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
    row per arm. `pixels` and `logits_before` ([n, C]) are the concept's images; `labels` are
    the concepts counted as "others" (default: every head label but `concept`)."""
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
        per_image: dict[str, np.ndarray] = {}
        for method, arm in arms.items():
            out, dx_norm = edited_logits(reader, pixels, layer, arm, s, directions, cfg.stack_rows)
            t, o, oa = _changes(logits_before, out[0], j, others)
            per_image[method] = t
            base = {"concept": concept, "unit": arm.unit, "strength": float(s), "n_images": n,
                    "max_value": arm.max_value, "layer": layer,
                    "logit_before": float(logits_before[:, j].mean())}  # fmt: skip
            rows.append({**base, "method": method, "control_for": None, "n_directions": 0,
                         **_summary(t, o, oa, W), "dx_norm": dx_norm})  # fmt: skip
            if directions:
                ch = [
                    _changes(logits_before, out[1 + k], j, others) for k in range(len(directions))
                ]
                t_r, o_r, oa_r = (np.mean([c[i] for c in ch], axis=0) for i in range(3))
                # the controls move each token exactly as far as the edit: the same dx_norm
                rows.append({**base, "method": "random", "control_for": method,
                             "n_directions": len(directions), **_summary(t_r, o_r, oa_r, W),
                             "dx_norm": dx_norm})  # fmt: skip
        if "pca" in per_image and "sae" in per_image:
            d = per_image["pca"] - per_image["sae"]
            lo, hi = mean_ci(d, W)
            p = sign_flip_pvalue(d, "two-sided", flips)
            for r in rows:
                if r["method"] == "pca" and r["strength"] == float(s):
                    r.update(diff=float(d.mean()), diff_lo=lo, diff_hi=hi, diff_p=p)
    return rows


def _summary(t: np.ndarray, o: np.ndarray, oa: np.ndarray, W: np.ndarray) -> dict[str, float]:
    lo, hi = mean_ci(t, W)
    return {"delta": float(t.mean()), "lo": lo, "hi": hi, "other_delta": float(o.mean()),
            "other_abs_delta": float(oa.mean())}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the PCA direction's mean and max, from the shards


def baselines_meta(path: str | Path) -> dict[str, Any]:
    """The JSON `write_baselines` put in the table's schema metadata ({} when none)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"saev")
    return json.loads(raw) if raw else {}


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
) -> np.ndarray:
    """[c] the largest `(x - mean) . u_c` over every token of policy `tokens` in every split."""
    from saev_core import loaders

    U = np.asarray(directions_cd, dtype=np.float64).T
    best = np.full(U.shape[1], -np.inf)
    for _, _, acts in loaders.iter_image_batches(shard_dir, layer, batch_images, tokens=tokens):
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
    from saev_core.stages import stats_tokens

    cfg = from_dict(PcaVsSaeConfig, dict(params), where="params: compare.intervene")
    t0 = time.perf_counter()
    device = _device(cfg.device)
    check_sae_model(sae_dir, str(backbone_dir))
    check_sae_matches(sae_dir, shard_dir)
    check_stats_match(stats_dir, sae_dir)
    sae = SAE.load(sae_dir, device=device).eval()
    if "layer" not in sae.extra:
        raise ValueError(f"{sae_dir}/cfg.json records no layer: which block would it edit?")
    layer = int(sae.extra["layer"])

    table = read_baselines(baselines_path)
    meta = baselines_meta(baselines_path)
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
    tokens = stats_tokens("trained", sae.extra, sae_dir)
    M_c = max_projections(shard_dir, layer, mean_d, dirs_cd, tokens, cfg.batch_images)

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
    for r in rows:
        r.update(backbone=backbone, select_split=select_split, report_split=cfg.split)
    path = write_pca_vs_sae(
        rows,
        Path(out_dir) / "pca_vs_sae.parquet",
        {"backbone": backbone, "backbone_dir": str(backbone_dir), "sae_dir": str(sae_dir),
         "shard_dir": str(shard_dir), "baselines": str(baselines_path), "layer": layer,
         "tokens": tokens, "cfg": asdict(cfg)},
    )  # fmt: skip
    out = summary(pd.DataFrame(rows))
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


def write_pca_vs_sae(
    rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """The rows as Parquet with `COLUMNS` (atomically; `meta` as JSON in the schema metadata)."""
    import pyarrow as pa

    from saev_core.shards import atomic_write_table

    schema = pa.schema(
        [(c, pa.string()) if c in ("backbone", "concept", "method", "select_split",
                                   "report_split", "control_for")
         else (c, pa.int64()) if c in ("unit", "n_images", "n_directions", "layer")
         else (c, pa.float64()) for c in COLUMNS]
    )  # fmt: skip
    t = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema)
    t = t.replace_schema_metadata({b"saev": json.dumps(meta or {}).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(t, path)
    return path


def summary(table: Any) -> dict[str, Any]:
    """Per strength: mean change of the concept's logit over concepts for each method (and the
    random controls of each), and on which concepts the PCA direction's edit moves its concept
    further than the SAE feature's (`pca_stronger`), the SAE's further (`sae_stronger`), or the
    paired interval cannot tell them apart (`level`); `sae_not_stronger` lists the first and
    the last: where the SAE does not beat PCA."""
    out: dict[str, Any] = {"n_concepts": int(table["concept"].nunique()), "by_strength": {}}
    for s, g in table.groupby("strength", sort=True):
        entry: dict[str, Any] = {}
        for method in ("sae", "pca"):
            entry[f"{method}_delta"] = float(g.loc[g["method"] == method, "delta"].mean())
            rnd = g[(g["method"] == "random") & (g["control_for"] == method)]
            if len(rnd):
                entry[f"random_{method}_delta"] = float(rnd["delta"].mean())
            entry[f"{method}_other_abs_delta"] = float(
                g.loc[g["method"] == method, "other_abs_delta"].mean()
            )
        pca = g[g["method"] == "pca"]
        who = {r.concept: stronger(r.diff_lo, r.diff_hi, float(s)) for r in pca.itertuples()}
        entry["pca_stronger"] = sorted(c for c, w in who.items() if w == "pca")
        entry["sae_stronger"] = sorted(c for c, w in who.items() if w == "sae")
        entry["level"] = sorted(c for c, w in who.items() if w == "level")
        entry["sae_not_stronger"] = sorted(c for c, w in who.items() if w != "sae")
        out["by_strength"][f"{float(s):g}"] = entry
    return out
