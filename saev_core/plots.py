"""Figures the stages log: the feature-density histogram and before/after image grids.

Matplotlib with the non-interactive Agg backend; every function returns a `Figure` that the
caller saves or logs (and closes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def density_histogram(
    freq: np.ndarray,
    title: str = "feature density",
    dense_threshold: float = 0.01,
    dense_factor: float = 10.0,
):
    """Histogram of log10 firing frequency per feature; dead features counted apart.

    Two dense lines (see `training.dense_fractions`): the relative rule, `dense_factor` x the mean
    firing rate (L0 / d_sae), and the absolute one, `dense_threshold` of tokens.
    """
    plt = _plt()
    freq = np.asarray(freq, dtype=np.float64)
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    if len(alive):
        ax.hist(np.log10(alive), bins=40, color="#4477aa")
    rate = dense_factor * float(freq.mean()) if len(freq) else 0.0
    if rate > 0:
        ax.axvline(
            np.log10(rate),
            color="#cc3311",
            lw=1,
            label=f"dense: {dense_factor:g} x mean rate ({rate:.2%} of tokens)",
        )
    ax.axvline(
        np.log10(dense_threshold) if dense_threshold > 0 else -2,
        color="#cc3311",
        ls="--",
        lw=1,
        label=f"dense, absolute: {dense_threshold:.0%} of tokens",
    )
    ax.set_xlabel("log10 fraction of tokens where the feature fires")
    ax.set_ylabel("features")
    ax.set_title(f"{title}: {len(freq) - len(alive)} of {len(freq)} dead")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def before_after_grid(
    images: Sequence[np.ndarray],
    p_before: Sequence[float],
    p_after: Sequence[float],
    concept: str,
    heatmaps: Sequence[np.ndarray] | None = None,
    title: str = "",
):
    """One column per image: the image (with the edited feature's patch activations overlaid
    when `heatmaps` is given) and the concept's probability before -> after the edit."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.2), dpi=100, squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(images[i])
        if heatmaps is not None:
            h, w = images[i].shape[:2]
            # only where the feature fires, so the image stays readable elsewhere
            heat = np.ma.masked_where(heatmaps[i] <= 0, heatmaps[i])
            ax.imshow(heat, cmap="magma", alpha=0.5, extent=(0, w, h, 0), vmin=0)
        ax.set_title(f"{p_before[i]:.2f} → {p_after[i]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title or f"p({concept}) before → after", fontsize=9)
    fig.tight_layout()
    return fig


def dose_response(rows: Sequence[dict]):
    """Mean change in each concept's probability against edit strength, with 95% intervals;
    dashed lines are the random-feature controls."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    concepts = sorted({r["concept"] for r in rows})
    cmap = plt.get_cmap("tab10")
    from matplotlib.colors import is_color_like

    for i, concept in enumerate(concepts):
        # a colour concept is drawn in its own colour, the others in the default cycle
        colour = {"yellow": "goldenrod"}.get(concept, concept)
        colour = colour if is_color_like(colour) else cmap(i % 10)
        rs = sorted((r for r in rows if r["concept"] == concept), key=lambda r: r["strength"])
        s = [r["strength"] for r in rs]
        d = np.array([r["delta"] for r in rs])
        err = np.array(
            [[r["delta"] - r["delta_lo"] for r in rs], [r["delta_hi"] - r["delta"] for r in rs]]
        )
        ax.errorbar(s, d, yerr=err, color=colour, marker="o", ms=3, lw=1, label=concept)
        ax.plot(s, [r["control_delta"] for r in rs], color=colour, ls="--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("clamp value (multiple of the feature's max activation)")
    ax.set_ylabel("mean change in p(concept)")
    ax.set_title(
        "suppressing each concept's best feature (dashed: random-feature control)", fontsize=9
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def specificity_heatmap(rows: Sequence[dict], strength: float):
    """The concept x concept specificity matrix of one edit strength: a row per edit (its
    hypothesis and edited concept), a column per measured concept, the cell the mean change of
    that concept's probability (diverging colours, symmetric about 0); `*` marks a cell whose
    95% interval excludes 0. Columns: the edited concepts in row order, then the others."""
    plt = _plt()
    rs = [r for r in rows if float(r["strength"]) == float(strength)]
    if not rs:
        raise ValueError(f"specificity_heatmap: no row at strength {strength:g}")
    edits = list(dict.fromkeys((r["hypothesis"], r["edited_concept"]) for r in rs))
    edited = list(dict.fromkeys(c for _, c in edits))
    cols = edited + sorted({r["concept"] for r in rs} - set(edited))
    cell = {(r["hypothesis"], r["concept"]): r for r in rs}
    m = np.full((len(edits), len(cols)), np.nan)
    star = np.zeros(m.shape, dtype=bool)
    for i, (h, _) in enumerate(edits):
        for j, c in enumerate(cols):
            r = cell.get((h, c))
            if r is not None:
                m[i, j] = r["delta"]
                star[i, j] = r["delta_lo"] > 0 or r["delta_hi"] < 0
    vmax = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    fig, ax = plt.subplots(
        figsize=(1.2 + 0.55 * len(cols), 1.0 + 0.4 * len(edits)), dpi=100, squeeze=True
    )
    im = ax.imshow(m, cmap="RdBu_r", vmin=-(vmax or 1.0), vmax=vmax or 1.0, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:+.2f}{'*' if star[i, j] else ''}", ha="center",
                        va="center", fontsize=6)  # fmt: skip
    labels = [h if h == c else f"{h} ({c})" for h, c in edits]
    ax.set_yticks(range(len(edits)), labels, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("edited (hypothesis)", fontsize=8)
    ax.set_xlabel("measured concept", fontsize=8)
    ax.set_title(f"specificity at strength {strength:g}: mean change in p(concept)", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig
