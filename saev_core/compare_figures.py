"""One figure per question of the backbone comparison (issue 15 point 7), from its warehouse.

`make_figures` opens `warehouse/compare.duckdb` read-only and runs each question's named query
the way `saev sql` runs it (`saev_core.warehouse.run_query`: sandboxed, parameters bound), then
draws one matplotlib figure (Agg) per question. A figure's title asks the question and gives the
answer its rows hold; 95% intervals, where the query has them, are error bars.

Each figure is named after its query (sql/queries/<name>.sql) and asks:
- `compare_backbones`: how well does the best SAE feature detect each concept in each form, per
  backbone, beside the best feature on labels shuffled across images?
- `cross_form_features`: does one feature detect a concept across its forms?
- `semantic_probe`: does each concept's best feature beat a random feature on image F1?
- `sae_vs_baselines`: do simpler bases of the same activations (neurons, PCA, ICA, ...) detect
  the concepts as well as the SAE?
- `seed_stability`: do SAEs trained with other seeds find the same features?
- `probe_by_form`: does a linear probe on the backbone read each concept in each form?
- `pca_vs_sae_intervention`: does an edit along the best PCA direction move the concept's logit
  like the SAE feature's?

The last two come from stages that may not have run yet (or a warehouse built before their
sources existed): when their query is missing, fails, or returns no rows the figure is skipped
with the reason printed and kept in the report, so the stage works as the pieces land. The
first five must work.

Outputs: `<out_dir>/<name>.png`, and `<plots_dir>/<name>.json` the figure's data for
`dvc plots`: the query's rows as `saev sql -f json` prints them, each with one more field,
`plot_label`, naming the row in a plot (DVC's bar templates need one distinct category per bar).
A skipped figure's older files are removed, so neither folder shows a stale answer.

Tracking reaches this module as a callback (`tracker(pngs, data_files, metrics, params)`,
called unless `log_mlflow` is false); `flows.compare.mlflow_tracker` is the one the stage passes:
MLflow experiment `compare`, run `figures` (the flows' tracking URI and provenance tags), the
PNGs and JSON as artifacts, the headline numbers of `headline_metrics` as metrics.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from saev_core.config import from_dict
from saev_core.plots import _plt

Rows = list[dict[str, Any]]
FORM_ORDER = ("filled", "outline", "word")
KIND_ORDER = ("trained", "trained_vs_random", "random")
INTERVENTION_METHODS = ("sae", "pca", "random_sae", "random_pca", "random")
FIGURES = (
    "compare_backbones",
    "cross_form_features",
    "semantic_probe",
    "sae_vs_baselines",
    "seed_stability",
    "probe_by_form",
    "pca_vs_sae_intervention",
)
"Every figure, in the order drawn; each is named after the query it draws."
OPTIONAL = ("probe_by_form", "pca_vs_sae_intervention")
"Figures skipped (not failed) while their query is missing or has no rows."


@dataclass(frozen=True)
class FiguresConfig:
    """params.yaml `compare.figures` (less `out_dir`, which the flow passes apart)."""

    figures: tuple[str, ...] = FIGURES
    """Which figures to draw (names in FIGURES)."""
    min_auroc: float = 0.9
    """cross_form_features: AUROC a feature needs in each form."""
    min_forms: int = 2
    """cross_form_features: forms it must reach that in."""
    level: Literal["image", "patch"] = "image"
    """cross_form_features: image-level (the image's highest patch code) or patch-level AUROC."""
    alpha: float = 0.05
    """semantic_probe: significance level after Holm's adjustment over its rows."""
    kind: Literal["concept", "concept_form", "form", "all"] = "concept"
    """sae_vs_baselines: which labels the methods are compared on."""
    strength: float = -2.0
    """pca_vs_sae_intervention: the edit strength shown (x the unit's max activation)."""
    dpi: int = 100
    """Resolution of the PNGs."""
    log_mlflow: bool = True
    """Log the figures, their data and headline numbers to MLflow (off in tests)."""
    experiment: str = "compare"
    """MLflow experiment."""
    run_name: str = "figures"
    """MLflow run name."""
    root: str | None = None
    """Project root the warehouse's paths are relative to (default: the one recorded at build)."""
    sql_dir: str | None = None
    """SQL directory, relative to the root (default: the one recorded at build)."""

    def __post_init__(self) -> None:
        if isinstance(self.figures, str):
            raise ValueError(f"figures must be a list of names, got {self.figures!r}")
        unknown = sorted(set(self.figures) - set(FIGURES))
        if unknown or not self.figures:
            raise ValueError(f"figures: unknown {unknown or 'none given'}; choose from {FIGURES}")
        if not 0.0 <= self.min_auroc <= 1.0:
            raise ValueError(f"min_auroc must lie in [0, 1], got {self.min_auroc}")
        if self.min_forms < 1:
            raise ValueError(f"min_forms must be >= 1, got {self.min_forms}")
        if self.level not in ("image", "patch"):
            raise ValueError(f"level must be image or patch, got {self.level!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.kind not in ("concept", "concept_form", "form", "all"):
            raise ValueError(f"kind must be concept, concept_form, form or all, got {self.kind!r}")
        if not 20 <= self.dpi <= 600:
            raise ValueError(f"dpi must lie in [20, 600], got {self.dpi}")

    def query_params(self, name: str) -> dict[str, Any]:
        """The parameters figure `name` binds in its query (the query's own defaults otherwise)."""
        return {
            "cross_form_features": {
                "min_auroc": self.min_auroc, "min_forms": self.min_forms, "level": self.level,
            },
            "semantic_probe": {"alpha": self.alpha},
            "sae_vs_baselines": {"kind": self.kind},
            "pca_vs_sae_intervention": {"strength": self.strength},
        }.get(name, {})  # fmt: skip


Tracker = Callable[[list[Path], list[Path], dict[str, float], dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# small helpers


def _num(x: Any) -> float:
    """A row value as a float (a JSON null, from SQL null or NaN, is NaN)."""
    return math.nan if x is None else float(x)


def _ordered(values: Any, first: Sequence[str] = ()) -> list[str]:
    """The distinct values, those in `first` in its order, then the rest sorted."""
    seen = {v for v in values if v is not None}
    return [v for v in first if v in seen] + sorted(seen - set(first))


def _colours(backbones: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    return {b: cmap(i % 10) for i, b in enumerate(backbones)}


def _err(values: Sequence[float], lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """Asymmetric error bars from an interval; 0 where the interval is unknown."""
    v, lo_, hi_ = (np.asarray(a, dtype=np.float64) for a in (values, lo, hi))
    return np.nan_to_num(np.stack([np.maximum(v - lo_, 0), np.maximum(hi_ - v, 0)]), nan=0.0)


def _mean(xs: Sequence[float]) -> float:
    a = np.asarray([x for x in xs if math.isfinite(x)], dtype=np.float64)
    return float(a.mean()) if len(a) else math.nan


def _key(*parts: Any) -> str:
    """An MLflow metric key: parts joined by '/', odd characters replaced."""
    return "/".join(re.sub(r"[^\w.\- ]", "_", str(p)) for p in parts)


def _dodge(i: int, n: int, width: float = 0.8) -> float:
    return (i - (n - 1) / 2) * width / max(n, 1)


# ---------------------------------------------------------------------------------------------
# the figures: each takes the query's rows (JSON records) and returns (figure, title)


def _by_form(
    rows: Rows,
    value: str,
    lo: str,
    hi: str,
    question: str,
    ylabel: str,
    marker: dict[tuple[str, str, str], float] | None = None,
    marker_label: str = "",
):
    """One panel per form, concepts along x, backbones side by side with their intervals, and
    a grey tick per point at `marker[(backbone, concept, form)]` where given."""
    plt = _plt()
    forms = _ordered((r["form"] for r in rows), FORM_ORDER)
    concepts = _ordered(r["concept"] for r in rows)
    backbones = _ordered(r["backbone"] for r in rows)
    colour = _colours(backbones)
    means: dict[str, dict[str, float]] = {}
    fig, axes = plt.subplots(
        1, len(forms), figsize=(max(6.4, 0.9 + 0.45 * max(len(concepts), 4) * len(forms)), 3.8),
        dpi=100, sharey=True, squeeze=False,
    )  # fmt: skip
    for ax, form in zip(axes[0], forms, strict=True):
        for j, b in enumerate(backbones):
            rs = {r["concept"]: r for r in rows if r["form"] == form and r["backbone"] == b}
            cs = [c for c in concepts if c in rs]
            xs = [concepts.index(c) + _dodge(j, len(backbones)) for c in cs]
            v = [_num(rs[c][value]) for c in cs]
            means.setdefault(form, {})[b] = _mean(v)
            err = _err(v, [_num(rs[c][lo]) for c in cs], [_num(rs[c][hi]) for c in cs])
            ax.errorbar(xs, v, yerr=err, fmt="o", ms=4, capsize=2, lw=1, color=colour[b],
                        label=f"{b} (mean {means[form][b]:.2f})")  # fmt: skip
            if marker:
                m = [marker.get((b, c, form), math.nan) for c in cs]
                ax.scatter(xs, m, marker="_", s=90, color="0.35", zorder=3,
                           label=marker_label if j == 0 else None)  # fmt: skip
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_xlim(-0.6, len(concepts) - 0.4)
        ax.set_title(form, fontsize=9)
        ax.set_xticks(range(len(concepts)), concepts, fontsize=7, rotation=45, ha="right")
        ax.legend(fontsize=6, loc="best")
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    best = []
    for form, m in means.items():
        finite = {b: v for b, v in m.items() if math.isfinite(v)}
        if finite:
            top = max(finite, key=finite.__getitem__)
            best.append(f"{form}: {top} {finite[top]:.2f}")
    title = f"{question}\nhighest mean AUROC per form - " + ("; ".join(best) or "no values")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig, title


def fig_compare_backbones(rows: Rows, **_: Any):
    """Best SAE feature's test AUROC per concept x form (95% bootstrap CI), one panel per form,
    backbones side by side; the grey tick is the best AUROC any feature reaches on the label
    shuffled across images (the chance level for the best of d_sae features)."""
    control = {(r["backbone"], r["concept"], r["form"]): _num(r["control_image_auroc"])
               for r in rows}  # fmt: skip
    return _by_form(
        rows, "auroc_test", "ci_lo", "ci_hi",
        "Does one SAE feature detect each concept in each form, and on which backbone?",
        "best feature's test AUROC (95% CI)", control, "shuffled-label control",
    )  # fmt: skip


def fig_probe_by_form(rows: Rows, sae_rows: Rows | None = None, **_: Any):
    """The linear probe's test AUROC per concept x form (95% CI), beside the best SAE feature's
    (grey tick) when compare_backbones' rows are at hand."""
    sae = {(r["backbone"], r["concept"], r["form"]): _num(r["auroc_test"])
           for r in sae_rows or []}  # fmt: skip
    return _by_form(
        rows, "auroc", "auroc_lo", "auroc_hi",
        "Does a linear probe on the backbone read each concept in each form?",
        "probe's test AUROC (95% CI)", sae or None, "best SAE feature",
    )  # fmt: skip


def fig_cross_form_features(rows: Rows, cfg: FiguresConfig | None = None, **_: Any):
    """Per backbone the share of concepts with a cross-form feature (left), and per backbone x
    concept the best such feature's weakest-form AUROC, its number and forms (right)."""
    plt = _plt()
    cfg = cfg or FiguresConfig()
    backbones = _ordered(r["backbone"] for r in rows)
    concepts = _ordered(r["concept"] for r in rows)
    cell = {(r["backbone"], r["concept"]): r for r in rows}
    colour = _colours(backbones)
    fig, (ax, hm) = plt.subplots(
        1, 2, figsize=(3 + 0.8 * max(len(concepts), 4), 1.2 + 0.55 * max(len(backbones), 3)),
        dpi=100, gridspec_kw={"width_ratios": [1, max(len(concepts), 2) / 2]},
    )  # fmt: skip
    answer = []
    for i, b in enumerate(backbones):
        rs = [r for r in rows if r["backbone"] == b]
        found = [r["concept"] for r in rs if (r["n_features"] or 0) > 0]
        share = len(found) / len(rs) if rs else math.nan
        ax.barh(i, share, color=colour[b])
        ax.text(share + 0.02, i, f"{len(found)}/{len(rs)}", va="center", fontsize=7)
        answer.append(f"{b} {len(found)}/{len(rs)}" + (f" ({', '.join(found)})" if found else ""))
    ax.set_yticks(range(len(backbones)), backbones, fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.invert_yaxis()
    ax.set_xlabel("share of concepts", fontsize=8)
    m = np.full((len(backbones), len(concepts)), np.nan)
    for i, b in enumerate(backbones):
        for j, c in enumerate(concepts):
            r = cell.get((b, c))
            if r is None or not r["n_features"]:
                continue
            m[i, j] = _num(r["best_min_auroc"])
            forms = "+".join(r["best_forms"] or [])
            hm.text(j, i, f"f{r['best_feature']}\n{forms}\n({r['n_features']})", ha="center",
                    va="center", fontsize=5.5)  # fmt: skip
    im = hm.imshow(m, cmap="viridis", vmin=cfg.min_auroc, vmax=1.0, aspect="auto")
    hm.set_xticks(range(len(concepts)), concepts, fontsize=7, rotation=45, ha="right")
    hm.set_yticks(range(len(backbones)), backbones, fontsize=7)
    hm.set_title(
        "best such feature, its forms, (how many);\ncolour: its weakest form's AUROC", fontsize=7
    )
    fig.colorbar(im, ax=hm, shrink=0.8)
    title = (
        f"Does one SAE feature detect a concept in >= {cfg.min_forms} of its forms "
        f"({cfg.level} AUROC >= {cfg.min_auroc:g} in each)?\n" + "; ".join(answer)
    )
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig, title


def fig_semantic_probe(rows: Rows, cfg: FiguresConfig | None = None, **_: Any):
    """Per backbone (a panel) and concept: the best feature's test image F1 (chosen on val)
    beside the mean of the other features (grey); `*` marks significance after Holm."""
    plt = _plt()
    cfg = cfg or FiguresConfig()
    backbones = _ordered(r["backbone"] for r in rows)
    concepts = _ordered(r["concept"] for r in rows)
    colour = _colours(backbones)
    fig, axes = plt.subplots(
        1, len(backbones),
        figsize=(max(6.4, 0.8 + 0.4 * max(len(concepts), 4) * len(backbones)), 3.4),
        dpi=100, sharey=True, squeeze=False,
    )  # fmt: skip
    answer = []
    for ax, b in zip(axes[0], backbones, strict=True):
        rs = {r["concept"]: r for r in rows if r["backbone"] == b}
        x = np.arange(len(concepts))
        f1 = [_num(rs[c]["test_f1"]) if c in rs else math.nan for c in concepts]
        rnd = [_num(rs[c]["random_f1"]) if c in rs else math.nan for c in concepts]
        ax.bar(x - 0.2, f1, 0.4, color=colour[b], label="best feature")
        ax.bar(x + 0.2, rnd, 0.4, color="0.7", label="random feature (mean)")
        n_sig = 0
        for i, c in enumerate(concepts):
            if c in rs and rs[c]["significant"]:
                n_sig += 1
                ax.text(i - 0.2, np.nan_to_num(f1[i]) + 0.02, "*", ha="center", fontsize=10)
        answer.append(f"{b} {n_sig}/{len(rs)}")
        ax.set_title(b, fontsize=9)
        ax.set_xticks(x, concepts, fontsize=7, rotation=45, ha="right")
        ax.set_ylim(0, 1.1)
        ax.legend(fontsize=6, loc="upper right")
    axes[0][0].set_ylabel("test image F1 (threshold chosen on val)", fontsize=8)
    title = (
        "Does each concept's best feature beat a random feature on image F1?\n"
        f"significant after Holm (alpha {cfg.alpha:g}, *): " + "; ".join(answer)
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig, title


def fig_sae_vs_baselines(rows: Rows, cfg: FiguresConfig | None = None, **_: Any):
    """Left: mean test AUROC of each method's best unit per label (whiskers: min to max over the
    labels), per backbone. Right: on how many labels each baseline beats, ties or loses to the
    SAE (the paired bootstrap CI of its AUROC minus the SAE's above, across or below 0)."""
    plt = _plt()
    cfg = cfg or FiguresConfig()
    backbones = _ordered(r["backbone"] for r in rows)
    methods = _ordered((r["method"] for r in rows), ("sae",))
    colour = _colours(backbones)
    cell = {(r["backbone"], r["method"]): r for r in rows}
    pairs = [(b, m) for b in backbones for m in methods if m != "sae" and (b, m) in cell]
    fig, (ax, cnt) = plt.subplots(
        1, 2, figsize=(9, 1.2 + 0.3 * max(len(methods) * len(backbones), len(pairs), 6) / 2),
        dpi=100,
    )  # fmt: skip
    for j, b in enumerate(backbones):
        rs = [cell[(b, m)] for m in methods if (b, m) in cell]
        y = [methods.index(r["method"]) + _dodge(j, len(backbones)) for r in rs]
        v = [_num(r["mean_auroc"]) for r in rs]
        err = _err(v, [_num(r["min_auroc"]) for r in rs], [_num(r["max_auroc"]) for r in rs])
        ax.errorbar(v, y, xerr=err, fmt="o", ms=4, capsize=2, lw=1, color=colour[b], label=b)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("mean test AUROC over labels (whiskers: min-max)", fontsize=8)
    ax.legend(fontsize=7)
    left = np.zeros(len(pairs))
    for key, name, c in (("n_better_than_sae", "beats the SAE", "#cc3311"),
                         ("n_level_with_sae", "level with it", "0.7"),
                         ("n_worse_than_sae", "loses to it", "#4477aa")):  # fmt: skip
        n = np.array([np.nan_to_num(_num(cell[p][key])) for p in pairs])
        cnt.barh(range(len(pairs)), n, left=left, color=c, label=name)
        left += n
    cnt.set_yticks(range(len(pairs)), [f"{b} {m}" for b, m in pairs], fontsize=7)
    cnt.invert_yaxis()
    cnt.set_xlabel("labels (paired bootstrap 95% CI of AUROC - SAE's)", fontsize=8)
    cnt.legend(fontsize=6, loc="lower right")
    answer = []
    for b in backbones:
        sae = _num(cell[(b, "sae")]["mean_auroc"]) if (b, "sae") in cell else math.nan
        ahead = [m for m in methods if m != "sae" and (b, m) in cell
                 and _num(cell[(b, m)]["mean_auroc"]) > sae]  # fmt: skip
        answer.append(f"{b} SAE {sae:.2f}, ahead of it: {', '.join(ahead) or 'none'}")
    title = (
        f"Do simpler bases of the same activations detect the concepts ({cfg.kind} labels) as "
        "well as the SAE?\n" + "; ".join(answer)
    )
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig, title


def fig_seed_stability(rows: Rows, **_: Any):
    """Per backbone and kind of pair: the mean Hungarian-matched decoder cosine (left; dashed:
    sqrt(2 ln d_sae / d_model), what matching random unit vectors reaches) and the matched
    features' mean activation correlation (right)."""
    plt = _plt()
    backbones = _ordered(r["backbone"] for r in rows)
    kinds = _ordered((r["kind"] for r in rows), KIND_ORDER)
    colour = _colours(backbones)
    cell = {(r["backbone"], r["kind"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100, sharey=True)
    for ax, key, label in ((axes[0], "mean_cos", "matched decoder cosine"),
                           (axes[1], "mean_corr", "matched activation correlation")):  # fmt: skip
        for j, b in enumerate(backbones):
            ks = [k for k in kinds if (b, k) in cell]
            xs = [kinds.index(k) + _dodge(j, len(backbones)) for k in ks]
            v = [_num(cell[(b, k)][key]) for k in ks]
            ax.bar(xs, v, 0.8 / len(backbones), color=colour[b], label=b)
            for x, k, y in zip(xs, ks, v, strict=True):
                ax.text(x, np.nan_to_num(y) + 0.01, f"n={cell[(b, k)]['n_pairs']}",
                        ha="center", fontsize=5)  # fmt: skip
            if key == "mean_cos" and ks:
                scale = _num(cell[(b, ks[0])]["random_cosine_scale"])
                ax.axhline(
                    scale,
                    color=colour[b],
                    ls="--",
                    lw=0.8,
                    label=f"{b}: random matching, sqrt(2 ln d_sae / d_model)",
                )
        ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
        ax.set_title(f"mean {label}", fontsize=8)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("mean over pairs", fontsize=8)
    answer = [f"{b} {_num(cell[(b, 'trained')]['trained_minus_random']):+.2f}"
              for b in backbones if (b, "trained") in cell]  # fmt: skip
    title = (
        "Do SAEs trained with other seeds find the same features?\n"
        "matched decoder cosine, trained pairs minus random pairs: "
        + ("; ".join(answer) or "no pairs")
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig, title


def intervention_rows(rows: Rows) -> Rows:
    """pca_vs_sae_intervention's rows as one row per (backbone, strength, concept, method):
    as they are when the query has a `method` column (a random row's `control_for`, when given,
    makes its method `random_<control_for>`), else unfolded from side-by-side columns
    `<method>_delta`, `<method>_lo`, `<method>_hi` (method in INTERVENTION_METHODS; a method
    without `_lo`/`_hi` columns, such as a random control, gets no interval)."""
    if not rows:
        return []
    if "method" in rows[0]:
        out = []
        for r in rows:
            m = r["method"]
            if m == "random" and r.get("control_for"):
                m = f"random_{r['control_for']}"
            out.append(
                {
                    "backbone": r.get("backbone"),
                    "concept": r["concept"],
                    "method": m,
                    "strength": r.get("strength"),
                    "delta": r["delta"],
                    "lo": r.get("lo", r.get("ci_lo")),
                    "hi": r.get("hi", r.get("ci_hi")),
                }
            )
        return out  # fmt: skip
    methods = [m for m in INTERVENTION_METHODS if f"{m}_delta" in rows[0]]
    if not methods:
        raise ValueError(
            "pca_vs_sae_intervention: expected a `method` column or `<method>_delta` columns "
            f"(method in {INTERVENTION_METHODS}), got {sorted(rows[0])}"
        )
    return [{"backbone": r.get("backbone"), "concept": r["concept"], "method": m,
             "strength": r.get("strength"), "delta": r[f"{m}_delta"], "lo": r.get(f"{m}_lo"),
             "hi": r.get(f"{m}_hi")} for r in rows for m in methods]  # fmt: skip


def paired_rows(rows: Rows) -> Rows:
    """The rows that carry the control-adjusted pca minus sae paired over images (`adj_diff`,
    `adj_diff_lo`, `adj_diff_hi`: (pca - random_pca) - (sae - random_sae); the pca rows of a
    query with a `method` column), with `stronger` where the query says which edit moved the
    concept further beyond its control (sae, pca or level: CI and Holm-adjusted p)."""
    return [{"backbone": r.get("backbone"), "strength": r.get("strength"),
             "concept": r["concept"], "diff": r["adj_diff"], "diff_lo": r.get("adj_diff_lo"),
             "diff_hi": r.get("adj_diff_hi"), "stronger": r.get("stronger")}
            for r in rows if r.get("adj_diff") is not None
            and r.get("method", "pca") == "pca"]  # fmt: skip


def _where(backbone: Any, strength: Any) -> str:
    parts = (backbone or "", "" if strength is None else f"strength {_num(strength):g}")
    return " ".join(p for p in parts if p)


def fig_pca_vs_sae_intervention(rows: Rows, **_: Any):
    """Per concept, on the test images holding it: the mean change of the concept's logit when
    the best SAE feature, the best PCA direction or a norm-matched random direction (the
    control of each) is clamped, with the 95% bootstrap CI over images (top); below, where the
    query has it, the control-adjusted (pca - random_pca) - (sae - random_sae) paired over the
    same images with its CI, coloured by which edit moved the concept further beyond its own
    control (CI and Holm-adjusted p). One column of panels per backbone and strength."""
    plt = _plt()
    long, paired = intervention_rows(rows), paired_rows(rows)
    groups = list(dict.fromkeys((r["backbone"], r["strength"]) for r in long))
    concepts = _ordered(r["concept"] for r in long)
    methods = _ordered((r["method"] for r in long), INTERVENTION_METHODS)
    colour = {"sae": "#4477aa", "pca": "#ee7733", "level": "0.55"}
    n_rows = 2 if paired else 1
    fig, axes = plt.subplots(
        n_rows, len(groups), dpi=100, sharex=True, squeeze=False,
        figsize=(max(6.4, 1 + 0.5 * max(len(concepts), 4) * len(groups)), 1.2 + 2.8 * n_rows),
    )  # fmt: skip
    answer = []
    for col, (b, s) in enumerate(groups):
        ax = axes[0][col]
        for j, m in enumerate(methods):
            rs = {r["concept"]: r for r in long
                  if (r["backbone"], r["strength"], r["method"]) == (b, s, m)}  # fmt: skip
            cs = [c for c in concepts if c in rs]
            xs = [concepts.index(c) + _dodge(j, len(methods)) for c in cs]
            v = [_num(rs[c]["delta"]) for c in cs]
            err = _err(v, [_num(rs[c]["lo"]) for c in cs], [_num(rs[c]["hi"]) for c in cs])
            control = m.startswith("random")
            ax.errorbar(xs, v, yerr=err, fmt="x" if control else "o", ms=4, capsize=2, lw=1,
                        color="0.5" if control else colour.get(m, "black"),
                        label=f"{m if m != 'random' else 'random_sae'} (mean {_mean(v):+.2f})")  # fmt: skip
            if not control:
                answer.append(f"{m} {_mean(v):+.2f}")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlim(-0.6, len(concepts) - 0.4)
        ax.set_title(_where(b, s), fontsize=8)
        ax.legend(fontsize=6)
        ps = [r for r in paired if (r["backbone"], r["strength"]) == (b, s)]
        if ps:
            counts = {k: sum(r["stronger"] == k for r in ps) for k in ("sae", "pca", "level")}
            if any(r["stronger"] for r in ps):
                answer.append(f"SAE further on {counts['sae']}, PCA further on "
                              f"{counts['pca']}, level on {counts['level']} of {len(ps)} "
                              "concepts (beyond controls, paired CI, Holm)")  # fmt: skip
            ax2 = axes[1][col]
            xs = [concepts.index(r["concept"]) for r in ps]
            v = [_num(r["diff"]) for r in ps]
            err = _err(v, [_num(r["diff_lo"]) for r in ps], [_num(r["diff_hi"]) for r in ps])
            for x, y, e0, e1, r in zip(xs, v, err[0], err[1], ps, strict=True):
                ax2.errorbar([x], [y], yerr=[[e0], [e1]], fmt="s", ms=4, capsize=2, lw=1,
                             color=colour.get(r["stronger"], "black"))  # fmt: skip
            ax2.axhline(0, color="grey", lw=0.6)
        if ps or n_rows == 1:
            axes[-1][col].set_xticks(range(len(concepts)), concepts, fontsize=7, rotation=45,
                                     ha="right")  # fmt: skip
        if len(groups) > 1 and answer:
            answer[-1] += f" ({_where(b, s)})"
    axes[0][0].set_ylabel("mean change of the\nconcept's logit (95% CI)", fontsize=8)
    if paired:
        axes[1][0].set_ylabel("(pca - control) - (sae - control)\npaired 95% CI; blue: sae "
                              "further, orange: pca", fontsize=7)  # fmt: skip
    title = (
        "Does an edit along the best PCA direction move the concept's logit like the SAE "
        "feature's?\n" + "; ".join(answer)
    )
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig, title


DRAW = {
    "compare_backbones": fig_compare_backbones,
    "cross_form_features": fig_cross_form_features,
    "semantic_probe": fig_semantic_probe,
    "sae_vs_baselines": fig_sae_vs_baselines,
    "seed_stability": fig_seed_stability,
    "probe_by_form": fig_probe_by_form,
    "pca_vs_sae_intervention": fig_pca_vs_sae_intervention,
}


def plot_label(name: str, row: dict[str, Any]) -> str:
    """What a row is called in a `dvc plots` bar chart of figure `name`."""
    b = row.get("backbone")
    if name in ("compare_backbones", "probe_by_form"):
        return f"{row['concept']}:{row['form']} {b}"
    if name in ("cross_form_features", "semantic_probe"):
        return f"{row['concept']} {b}"
    if name == "sae_vs_baselines":
        return f"{b} {row['method']}"
    if name == "seed_stability":
        return f"{b} {row['kind']}"
    parts = (b, row.get("concept"), row.get("method"), row.get("strength"))
    return " ".join(str(p) for p in parts if p is not None)


# ---------------------------------------------------------------------------------------------
# headline numbers (MLflow metrics and the report)


def _where_key(backbone: Any, strength: Any) -> list[str]:
    return [
        p for p in (backbone, None if strength is None else f"strength_{_num(strength):g}") if p
    ]


def headline_metrics(name: str, rows: Rows) -> dict[str, float]:
    """The few numbers that answer figure `name`'s question, keyed `<figure>/<backbone>/...`."""
    out: dict[str, float] = {}
    if name in ("compare_backbones", "probe_by_form"):
        value = "auroc_test" if name == "compare_backbones" else "auroc"
        for b, f in {(r["backbone"], r["form"]) for r in rows}:
            rs = [r for r in rows if (r["backbone"], r["form"]) == (b, f)]
            out[_key(name, b, f, "mean_auroc")] = _mean([_num(r[value]) for r in rs])
            if name == "compare_backbones":
                margins = [_num(r[value]) - _num(r["control_image_auroc"]) for r in rs]
                out[_key(name, b, f, "mean_above_control")] = _mean(margins)
    elif name == "cross_form_features":
        for r in rows:
            out[_key(name, r["backbone"], "share_of_concepts")] = _num(r["share_of_concepts"])
    elif name == "semantic_probe":
        for b in {r["backbone"] for r in rows}:
            rs = [r for r in rows if r["backbone"] == b]
            out[_key(name, b, "n_significant")] = float(sum(bool(r["significant"]) for r in rs))
            out[_key(name, b, "mean_test_f1")] = _mean([_num(r["test_f1"]) for r in rs])
            out[_key(name, b, "mean_random_f1")] = _mean([_num(r["random_f1"]) for r in rs])
    elif name == "sae_vs_baselines":
        for r in rows:
            out[_key(name, r["backbone"], r["method"], "mean_auroc")] = _num(r["mean_auroc"])
    elif name == "seed_stability":
        for r in rows:
            out[_key(name, r["backbone"], r["kind"], "mean_cos")] = _num(r["mean_cos"])
            out[_key(name, r["backbone"], r["kind"], "mean_corr")] = _num(r["mean_corr"])
            if r["kind"] == "trained":
                out[_key(name, r["backbone"], "trained_minus_random")] = _num(
                    r["trained_minus_random"]
                )
    elif name == "pca_vs_sae_intervention":
        long, paired = intervention_rows(rows), paired_rows(rows)
        for b, s, m in {(r["backbone"], r["strength"], r["method"]) for r in long}:
            d = [_num(r["delta"]) for r in long
                 if (r["backbone"], r["strength"], r["method"]) == (b, s, m)]  # fmt: skip
            out[_key(name, *_where_key(b, s), m, "mean_delta")] = _mean(d)
        for b, s in {(r["backbone"], r["strength"]) for r in paired}:
            ps = [r for r in paired if (r["backbone"], r["strength"]) == (b, s)]
            out[_key(name, *_where_key(b, s), "mean_adj_pca_minus_sae")] = _mean(
                [_num(r["diff"]) for r in ps]
            )
            for k in ("sae", "pca", "level"):
                if any(r["stronger"] for r in ps):
                    n = sum(r["stronger"] == k for r in ps)
                    out[_key(name, *_where_key(b, s), f"n_{k}_further")] = float(n)
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ---------------------------------------------------------------------------------------------
# running the queries, writing the files, tracking


def _query_dir(db: Path, cfg: FiguresConfig) -> Path:
    """The `queries/` folder run_query reads for this warehouse (explicit, else recorded)."""
    import duckdb

    from saev_core.warehouse import _resolve_dirs

    con = duckdb.connect(str(db), read_only=True)
    try:
        return _resolve_dirs(con, cfg.root, cfg.sql_dir, db)[1] / "queries"
    finally:
        con.close()


def fetch(db: str | Path, name: str, cfg: FiguresConfig, query_dir: Path) -> Rows:
    """Query `name`'s rows as `saev sql -f json` gives them, binding only the parameters in
    `cfg.query_params(name)` that the query declares (its own defaults for the rest)."""
    from saev_core.warehouse import parse_query, run_query

    path = query_dir / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no query {name!r} in {query_dir} (not written yet?)")
    declared = {p.name for p in parse_query(path).params}
    params = {k: v for k, v in cfg.query_params(name).items() if k in declared}
    return json.loads(run_query(db, name, params, fmt="json", root=cfg.root, sql_dir=cfg.sql_dir))


def _fit_title(fig: Any) -> None:
    """Wrap the figure's title to its width (a long answer line would be cut at the edges)."""
    import textwrap

    st = getattr(fig, "_suptitle", None)
    if st is None:
        return
    # a character is about 0.6 of the font size wide; keep a tenth of the width as margin
    width = max(40, int(0.9 * fig.get_figwidth() * 72 / (0.6 * max(st.get_fontsize(), 1))))
    lines = st.get_text().split("\n")
    st.set_text("\n".join(textwrap.fill(line, width) for line in lines))
    fig.tight_layout()


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def make_figures(
    db: str | Path,
    out_dir: str | Path = "artifacts/figures/compare",
    plots_dir: str | Path = "metrics/compare/plots",
    tracker: Tracker | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Draw the comparison's figures from warehouse `db` (see the module docstring); `options`
    are FiguresConfig fields. Returns {figures: PNG names written, data: JSON names, skipped:
    {figure: reason}, titles: {figure: title}, metrics: headline numbers}."""
    cfg = from_dict(FiguresConfig, options, where="compare.figures")
    db, out, plots = Path(db), Path(out_dir), Path(plots_dir)
    if not db.exists():
        raise FileNotFoundError(
            f"warehouse not found: {db} (run `python -m flows.compare warehouse`)"
        )
    query_dir = _query_dir(db, cfg)
    plt = _plt()
    pngs: list[Path] = []
    data: list[Path] = []
    report: dict[str, Any] = {"figures": [], "data": [], "skipped": {}, "titles": {}, "metrics": {}}
    fetched: dict[str, Rows] = {}
    for name in [n for n in FIGURES if n in cfg.figures]:
        png, js = out / f"{name}.png", plots / f"{name}.json"
        try:
            rows = fetch(db, name, cfg, query_dir)
            if not rows:
                raise LookupError(f"query {name} returned no rows")
            if name == "pca_vs_sae_intervention":
                intervention_rows(rows)  # the columns it needs, checked before drawing
        except (FileNotFoundError, ValueError, LookupError) as e:
            if name not in OPTIONAL:
                raise
            print(f"compare figures: {name} skipped: {e}")
            report["skipped"][name] = str(e)
            for stale in (png, js):
                stale.unlink(missing_ok=True)
            continue
        fetched[name] = rows
        extra = {"sae_rows": fetched.get("compare_backbones")}
        fig, title = DRAW[name](rows, cfg=cfg, **extra)
        _fit_title(fig)
        try:
            _atomic_write(png, lambda p, f=fig: f.savefig(p, format="png", dpi=cfg.dpi))
        finally:
            plt.close(fig)
        records = [{**r, "plot_label": plot_label(name, r)} for r in rows]
        _atomic_write(js, lambda p, r=records: p.write_text(json.dumps(r, indent=1) + "\n"))
        pngs.append(png)
        data.append(js)
        report["figures"].append(png.name)
        report["data"].append(js.name)
        report["titles"][name] = title
        report["metrics"].update(headline_metrics(name, rows))
    if tracker is not None and cfg.log_mlflow:
        params = {k: v for k, v in asdict(cfg).items() if k not in ("root", "sql_dir")}
        tracker(pngs, data, report["metrics"], params)
    return report
