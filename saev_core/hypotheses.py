"""Hypotheses about SAE features as data, tested by editing the features inside the model.

A `Hypothesis` names the SAE, the feature(s) (ids, or the best feature for a label from the
stats Parquet or the warehouse, chosen on the stats' select split), the edit and its strengths
(a dose-response sweep), the scope, the task that reads the model (the demo classifier, or a
linear probe from `probes.py`), the target label and the evaluation images (by default the test
split; evaluating on the split the features were chosen on is refused unless
`allow_selection_split`; each row records `select_split`, `eval_split` and `held_out`).

`run_hypothesis` measures, for each strength, on the same images (one bootstrap index matrix
per hypothesis, so every interval is paired over images):
- the change in the target's probability (`delta`, 95% interval), the mean |change| of the
  others, the target-change rate (the target's prediction flips) and the other-change rate;
  for segmentation also per-class pixel change and the change in mIoU against the masks;
- the same for the controls (PAPER.md step 5): `n_control_features` edits of random features
  matched in firing frequency (`control_*`: their mean) and `n_control_directions` edits whose
  change of the residual stream is replaced by a random direction of the same norm
  (`direction_*`), plus the splice without edit (`noedit_*`, strength-independent). The edit and
  every control of a strength go through the model in one stacked forward pass
  (`intervene.stacked_splice`): the blocks before the SAE layer run once for all of them;
- the verdict statistics of `verdicts.against_controls`: the paired difference of the edit
  against the mean of all controls per image (`vs_control`, `vs_control_lo/hi`), its paired
  sign-flip permutation p-value (`p_value`, in the sign-aware `alternative`), the controls'
  spread (`control_median`, `control_lo/hi`), whether the edit's effect lies beyond that range
  in the tested direction (`beyond_controls`) and its rank among them (`control_rank_p`);
  `p_adjusted` (Holm or BH, `Settings.correction`) and `verdict` are set over the hypothesis's
  strengths, and `run_all` sets them again over every hypothesis x strength of the run;
- specificity (`Result.specificity`): the edit's change of every concept's prediction with a
  paired 95% interval (segmentation: also each class's share of pixels whose prediction
  changes); `off_target_abs_delta` on the row is the mean |change| over the other concepts.

`batch_hypotheses` makes one hypothesis per label (its best feature) so that one call tests them
all and writes one table.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from saev_core.geometry import read_geometry
from saev_core.intervene import (
    FeatureEdit,
    Splice,
    TokenLayout,
    measure_layout,
    patches_in_bbox,
    patches_in_mask,
    random_direction,
    scope_tokens,
    splice,
    stacked_splice,
)
from saev_core.verdicts import (
    ALTERNATIVES,
    CORRECTIONS,
    adjust,
    against_controls,
    boot_means,
    mean_ci,
    percentile_ci,
    ratio_ci,
    resample_counts,
    resolve_alternative,
    sign_flips,
    verdict,
)

CONDITIONS = {"edit": "", "random_feature": "control_", "random_direction": "direction_"}
HYPOTHESIS_SCOPES = ("all", "patches", "cls", "region", "target")


@dataclass(frozen=True)
class Hypothesis:
    """Editing `features` of the SAE at its layer changes the prediction of `target`."""

    target: str
    """The label (classifier/probe class) whose prediction the edit should change."""
    name: str = ""
    """Name of the experiment (default: target, features and edit)."""
    sae_dir: str = "artifacts/saes/demo"
    """The SAE; it is spliced at the layer in its cfg.json unless `layer` says otherwise."""
    stats_dir: str = "artifacts/stats/demo"
    """Its per-feature stats: max activation (dose), frequency (controls), label AUROC."""
    warehouse: str = ""
    """DuckDB file to resolve the best feature in (read-only); empty = the stats Parquet."""
    features: tuple[int, ...] = ()
    """Feature ids to edit; empty = the `n_features` best for `best_for` (default: target)."""
    best_for: str = ""
    """Label whose best features (by `select_by` AUROC) are edited when `features` is empty."""
    n_features: int = 1
    """How many best features to edit together."""
    select_by: Literal["patch", "image"] = "patch"
    """Rank features for `best_for` by patch-level or image-level AUROC."""
    layer: int | None = None
    """Block to splice at; None = the layer the SAE was trained on."""
    op: Literal["suppress", "clamp", "scale", "add"] = "clamp"
    """The edit (see `intervene.FeatureEdit`)."""
    relative: bool = True
    """clamp/add values are multiples of each feature's max observed activation."""
    strengths: tuple[float, ...] = (0.0, -2.0, -5.0)
    """Dose-response sweep: the edit's value at each step (suppress ignores it)."""
    scope: Literal["all", "patches", "cls", "region", "target"] = "all"
    """Tokens edited: all, patches, CLS, a `bbox` region, or the target's own pixels (masks)."""
    bbox: tuple[float, ...] = ()
    """For scope region: (x0, y0, x1, y1) in px of each original image."""
    task: Literal["classifier", "probe"] = "classifier"
    """What reads the model: the classifier's head, or a probe (`probe_dir`)."""
    model: str = "artifacts/backbone"
    """The classifier directory, or the backbone the probe was trained on."""
    probe_dir: str = ""
    """For task probe: a directory written by `probes.train_probes`."""
    data: str = "data/shapes"
    """Evaluation images (`load_records` source)."""
    split: str = "test"
    """Their split."""
    val_fraction: float = 0.1
    """A source without its own val split: the share held out as val (the extract stage's
    `val_fraction`, so that these images are split as the shards were)."""
    images: Literal["with_target", "all"] = "with_target"
    """Evaluate on the images labelled with the target, or on all of them."""
    max_images: int = 500
    """At most this many evaluation images."""
    alternative: Literal["auto", "less", "greater", "two-sided"] = "auto"
    """Tested direction of the effect on the target; auto: the run's `Settings.alternative`,
    and if that is auto too, by the edit (`verdicts.resolve_alternative`)."""
    allow_selection_split: bool = False
    """Allow evaluating on the split the features were chosen on (the row's `held_out` is then
    False); by default that is refused, since the effect would not be held out."""

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("a hypothesis needs a target label")
        if self.op not in ("suppress", "clamp", "scale", "add"):
            raise ValueError(f"op must be suppress|clamp|scale|add, got {self.op!r}")
        if self.scope not in HYPOTHESIS_SCOPES:
            raise ValueError(f"scope must be one of {'|'.join(HYPOTHESIS_SCOPES)}")
        if self.scope == "region" and len(self.bbox) != 4:
            raise ValueError("scope region needs bbox: [x0, y0, x1, y1] in image px")
        if self.task not in ("classifier", "probe"):
            raise ValueError(f"task must be classifier or probe, got {self.task!r}")
        if self.task == "probe" and not self.probe_dir:
            raise ValueError("task probe needs probe_dir")
        if self.images not in ("with_target", "all"):
            raise ValueError(f"images must be with_target or all, got {self.images!r}")
        if not self.strengths:
            raise ValueError("strengths: give at least one")
        if self.select_by not in ("patch", "image"):
            raise ValueError(f"select_by must be patch or image, got {self.select_by!r}")
        if self.n_features < 1 or self.max_images < 1:
            raise ValueError("n_features and max_images must be >= 1")
        if self.alternative not in ALTERNATIVES:
            raise ValueError(f"alternative must be one of {'|'.join(ALTERNATIVES)}")

    @property
    def title(self) -> str:
        return self.name or f"{self.target}:{self.op}"


