"""Figures of a hypothesis: before/after grids and the dose-response plot.

Both are bare matplotlib `Figure`s outside pyplot's registry: a run holds one per hypothesis x
strength until it logs them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saev_core.intervene.layout import TokenLayout

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
