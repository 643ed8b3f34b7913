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