@dataclass(frozen=True)
class Settings:
    """How experiments are measured (shared by every hypothesis of a run)."""

    controls: tuple[str, ...] = ("random_feature", "random_direction", "no_edit")
    """Controls to run besides the edit."""
    n_control_features: int = 10
    """Random-feature controls per hypothesis and strength (each matched in frequency)."""
    n_control_directions: int = 10
    """Random-direction controls per hypothesis and strength (each matched in norm)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the 95% intervals (one index matrix per hypothesis, shared by
    every condition and strength: all intervals are paired over images)."""
    n_permutations: int = 9999
    """Sign flips of the paired permutation test (exact when 2^n_images is no more)."""
    alternative: Literal["auto", "less", "greater", "two-sided"] = "auto"
    """Tested direction for hypotheses that leave theirs on auto (auto: by the edit)."""
    correction: Literal["holm", "bh"] = "holm"
    """Multiplicity correction over every hypothesis x strength of a run (Holm: family-wise
    error; bh: Benjamini-Hochberg false discovery rate)."""
    alpha: float = 0.05
    """A verdict is 'supported' when the adjusted p-value is below this (and the edit is beyond
    the controls' 95% range the tested way: `verdicts.verdict`)."""
    batch_size: int = 128
    """Images per forward pass."""
    stack_rows: int = 1024
    """Rows (images x conditions) per forward pass after the SAE layer, where the edit and its
    controls are stacked along the batch (`intervene.stacked_splice`)."""
    n_grid: int = 8
    """Images in each before/after grid (0: no figures)."""
    n_candidates: int = 32
    """Random-feature controls are drawn from this many alive features nearest in frequency."""
    seed: int = 0
    """Seed for control features, directions, bootstrap and permutations."""
    device: str = "cpu"
    """Where models run."""

    def __post_init__(self) -> None:
        bad = [
            c for c in self.controls if c not in ("random_feature", "random_direction", "no_edit")
        ]
        if bad:
            raise ValueError(f"unknown controls {bad}: use random_feature|random_direction|no_edit")
        if self.n_bootstrap < 10 or self.batch_size < 1 or self.n_candidates < 1:
            raise ValueError("n_bootstrap >= 10, batch_size >= 1 and n_candidates >= 1 needed")
        if self.n_control_features < 0 or self.n_control_directions < 0:
            raise ValueError("n_control_features and n_control_directions must be >= 0")
        if self.n_permutations < 100 or self.stack_rows < 1:
            raise ValueError("n_permutations >= 100 and stack_rows >= 1 needed")
        if self.alternative not in ALTERNATIVES:
            raise ValueError(f"alternative must be one of {'|'.join(ALTERNATIVES)}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {'|'.join(CORRECTIONS)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


# ---------------------------------------------------------------------------------------------
# what reads the model


@dataclass
class Reader:
    """A model plus the head whose probabilities experiments measure."""

    kind: Literal["multilabel", "softmax", "segmentation"]
    labels: list[str]
    blocks: Any
    layout: TokenLayout
    preprocess: Any
    forward: Any
    """pixel_values -> probabilities: [B, C], or [B, n_patches, C] for segmentation."""
    model: Any = None
    """The module `forward` runs: the classifier, or the backbone a probe reads."""
    probe: Any = None
    """The probe on `model`'s last hidden state (None: the classifier's own head)."""

    def probs(
        self, pixels: torch.Tensor, batch_size: int, splices=(), per_image=None
    ) -> np.ndarray:
        """Probabilities over all images; `per_image(splice, idx)` narrows per-image tokens."""
        out = []
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                sl = slice(i, i + batch_size)
                batch = [replace(s, tokens=_rows(s.tokens, sl)) for s in splices]
                with splice(self.blocks, *batch):
                    out.append(self.forward(pixels[sl]).float().cpu())
                for s, b in zip(splices, batch, strict=True):  # per-batch stats -> whole run
                    n = s.stats.get("n_tokens", 0) + b.stats.get("n_tokens", 0)
                    total = s.stats.get("dx_sum", 0.0) + b.stats.get("dx_norm", 0.0) * b.stats.get(
                        "n_tokens", 0
                    )
                    s.stats = {"n_tokens": n, "dx_sum": total, "dx_norm": total / max(1, n)}
        return torch.cat(out).numpy()

    def probs_stacked(
        self, pixels: torch.Tensor, conditions: list[Splice], rows: int
    ) -> np.ndarray:
        """[K, n_images, ...] probabilities under each of K conditions (one layer, one SAE),
        stacked along the batch after the SAE layer (`intervene.stacked_splice`): the blocks
        before it run once per image for a group of conditions, with at most `rows` images x
        conditions per forward pass (more than `rows` conditions go in groups of `rows`, one
        image at a time). Each condition's `stats` covers the whole run."""
        if rows < 1:
            raise ValueError(f"probs_stacked: rows must be >= 1, got {rows}")
        if len(conditions) > rows:
            parts = [
                self.probs_stacked(pixels, list(conditions[i : i + rows]), rows)
                for i in range(0, len(conditions), rows)
            ]
            return np.concatenate(parts, axis=0)
        k = len(conditions)
        b = max(1, rows // k)
        out, n_tok, dx_sum = [], [0] * k, [0.0] * k
        with torch.inference_mode():
            for i in range(0, len(pixels), b):
                sl = slice(i, i + b)
                m = len(pixels[sl])
                # one slice per distinct tokens tensor, so that conditions sharing an edit and
                # its tokens (the random directions) share its per-token norms in the hook
                sliced = {id(s.tokens): _rows(s.tokens, sl) for s in conditions}
                batch = [replace(s, tokens=sliced[id(s.tokens)], stats={}) for s in conditions]
                with stacked_splice(self.blocks, batch):
                    p = self.forward(pixels[sl]).float().cpu()
                if p.shape[0] != k * m:
                    raise ValueError(
                        f"stacked forward: {k} conditions x {m} images gave {p.shape[0]} rows; "
                        "this model's head does not keep the batch the blocks pass it"
                    )
                out.append(p.reshape(k, m, *p.shape[1:]))
                for c, s in enumerate(batch):
                    n_tok[c] += s.stats.get("n_tokens", 0)
                    dx_sum[c] += s.stats.get("dx_norm", 0.0) * s.stats.get("n_tokens", 0)
        for c, s in enumerate(conditions):
            s.stats = {
                "n_tokens": n_tok[c],
                "dx_sum": dx_sum[c],
                "dx_norm": dx_sum[c] / max(1, n_tok[c]),
            }
        return torch.cat(out, dim=1).numpy()

    def predictions(self, p: np.ndarray) -> np.ndarray:
        """Bool predictions: p > 0.5 (multi-label), else one-hot argmax ([B, C] or [B, P, C])."""
        if self.kind == "multilabel":
            return p > 0.5
        return np.eye(p.shape[-1], dtype=bool)[p.argmax(-1)]


def _rows(tokens, sl):
    return tokens[sl] if tokens is not None and tokens.dim() == 2 else tokens


def load_reader(h: Hypothesis, device: str = "cpu") -> Reader:
    """The classifier or probe of a hypothesis, with its blocks and token layout."""
    if h.task == "classifier":
        from transformers import AutoImageProcessor

        from saev_core.backbone import classifier_blocks, load_classifier

        model, id2label = load_classifier(h.model, device=device)
        processor = AutoImageProcessor.from_pretrained(h.model)
        blocks = classifier_blocks(model)

        def prep(images):
            return processor(images=images, return_tensors="pt")["pixel_values"].to(device)

        layout = measure_layout(model, blocks, prep(images=[_blank()]))
        geometry, why = read_geometry(processor)
        layout = replace(layout, geometry=geometry, geometry_error=why)
        multi = model.config.problem_type == "multi_label_classification"

        def forward(px):
            logits = model(pixel_values=px).logits
            return torch.sigmoid(logits) if multi else logits.softmax(-1)

        labels = [id2label[i] for i in sorted(id2label)]
        kind = "multilabel" if multi else "softmax"
        return Reader(kind, labels, blocks, layout, prep, forward, model=model)

    from saev_core.backbone import load_backbone, preprocess
    from saev_core.probes import load_probe

    bb = load_backbone(h.model, device=device, dtype="float32")
    probe, meta = load_probe(h.probe_dir)
    if meta.get("weights_sha256") not in (None, bb.weights_sha256):
        raise ValueError(f"probe {h.probe_dir} was trained on other weights than {h.model}")
    probe = probe.to(device)

    def forward(px):
        return probe.probs(bb.model(pixel_values=px).last_hidden_state)

    kind = "segmentation" if probe.task == "segmentation" else "multilabel"
    return Reader(
        kind,
        probe.classes,
        bb.blocks,
        TokenLayout.of_backbone(bb),
        lambda images: preprocess(bb, images),
        forward,
        model=bb.model,
        probe=probe,
    )


def _blank():
    from PIL import Image

    return Image.new("RGB", (32, 32), (128, 128, 128))


# ---------------------------------------------------------------------------------------------
# features and controls


class Choice(NamedTuple):
    """The features chosen for a label, on which split, and their scores on the other."""

    features: list[int]
    auroc: float
    """The first feature's `select_by` AUROC on the report split (what an experiment reports)."""
    select_split: str | None
    """The split the features were ranked on (None: stats from before splits were kept apart)."""
    select_auroc: float
    """The first feature's AUROC on the select split (the ranking score)."""
    report_split: str | None
    control_auroc: float
    """The best AUROC any feature reaches on the label shuffled across the select split's
    images: what the best of d_sae features reaches by chance (NaN: no control recorded)."""


def _check_warehouse_run(h: Hypothesis, run: str) -> None:
    """Refuse a warehouse whose run of this name was built from stats of another SAE (a stale
    build: `check_stats_match` checks the stats directory, not the warehouse's copy of it)."""
    from saev_core.sae_io import sae_sha256
    from saev_core.warehouse import run_query

    rows = json.loads(
        run_query(
            h.warehouse,
            "select json_extract_string(cfg_json, '$.sae_sha256') as sha from runs "
            "where run = $run",
            {"run": run},
            fmt="json",
        )
    )
    recorded = rows[0]["sha"] if rows else None
    if recorded and recorded != sae_sha256(h.sae_dir):
        raise ValueError(
            f"warehouse {h.warehouse}: run {run!r} was built from stats of the SAE with weights "
            f"sha256 {recorded[:12]}..., not {h.sae_dir} ({sae_sha256(h.sae_dir)[:12]}...): "
            "rebuild the warehouse (saev warehouse)"
        )


def best_features(h: Hypothesis, label: str, n: int) -> Choice:
    """The `n` features with the highest `h.select_by` AUROC for `label` on the stats' select
    split, with the first one's AUROC on the report split and on the select split, and the
    label's shuffled-label control (see `Choice`)."""
    nan = float("nan")
    if h.warehouse:
        from saev_core.warehouse import run_query

        run = stats_run(h.stats_dir)
        _check_warehouse_run(h, run)
        rows = json.loads(
            run_query(
                h.warehouse,
                "top_features_for_label",
                {"label": label, "run": run, "limit": str(n), "level": h.select_by},
                fmt="json",
            )
        )
        if not rows:
            raise ValueError(f"no feature statistics for label {label!r} in {h.warehouse}")
        key = "auroc" if h.select_by == "patch" else "image_auroc"
        r = rows[0]
        return Choice(
            [int(x["feature"]) for x in rows],
            _float(r.get(key)),
            r.get("select_split"),
            _float(r.get("select_auroc")),
            r.get("report_split"),
            _float(r.get("control_auroc")),
        )
    import pandas as pd

    stats_dir = Path(h.stats_dir)
    fl = pd.read_parquet(stats_dir / "feature_labels.parquet")
    key, other = ("auroc", "image_auroc") if h.select_by == "patch" else ("image_auroc", "auroc")
    if key not in fl:
        raise ValueError(f"{h.stats_dir}/feature_labels.parquet has no {key}: re-run stats")
    fl = fl[fl["label"] == label]
    select, report = _stats_splits(stats_dir)
    if "split" in fl and select is not None:
        if select not in set(fl["split"]):
            raise ValueError(
                f"{h.stats_dir}/feature_labels.parquet has no rows of its select split {select!r}"
            )
        selecting, reporting = fl[fl["split"] == select], fl[fl["split"] == report]
    else:  # stats from before splits were kept apart: one block, chosen and reported on it
        select = report = None
        selecting = reporting = fl
    # ties (colours reach image AUROC 1.0 with several features) go to the other level
    order = [key, other, "feature"] if other in fl else [key, "feature"]
    ranked = selecting.sort_values(order, ascending=[False] * (len(order) - 1) + [True])
    feats = ranked["feature"].head(n).astype(int).tolist()
    if not feats:
        raise ValueError(f"no feature statistics for label {label!r} in {h.stats_dir}")
    reported = reporting.loc[reporting["feature"] == feats[0], key]
    control = nan
    path = stats_dir / "label_controls.parquet"
    if path.exists() and select is not None:
        lc = pd.read_parquet(path)
        col = "control_auroc" if h.select_by == "patch" else "control_image_auroc"
        hit = lc.loc[(lc["split"] == select) & (lc["label"] == label), col]
        control = _float(hit.iloc[0]) if len(hit) else nan
    return Choice(
        feats,
        _float(reported.iloc[0]) if len(reported) else nan,
        select,
        _float(ranked[key].iloc[0]),
        report,
        control,
    )


def _float(x: Any) -> float:
    return float("nan") if x is None or x != x else float(x)


def _stats_splits(stats_dir: Path) -> tuple[str | None, str | None]:
    """(select_split, report_split) recorded in a stats directory's run.parquet, or Nones."""
    path = stats_dir / "run.parquet"
    if not path.exists():
        return None, None
    import pyarrow.parquet as pq

    run = pq.read_table(path).to_pylist()[0]
    return run.get("select_split"), run.get("report_split")


def stats_run(stats_dir: str) -> str:
    """The run name written with the stats (run.parquet), else the directory name."""
    path = Path(stats_dir) / "run.parquet"
    if path.exists():
        import pyarrow.parquet as pq

        return str(pq.read_table(path, columns=["run"]).column(0)[0])
    return Path(stats_dir).name


def frequency_matched(
    features: Any, targets: list[int], rng: np.random.Generator, n_candidates: int
) -> list[int]:
    """For each target feature, a random alive other feature among the `n_candidates` nearest in
    log10 firing frequency (so the control edits something that fires about as often)."""
    freq = features.set_index("feature")["freq"]
    alive = freq[(freq > 0) & ~freq.index.isin(targets)]
    if len(alive) == 0:
        raise ValueError("no alive feature left for a random-feature control")
    out = []
    for f in targets:
        dist = np.abs(np.log10(alive.to_numpy()) - np.log10(max(float(freq.get(f, 0.0)), 1e-12)))
        near = alive.index.to_numpy()[np.argsort(dist, kind="stable")[:n_candidates]]
        out.append(int(rng.choice([c for c in near if c not in out] or list(near))))
    return out


def frequency_matched_sets(
    features: Any, targets: list[int], rng: np.random.Generator, n_candidates: int, n_sets: int
) -> list[list[int]]:
    """`n_sets` random-feature controls for the `targets`: each a set of one alive other feature
    per target among its `n_candidates` nearest in log10 firing frequency, drawn without
    replacement across sets while the candidates last (then cycling through them again)."""
    freq = features.set_index("feature")["freq"]
    alive = freq[(freq > 0) & ~freq.index.isin(targets)]
    if len(alive) == 0:
        raise ValueError("no alive feature left for a random-feature control")
    perms = []
    for f in targets:
        dist = np.abs(np.log10(alive.to_numpy()) - np.log10(max(float(freq.get(f, 0.0)), 1e-12)))
        perms.append(
            rng.permutation(alive.index.to_numpy()[np.argsort(dist, kind="stable")][:n_candidates])
        )
    sets = []
    for k in range(n_sets):
        chosen: list[int] = []
        for perm in perms:
            cands = [int(perm[(k + o) % len(perm)]) for o in range(len(perm))]
            chosen.append(next((c for c in cands if c not in chosen), cands[0]))
        sets.append(chosen)
    return sets


# ---------------------------------------------------------------------------------------------
# measuring


def _effects(reader: Reader, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Per image and concept, the change in its probability [n, C] (segmentation: the image's
    mean change over patches)."""
    d = p1 - p0
    return d.mean(axis=1) if reader.kind == "segmentation" else d


def _classification_metrics(reader, p0, p1, j, W, prefix, ci=True) -> dict[str, Any]:
    y0, y1 = reader.predictions(p0), reader.predictions(p1)
    others = [k for k in range(p0.shape[1]) if k != j]
    d = p1[:, j] - p0[:, j]
    flip_t = (y0[:, j] != y1[:, j]).astype(float)
    flip_o = (y0[:, others] != y1[:, others]).mean(axis=1) if others else np.zeros(len(d))
    out = {"p_after": float(p1[:, j].mean()), "delta": float(d.mean())}
    out["target_change_rate"] = float(flip_t.mean())
    out["other_change_rate"] = float(flip_o.mean())
    if ci:
        out["delta_lo"], out["delta_hi"] = mean_ci(d, W)
        out["target_change_lo"], out["target_change_hi"] = mean_ci(flip_t, W)
        out["other_change_lo"], out["other_change_hi"] = mean_ci(flip_o, W)
    abs_o = np.abs(p1[:, others] - p0[:, others]).mean() if others else 0.0
    out["other_abs_delta"] = float(abs_o)
    return {prefix + k: v for k, v in out.items()}


def _miou_rows(conf_flat: np.ndarray, c: int) -> np.ndarray:
    """mIoU of each row of flattened [m, c * c] confusion matrices, as `probes.miou_from_confusion`
    defines it (classes without pixels in target or prediction do not count)."""
    conf = conf_flat.reshape(-1, c, c)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    valid = union > 0
    iou = np.where(valid, tp / np.where(valid, union, 1), 0.0)
    n_valid = valid.sum(1)
    return np.where(n_valid > 0, iou.sum(1) / np.maximum(1, n_valid), np.nan)


def _segmentation_metrics(reader, p0, p1, j, gt, W, prefix, ci=True) -> dict[str, Any]:
    """p: [n, patches, classes]; gt: [n, patches] class index."""
    c = p0.shape[-1]
    a0, a1 = p0.argmax(-1), p1.argmax(-1)
    d = (p1[..., j] - p0[..., j]).mean(axis=1)
    was_t = a0 == j
    out = {"p_after": float(p1[..., j].mean()), "delta": float(d.mean())}
    lost = (was_t & (a1 != j)).sum(1)
    out["target_change_rate"] = float(lost.sum() / max(1, was_t.sum()))
    moved = (~was_t & (a1 != a0)).sum(1)
    out["other_change_rate"] = float(moved.sum() / max(1, (~was_t).sum()))
    if ci:
        out["delta_lo"], out["delta_hi"] = mean_ci(d, W)
        out["target_change_lo"], out["target_change_hi"] = ratio_ci(lost, was_t.sum(1), W)
        out["other_change_lo"], out["other_change_hi"] = ratio_ci(moved, (~was_t).sum(1), W)
    others = [k for k in range(c) if k != j]
    out["other_abs_delta"] = float(np.abs(p1[..., others] - p0[..., others]).mean())
    # per class: change in the fraction of the image's pixels (patches) predicted as it
    frac0 = np.stack([(a0 == k).mean(1) for k in range(c)], 1)
    frac1 = np.stack([(a1 == k).mean(1) for k in range(c)], 1)
    if ci:
        out["class_pixel_change"] = json.dumps(
            dict(zip(reader.labels, np.round((frac1 - frac0).mean(0), 5).tolist(), strict=True))
        )
    conf0 = _confusions(a0, gt, c).reshape(len(a0), -1)
    conf1 = _confusions(a1, gt, c).reshape(len(a0), -1)
    m0, m1 = (float(_miou_rows(x.sum(0, keepdims=True), c)[0]) for x in (conf0, conf1))
    out["miou_before"], out["miou_after"], out["miou_delta"] = m0, m1, m1 - m0
    if ci:
        diffs = _miou_rows(W @ conf1, c) - _miou_rows(W @ conf0, c)
        out["miou_delta_lo"], out["miou_delta_hi"] = percentile_ci(diffs)
    return {prefix + k: v for k, v in out.items()}


def _control_summary(reader, p0, p1s, j, gt, W, prefix) -> dict[str, Any]:
    """The controls of one kind (p1s [K, n, ...]): their mean effect on the target, with the
    bootstrap interval of the per-image mean over the K controls, and their mean rates."""
    if len(p1s) == 0:
        return {}
    each = [
        _segmentation_metrics(reader, p0, p1, j, gt, W, "", ci=False)
        if reader.kind == "segmentation"
        else _classification_metrics(reader, p0, p1, j, W, "", ci=False)
        for p1 in p1s
    ]
    out = {k: float(np.mean([m[k] for m in each])) for k in each[0]}
    per_image = np.mean([_effects(reader, p0, p1)[:, j] for p1 in p1s], axis=0)
    out["delta_lo"], out["delta_hi"] = mean_ci(per_image, W)
    return {prefix + k: v for k, v in out.items()}


def _specificity(reader, p0, p1, j, W, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per concept: the edit's mean change of its probability, with a bootstrap 95%
    interval over the same resampled images; for segmentation also the share of the pixels
    predicted as that concept before whose prediction changes (`change_rate`), next to the edit's
    target and other change rates."""
    eff = _effects(reader, p0, p1)  # [n, C]
    lo, hi = percentile_ci(boot_means(W, eff))
    rows = []
    seg = reader.kind == "segmentation"
    if seg:
        a0, a1 = p0.argmax(-1), p1.argmax(-1)
        was_t = a0 == j
        t_rate = float((was_t & (a1 != j)).sum() / max(1, was_t.sum()))
        o_rate = float((~was_t & (a1 != a0)).sum() / max(1, (~was_t).sum()))
    for k, label in enumerate(reader.labels):
        row = {**base, "concept": label, "delta": float(eff[:, k].mean()),
               "delta_lo": float(lo[k]), "delta_hi": float(hi[k])}  # fmt: skip
        if seg:
            was = a0 == k
            row["change_rate"] = float((was & (a1 != a0)).sum() / max(1, was.sum()))
            row["target_change_rate"], row["other_change_rate"] = t_rate, o_rate
        rows.append(row)
    return rows


def _confusions(pred: np.ndarray, gt: np.ndarray, c: int) -> np.ndarray:
    """Per image [n, c, c] confusion matrices (target x prediction)."""
    flat = gt * c + pred
    return np.stack([np.bincount(f, minlength=c * c).reshape(c, c) for f in flat])


@dataclass
class EvalSet:
    """Evaluation images of a hypothesis, preprocessed, with the unedited predictions."""

    records: list
    images: list[np.ndarray]
    pixels: torch.Tensor
    p_before: np.ndarray
    gt: np.ndarray | None = None
    """Segmentation: ground-truth class per patch [n, n_patches]."""


@dataclass
class Cache:
    """Models, SAEs, stats and image sets shared by the hypotheses of one run."""

    settings: Settings = field(default_factory=Settings)
    readers: dict = field(default_factory=dict)
    saes: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)
    checked: set = field(default_factory=set)

    def reader(self, h: Hypothesis) -> Reader:
        key = (h.task, h.model, h.probe_dir)
        if key not in self.readers:
            self.readers[key] = load_reader(h, self.settings.device)
        return self.readers[key]

    def sae(self, sae_dir: str, model: str | None = None, stats_dir: str | None = None):
        """The SAE, after refusing a `model` it was not trained on and `stats_dir` stats computed
        from another SAE (`sae_io.check_sae_model` / `check_stats_match`)."""
        from saev_core.sae_io import check_sae_model, check_stats_match

        if model is not None and ("model", sae_dir, model) not in self.checked:
            check_sae_model(sae_dir, model)
            self.checked.add(("model", sae_dir, model))
        if stats_dir is not None and ("stats", sae_dir, stats_dir) not in self.checked:
            check_stats_match(stats_dir, sae_dir)
            self.checked.add(("stats", sae_dir, stats_dir))
        if sae_dir not in self.saes:
            from saev_core.sae import SAE

            self.saes[sae_dir] = SAE.load(sae_dir, device=self.settings.device).eval()
        return self.saes[sae_dir]

    def features(self, stats_dir: str):
        if stats_dir not in self.stats:
            import pandas as pd

            self.stats[stats_dir] = pd.read_parquet(Path(stats_dir) / "features.parquet")
        return self.stats[stats_dir]

    def evalset(self, h: Hypothesis, reader: Reader) -> EvalSet:
        key = (h.task, h.model, h.probe_dir, h.data, h.split, h.val_fraction)
        if key not in self.sets:
            from PIL import Image

            from saev_core.data import load_records, open_image

            records = load_records(h.data, [h.split], h.val_fraction)
            images = [np.asarray(open_image(r)) for r in records]
            pixels = reader.preprocess([Image.fromarray(im) for im in images])
            p = reader.probs(pixels, self.settings.batch_size)
            gt = None
            if reader.kind == "segmentation":
                from saev_core.probes import patch_targets

                lay = reader.layout
                gt = np.stack(
                    [
                        patch_targets(r, reader.labels, lay.grid, lay.geometry or lay.image_size)
                        for r in records
                    ]
                )
            self.sets[key] = EvalSet(records, images, pixels, p, gt)
        return self.sets[key]


def _scope(h: Hypothesis, reader: Reader, es: EvalSet, idx: np.ndarray) -> torch.Tensor:
    lay = reader.layout
    if h.scope in ("all", "patches", "cls"):
        return scope_tokens(lay, h.scope)
    if h.scope == "region":
        masks = [patches_in_bbox(lay, h.bbox, es.images[i].shape[:2]) for i in idx]
    else:  # the target's own pixels, from each image's mask
        from saev_core.data import open_mask

        masks = []
        for i in idx:
            r = es.records[i]
            values = [v for v, labs in r.mask_labels.items() if h.target in labs]
            m = np.isin(open_mask(r), values) if values else np.zeros(es.images[i].shape[:2], bool)
            masks.append(patches_in_mask(lay, m))
    return scope_tokens(lay, "region", np.stack(masks))


def _edit(h: Hypothesis, feats: list[int], strength: float, max_act: Any) -> FeatureEdit:
    acts = tuple(float(max_act.get(f, 0.0)) for f in feats)
    return FeatureEdit(h.op, tuple(feats), float(strength), acts if h.relative else None)


@dataclass
class Result:
    """One hypothesis: a row per strength, a before/after figure per strength, and the edit's
    change of every concept's prediction (`specificity`: a row per strength x concept)."""

    hypothesis: Hypothesis
    rows: list[dict[str, Any]]
    figures: list[Any]
    specificity: list[dict[str, Any]] = field(default_factory=list)


def decide(rows: list[dict[str, Any]], correction: str, alpha: float) -> None:
    """Adjust the rows' `p_value`s as one family (`verdicts.adjust`) and set `p_adjusted`,
    `correction`, `alpha` and `verdict` on each row, in place (`verdicts.verdict`: also needs
    the row's `beyond_controls`)."""
    adjusted = adjust([r.get("p_value", float("nan")) for r in rows], correction)
    for r, p in zip(rows, adjusted, strict=True):
        r["p_adjusted"], r["correction"], r["alpha"] = float(p), correction, float(alpha)
        r["verdict"] = verdict(
            p, alpha, r["delta"], r["vs_control"], r["alternative"], r["beyond_controls"]
        )


def run_hypothesis(h: Hypothesis, cache: Cache | None = None) -> Result:
    """Test `h` at every strength against its controls; see the module docstring. The rows'
    `p_adjusted` and `verdict` correct over this hypothesis's strengths only; `run_all` corrects
    over every hypothesis x strength of the run."""
    cache = cache or Cache()
    st = cache.settings
    reader = cache.reader(h)
    if h.target not in reader.labels:
        raise ValueError(f"target {h.target!r} is not a label of the {h.task} ({reader.labels})")
    j = reader.labels.index(h.target)
    sae = cache.sae(h.sae_dir, h.model, h.stats_dir)
    trained = sae.extra.get("layer")
    if h.layer is not None and trained is not None and int(h.layer) != int(trained):
        raise ValueError(
            f"{h.title}: layer {h.layer} asked, but the SAE {h.sae_dir} was trained on layer "
            f"{trained}: its codes mean nothing elsewhere (leave layer unset)"
        )
    layer = int(h.layer if h.layer is not None else trained or 0)
    nan = float("nan")
    choice = Choice(list(h.features), nan, None, nan, None, nan)
    if not h.features:
        choice = best_features(h, h.best_for or h.target, h.n_features)
    held_out = None if choice.select_split is None else choice.select_split != h.split
    if held_out is False and not h.allow_selection_split:
        raise ValueError(
            f"{h.title}: evaluating on split {h.split!r}, the split its features were chosen on "
            f"(stats select_split): the effect would not be held out; set split to another one "
            f"(the stats' report split is {choice.report_split!r}) or allow_selection_split: true"
        )
    es = cache.evalset(h, reader)
    feats_df = cache.features(h.stats_dir)
    feats = choice.features
    max_act = feats_df.set_index("feature")["max_act"]

    if h.images == "with_target":
        idx = np.array([i for i, r in enumerate(es.records) if h.target in r.labels], dtype=int)
    else:
        idx = np.arange(len(es.records))
    idx = idx[: h.max_images]
    if len(idx) == 0:
        raise ValueError(f"no {h.split} image of {h.data} is labelled {h.target!r}")
    pixels, p0 = es.pixels[idx], es.p_before[idx]
    gt = es.gt[idx] if es.gt is not None else None
    tokens = _scope(h, reader, es, idx)

    seed = [st.seed, zlib.crc32(h.title.encode())]
    rng = np.random.default_rng(seed)
    W = resample_counts(len(idx), st.n_bootstrap, rng)  # one draw of images for everything
    flips = sign_flips(len(idx), st.n_permutations, rng)
    n_feat = st.n_control_features if "random_feature" in st.controls else 0
    n_dir = st.n_control_directions if "random_direction" in st.controls else 0
    control_sets = (
        frequency_matched_sets(
            feats_df, feats, np.random.default_rng(seed), st.n_candidates, n_feat
        )
        if n_feat
        else []
    )
    directions = [
        random_direction(sae.cfg.d_model, zlib.crc32(repr([*seed, k]).encode()))
        for k in range(n_dir)
    ]

    def measure(p1, prefix):
        if reader.kind == "segmentation":
            return _segmentation_metrics(reader, p0, p1, j, gt, W, prefix)
        return _classification_metrics(reader, p0, p1, j, W, prefix)

    noedit = {}
    if "no_edit" in st.controls:
        p_same = reader.probs(pixels, st.batch_size, [Splice(layer, sae)])
        noedit = measure(p_same, "noedit_")
        noedit["noedit_max_abs_dp"] = float(np.abs(p_same - p0).max())

    strengths = (0.0,) if h.op == "suppress" else h.strengths
    rows, figures, specificity = [], [], []
    for s in strengths:
        edit = _edit(h, feats, s, max_act)
        conditions = [Splice(layer, sae, edit, tokens)]
        conditions += [Splice(layer, sae, _edit(h, cs, s, max_act), tokens) for cs in control_sets]
        conditions += [Splice(layer, sae, edit, tokens, direction=u) for u in directions]
        p1s = reader.probs_stacked(pixels, conditions, st.stack_rows)
        p_edit, p_feat, p_dir = p1s[0], p1s[1 : 1 + n_feat], p1s[1 + n_feat :]
        alt = resolve_alternative(
            h.op, s, h.alternative if h.alternative != "auto" else st.alternative
        )
        e = _effects(reader, p0, p_edit)[:, j]
        c = np.array([_effects(reader, p0, p1)[:, j] for p1 in p1s[1:]]).reshape(-1, len(idx))
        experiment = f"{h.title}@{s:g}"
        row: dict[str, Any] = {
            "experiment": experiment,
            "hypothesis": h.title,
            "concept": h.target,
            "task": h.task if reader.kind != "segmentation" else "probe:segmentation",
            "feature": feats[0],
            "features": ",".join(map(str, feats)),
            "control_feature": control_sets[0][0] if control_sets else None,
            "control_features": ";".join(",".join(map(str, cs)) for cs in control_sets),
            "n_control_features": n_feat,
            "n_control_directions": n_dir,
            "edit": h.op,
            "relative": h.relative,
            "strength": float(s),
            "scope": h.scope,
            "layer": layer,
            # chosen on select_split (select_auroc), reported on report_split (auroc), next to
            # the best AUROC of the target's shuffled-label control; evaluated on eval_split
            "auroc": choice.auroc,
            "select_split": choice.select_split,
            "select_auroc": choice.select_auroc,
            "report_split": choice.report_split,
            "control_auroc": choice.control_auroc,
            "eval_split": h.split,
            "held_out": held_out,
            "n_images": len(idx),
            "p_before": float(p0[..., j].mean()),
        }
        row.update(measure(p_edit, ""))
        row["dx_norm"] = conditions[0].stats.get("dx_norm", 0.0)
        row.update(_control_summary(reader, p0, p_feat, j, gt, W, "control_"))
        row.update(_control_summary(reader, p0, p_dir, j, gt, W, "direction_"))
        row.update(noedit)
        row.update(against_controls(e, c, alt, W, flips))
        base = {"experiment": experiment, "hypothesis": h.title, "edited_concept": h.target,
                "strength": float(s)}  # fmt: skip
        spec = _specificity(reader, p0, p_edit, j, W, base)
        others = [r["delta"] for r in spec if r["concept"] != h.target]
        row["off_target_abs_delta"] = float(np.mean(np.abs(others))) if others else 0.0
        rows.append(row)
        specificity += spec
        if st.n_grid:
            show = np.arange(min(st.n_grid, len(idx)))
            figures.append(
                before_after_figure(
                    [es.images[i] for i in idx[show]],
                    p0[show][..., j],
                    p_edit[show][..., j],
                    tokens[show] if tokens.dim() == 2 else tokens,
                    reader.layout,
                    f"{h.title}: p({h.target}) before → after {h.op} {feats} "
                    f"{'x max ' if h.relative and h.op in ('clamp', 'add') else ''}{s:g} "
                    f"at block {layer} (outlined: edited patches)",
                )
            )
    decide(rows, st.correction, st.alpha)
    return Result(h, rows, figures, specificity)


# ---------------------------------------------------------------------------------------------
# figures


def _figure(**kw: Any) -> Any:
    """A matplotlib `Figure` outside pyplot's registry (freed when dropped, never 'open')."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def before_after_figure(images, p_before, p_after, tokens, layout: TokenLayout, title: str):
    """One column per image (as the model sees it, when the layout knows the processor's crop),
    the edited patches outlined; above: the target's probability (or its mean over patches, for
    segmentation) before -> after. A bare `Figure`, not one pyplot keeps open: a run holds one
    per hypothesis x strength until it logs them (more than pyplot's 20 without a warning)."""
    n = len(images)
    fig = _figure(figsize=(1.8 * n, 2.3), dpi=100)
    axes = fig.subplots(1, n, squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = images[i]
        if layout.geometry is not None:  # the resized, cropped view the patch grid covers
            im = np.asarray(layout.geometry.view(im))
        h, w = im.shape[:2]
        ax.imshow(im)
        t = tokens[i] if tokens.dim() == 2 else tokens
        region = t[layout.n_prefix_tokens :].reshape(layout.grid).numpy().astype(float)
        if 0 < region.sum() < region.size:
            up = np.kron(region, np.ones((8, 8)))  # smooth enough for a clean outline
            ys = (np.arange(up.shape[0]) + 0.5) * h / up.shape[0]
            xs = (np.arange(up.shape[1]) + 0.5) * w / up.shape[1]
            ax.contour(xs, ys, up, levels=[0.5], colors="cyan", linewidths=1.2)
        if layout.has_cls and bool(t[0]):
            ax.text(1, 1, "CLS", color="cyan", fontsize=6, va="top")
        b, a = float(np.mean(p_before[i])), float(np.mean(p_after[i]))
        ax.set_title(f"{b:.2f} → {a:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def dose_response_figure(rows: list[dict[str, Any]]):
    """Change in the target's probability against strength per hypothesis, with 95% intervals;
    dashed: random-feature controls' mean, dotted: random-direction controls' mean, shaded: the
    2.5-97.5 percentile range of all controls' mean effects. A bare `Figure` (see
    `before_after_figure`)."""
    import matplotlib

    fig = _figure(figsize=(6.5, 3.8), dpi=100)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    for i, name in enumerate(sorted({r["hypothesis"] for r in rows})):
        rs = sorted((r for r in rows if r["hypothesis"] == name), key=lambda r: r["strength"])
        s = [r["strength"] for r in rs]
        d = np.array([r["delta"] for r in rs])
        err = np.array([d - [r["delta_lo"] for r in rs], [r["delta_hi"] for r in rs] - d])
        colour = cmap(i % 10)
        ax.errorbar(s, d, yerr=err, color=colour, marker="o", ms=3, lw=1, label=name)
        if "control_lo" in rs[0] and all(r["control_lo"] == r["control_lo"] for r in rs):
            lo, hi = [r["control_lo"] for r in rs], [r["control_hi"] for r in rs]
            ax.fill_between(s, lo, hi, color=colour, alpha=0.08, lw=0)
        if "control_delta" in rs[0]:
            ax.plot(s, [r["control_delta"] for r in rs], color=colour, ls="--", lw=0.8)
        if "direction_delta" in rs[0]:
            ax.plot(s, [r["direction_delta"] for r in rs], color=colour, ls=":", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("edit strength (multiple of the feature's max activation when relative)")
    ax.set_ylabel("mean change in p(target)")
    ax.set_title(
        "dose-response (dashed: random features, dotted: random directions, shaded: "
        "controls' 95% range)",
        fontsize=8,
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# batches


def batch_hypotheses(base: Hypothesis | dict[str, Any], labels: list[str]) -> list[Hypothesis]:
    """One hypothesis per label: its best feature, edited as `base` says, targeting that label."""
    fields = (
        base if isinstance(base, dict) else {k: getattr(base, k) for k in base.__dataclass_fields__}
    )
    out = []
    for label in labels:
        out.append(
            Hypothesis(
                **{**fields, "target": label, "best_for": label, "features": (), "name": label}
            )
        )
    return out


def write_results(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    run: str,
    specificity: list[dict[str, Any]] | None = None,
) -> Path:
    """results.parquet (one row per hypothesis x strength) and, when given, specificity.parquet
    (one row per hypothesis x strength x concept: `Result.specificity`), written atomically."""
    from saev_core.shards import atomic_write_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.parquet"
    atomic_write_table(_table(rows, run), path)
    if specificity is not None:
        atomic_write_table(_table(specificity, run), out_dir / "specificity.parquet")
    return path


def _table(rows: list[dict[str, Any]], run: str) -> Any:
    import pyarrow as pa

    # Every key of every row: segmentation rows carry mIoU columns that classifier rows lack,
    # and from_pylist alone would take the columns of the first row only.
    keys = list(dict.fromkeys(k for r in rows for k in ("run", *r)))
    return pa.Table.from_pylist([{k: {"run": run, **r}.get(k) for k in keys} for r in rows])


def plan(cfg: Any, cache: Cache) -> list[Hypothesis]:
    """The hypotheses of an `intervene` section: the batch (best feature of every label), then
    the hand-written ones."""
    out = []
    if cfg.batch:
        base = {**cfg.defaults(), "target": "?"}
        labels = list(cfg.concepts) or [
            lab for lab in cache.reader(Hypothesis(**base)).labels if lab != "background"
        ]
        out += batch_hypotheses(base, labels)
    return out + cfg.extra_hypotheses()


def run_all(
    hypotheses: list[Hypothesis], cache: Cache, on_result: Any = None, skip_missing: bool = True
) -> list[Result]:
    """Run every hypothesis, then correct their p-values over every hypothesis x strength of
    the run (`Settings.correction`, one family) and set each row's `p_adjusted` and `verdict`;
    then `on_result(result)` is called for each (tracking), so it sees the adjusted values. With
    `skip_missing`, a hypothesis whose label has no images or no statistics is reported and
    skipped rather than stopping the batch."""
    results = []
    for h in hypotheses:
        try:
            r = run_hypothesis(h, cache)
        except ValueError as e:
            if not skip_missing or not str(e).startswith(("no ", "target ")):
                raise
            print(f"intervene: skipping {h.title}: {e}")
            continue
        results.append(r)
    if not results:
        raise ValueError("no hypothesis could be tested (see the messages above)")
    decide(
        [row for r in results for row in r.rows], cache.settings.correction, cache.settings.alpha
    )
    if on_result is not None:
        for r in results:
            on_result(r)
    return results


def provenance(sae_dir: str, stats_dir: str) -> dict[str, str]:
    """Tags that tie an experiment to its SAE run and shard manifest."""
    import hashlib

    cfg = Path(sae_dir) / "cfg.json"
    extra = json.loads(cfg.read_text()).get("extra", {}) if cfg.exists() else {}
    return {
        "sae_dir": str(sae_dir),
        "sae_cfg_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.exists() else "",
        "manifest_sha256": str(extra.get("manifest_sha256", "")),
        "backbone_sha256": str(extra.get("backbone_sha256", "")),
        "stats_run": stats_run(stats_dir),
    }
