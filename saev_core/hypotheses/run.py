"""Test hypotheses: run each against its controls, decide, and write the table.

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

`plan` turns an `intervene` section into hypotheses (the batch, then the hand-written ones);
`write_results` writes results.parquet and specificity.parquet.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saev_core.hypotheses.config import Hypothesis
from saev_core.hypotheses.figures import before_after_figure
from saev_core.hypotheses.measure import (
    _classification_metrics,
    _control_summary,
    _effects,
    _segmentation_metrics,
    _specificity,
)
from saev_core.hypotheses.readers import Cache, _edit, _scope
from saev_core.hypotheses.selection import (
    Choice,
    batch_hypotheses,
    best_features,
    frequency_matched_sets,
)
from saev_core.intervene.splicing import Splice, random_direction
from saev_core.verdicts import (
    adjust,
    against_controls,
    resample_counts,
    resolve_alternative,
    sign_flips,
    verdict,
)


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
