"""Where the tokens of a block output are, and which of them an edit touches.

`TokenLayout` says where CLS, registers and patches sit in a block's output (`load_backbone`
measures it; `measure_layout` measures it for any transformers vision model). Scopes pick the
tokens an edit touches (`scope_tokens`): every token, the patches, the CLS token, or a region (a
patch mask, a pixel bounding box or a pixel mask turned into patches; boxes and masks in original
pixels go through the processor's resize and crop, `TokenLayout.geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saev_core.geometry import Geometry

SCOPES = ("all", "patches", "cls", "region")


# ---------------------------------------------------------------------------------------------
# token layout and scopes


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a block output are: CLS (if any), registers, then patches row-major."""

    n_prefix_tokens: int
    """Tokens before the patches: CLS (if any) plus registers (0 for SigLIP)."""
    has_cls: bool
    """Whether token 0 is a CLS token."""
    grid: tuple[int, int]
    """Patches per column and per row."""
    image_size: tuple[int, int]
    """Height and width in px of the processed image the grid covers."""
    geometry: Geometry | None = None
    """The processor's resize and crop, mapping original pixels (boxes, masks) to the input;
    None: the original image is taken as squashed onto the input."""
    geometry_error: str = ""
    """Set when the processor's geometry could not be read: mapping original pixels refuses."""

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix_tokens + self.n_patches

    @classmethod
    def of_backbone(cls, backbone: Any) -> TokenLayout:
        """The layout `load_backbone` measured."""
        return cls(
            int(backbone.n_prefix_tokens),
            bool(backbone.has_cls),
            tuple(backbone.grid),
            tuple(backbone.image_size),
            getattr(backbone, "geometry", None),
            getattr(backbone, "geometry_error", ""),
        )


def measure_layout(model: Any, blocks: Any, pixel_values: torch.Tensor) -> TokenLayout:
    """The token layout of any transformers vision model (e.g. the demo classifier) measured
    with one forward pass, as `load_backbone` does: prefix = tokens - patches, CLS from weights."""
    from saev_core.backbone.hooks import _patch_size, record_blocks
    from saev_core.backbone.load import CLS_PARAMETER_NAMES

    patch = _patch_size(model)
    h, w = pixel_values.shape[-2:]
    with torch.no_grad(), record_blocks(blocks, [0]) as acts:
        model(pixel_values=pixel_values[:1])
    grid = (int(h) // patch, int(w) // patch)
    n_prefix = acts[0].shape[1] - grid[0] * grid[1]
    has_cls = any(n.rsplit(".", 1)[-1] in CLS_PARAMETER_NAMES for n, _ in model.named_parameters())
    if n_prefix < int(has_cls):
        raise ValueError(f"{type(model).__name__}: {n_prefix} prefix tokens but a CLS parameter")
    return TokenLayout(n_prefix, has_cls, grid, (int(h), int(w)))


def _check_geometry(layout: TokenLayout) -> None:
    if layout.geometry is None and layout.geometry_error:
        raise ValueError(
            "cannot map original pixels to patches: the processor's resize and crop are "
            f"unknown ({layout.geometry_error})"
        )


def patches_in_bbox(
    layout: TokenLayout, bbox: Sequence[float], image_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Bool [grid_h, grid_w]: patches that overlap the box (x0, y0, x1, y1) given in px of the
    original image of size `image_hw` (default: the processed image). With `layout.geometry` the
    box goes through the processor's resize and crop (a box the crop cuts away touches nothing);
    without, the original image is taken as squashed onto the input."""
    _check_geometry(layout)
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bbox must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {bbox}")
    gh, gw = layout.grid
    if layout.geometry is not None and image_hw is not None:
        ih, iw = layout.image_size
        x0, y0, x1, y1 = layout.geometry.box_to_input((x0, y0, x1, y1), image_hw[1], image_hw[0])
        ph, pw = ih // gh, iw // gw  # the patches cover the input's top-left gh*ph x gw*pw px
    else:
        ih, iw = image_hw or layout.image_size
        ph, pw = ih / gh, iw / gw  # patch r covers rows [r, r + 1) * ih / gh of the image
    if not (x1 > x0 and y1 > y0):
        return np.zeros((gh, gw), dtype=bool)
    rows = np.arange(gh)
    cols = np.arange(gw)
    r_in = ((rows + 1) * ph > y0) & (rows * ph < y1)
    c_in = ((cols + 1) * pw > x0) & (cols * pw < x1)
    return r_in[:, None] & c_in[None, :]


def patches_in_mask(layout: TokenLayout, mask_hw: np.ndarray, min_cover: float = 0.5) -> np.ndarray:
    """Bool [grid_h, grid_w]: patches at least `min_cover` covered by a boolean pixel mask of the
    original image (any size): through `layout.geometry`'s resize and crop by nearest neighbour,
    or, without a geometry, squashed to the processed image."""
    _check_geometry(layout)
    h, w = layout.image_size
    geometry = layout.geometry or Geometry.squash(h, w)
    m = geometry.transform_mask(np.asarray(mask_hw, dtype=bool))
    if m.shape != (h, w):
        raise ValueError(
            f"a {np.shape(mask_hw)[0]}x{np.shape(mask_hw)[1]} mask becomes {m.shape[0]}x{m.shape[1]} "
            f"through {geometry}, not the {h}x{w} input of this layout"
        )
    gh, gw = layout.grid
    ph, pw = h // gh, w // gw
    cover = m[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw).mean(axis=(1, 3))
    return cover >= min_cover


def scope_tokens(
    layout: TokenLayout, scope: str, patch_mask: np.ndarray | torch.Tensor | None = None
) -> torch.Tensor:
    """Bool tokens an edit touches: [n_tokens], or [n_images, n_tokens] for per-image regions.

    `patch_mask` ([grid_h, grid_w] or [n_images, grid_h, grid_w], or flattened patches) is needed
    for scope "region" only.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {'|'.join(SCOPES)}, got {scope!r}")
    t = torch.zeros(layout.n_tokens, dtype=torch.bool)
    if scope == "all":
        return t.fill_(True)
    if scope == "patches":
        t[layout.n_prefix_tokens :] = True
        return t
    if scope == "cls":
        if not layout.has_cls:
            raise ValueError("scope 'cls': this model has no CLS token (SigLIP?); use patches")
        t[0] = True
        return t
    if patch_mask is None:
        raise ValueError("scope 'region' needs a patch mask (or a bbox turned into one)")
    pm = torch.as_tensor(np.asarray(patch_mask), dtype=torch.bool)
    lead = pm.shape[:-2] if pm.shape[-2:] == torch.Size(layout.grid) else pm.shape[:-1]
    pm = pm.reshape(*lead, layout.n_patches)
    prefix = torch.zeros(*lead, layout.n_prefix_tokens, dtype=torch.bool)
    return torch.cat([prefix, pm], dim=-1)
