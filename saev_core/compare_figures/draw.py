"""The comparison's figures: each `fig_<name>` takes its query's rows (JSON records) and returns
(figure, title), the title asking the question and giving the answer the rows hold; `DRAW` maps
each figure name to its function.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from saev_core.compare_figures.figure_data import (
    FORM_ORDER,
    INTERVENTION_METHODS,
    KIND_ORDER,
    FiguresConfig,
    Rows,
    _colours,
    _dodge,
    _err,
    _mean,
    _num,
    _ordered,
    _where,
    intervention_rows,
    paired_rows,
)
from saev_core.plots import _plt

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
