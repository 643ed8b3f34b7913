"""Rendering one image of the plain shapes world (`render_image`: shape masks, textured
backgrounds, occlusion) and its labels per image, per object and per patch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saev_core.shapes.config import (
    BACKGROUNDS,
    BASE_RGB,
    COLOURS,
    CROSS_HALF_WIDTH,
    FORM_SEPARATOR,
    SHAPES,
    SQUARE_HALF_SIDE,
    STRIPE_DIRECTIONS,
    ShapesConfig,
)


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of pixel centres, broadcastable to [size, size]: pixel j covers [j, j+1)."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return c[None, :], c[:, None]


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Boolean [size, size] silhouette of one upright object within the box cx+-r, cy+-r."""
    x, y = _pixel_centres(size)
    dx, dy = x - cx, y - cy
    r = float(radius)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r): area 2 r^2.
        return (dy <= r) & (2.0 * np.abs(dx) <= dy + r)
    if shape == "cross":
        w = CROSS_HALF_WIDTH * r
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return inside & ((np.abs(dx) <= w) | (np.abs(dy) <= w))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _bilinear_upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsample a [k, k] grid to [size, size] with explicit bilinear weights (no BLAS)."""
    k = grid.shape[0]
    u = (np.arange(size, dtype=np.float64) + 0.5) * (k / size) - 0.5
    u = np.clip(u, 0.0, k - 1.0)
    i0 = np.minimum(np.floor(u).astype(np.int64), k - 2)
    f = u - i0
    rows = grid[i0] * (1.0 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1.0 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _background(rng: np.random.Generator, cfg: ShapesConfig) -> np.ndarray:
    """A textured, low-saturation background as float64 [H, W, 3] (before pixel noise)."""
    size = cfg.image_size
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    grey = float(rng.integers(80, 171))
    # A muted tint of at most +-10 per channel keeps backgrounds far from the saturated objects.
    tint = rng.integers(-10, 11, size=3).astype(np.float64)
    amp = float(rng.integers(cfg.background_contrast // 4, cfg.background_contrast + 1))
    x, y = _pixel_centres(size)
    if kind == "noise":
        k = int(rng.integers(3, 8))
        grid = rng.random((k, k)) * 2.0 - 1.0
        tex = _bilinear_upsample(grid, size)
    elif kind == "stripes":
        ux, uy = STRIPE_DIRECTIONS[int(rng.integers(len(STRIPE_DIRECTIONS)))]
        period = float(rng.integers(6, 17))
        phase = rng.random()
        t = (x * ux + y * uy) / (np.sqrt(float(ux * ux + uy * uy)) * period) + phase
        t = t - np.floor(t)
        tex = np.abs(2.0 * t - 1.0) * 2.0 - 1.0  # triangle wave in [-1, 1]
    else:  # checker
        cell = int(rng.integers(5, 13))
        ox, oy = (int(v) for v in rng.integers(0, cell, size=2))
        xi, yi = np.arange(size)[None, :], np.arange(size)[:, None]
        tex = (((xi + ox) // cell + (yi + oy) // cell) % 2) * 2.0 - 1.0
    tex = np.broadcast_to(tex, (size, size))
    return grey + tint[None, None, :] + amp * tex[:, :, None]


def render_image(
    image_seed: int, cfg: ShapesConfig
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Draw one image from its seed: (rgb uint8 [H, W, 3], mask uint8 [H, W], objects).

    `objects[i - 1]` describes mask value `i`: {object, shape, colour, radius, cx, cy}. Objects
    are drawn in order, later on top; a position is accepted only if no object (earlier ones
    included) then has more than `cfg.max_occlusion` of its pixels covered.
    """
    rng = np.random.default_rng(image_seed)
    size = cfg.image_size
    rgb = _background(rng, cfg)
    mask = np.zeros((size, size), dtype=np.uint8)
    areas: list[int] = []
    objects: list[dict[str, Any]] = []
    n_wanted = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(n_wanted):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
        placed = None
        for _try in range(cfg.placement_tries):
            n_radii = (cfg.max_radius - cfg.min_radius) // cfg.radius_step + 1
            radius = cfg.min_radius + cfg.radius_step * int(rng.integers(n_radii))
            step = cfg.position_step
            lo, hi = -(-radius // step), (size - radius) // step  # centres keep the object inside
            cx = step * int(rng.integers(lo, hi + 1))
            cy = step * int(rng.integers(lo, hi + 1))
            sil = shape_mask(shape, cx, cy, radius, size)
            if _occlusion_ok(mask, sil, areas, cfg.max_occlusion):
                placed = (radius, cx, cy, sil)
                break
        if placed is None:
            continue  # the image keeps fewer objects; recorded in objects.csv as drawn
        radius, cx, cy, sil = placed
        obj_id = len(objects) + 1
        mask[sil] = obj_id
        areas.append(int(sil.sum()))
        colour_rgb = np.asarray(BASE_RGB[colour], dtype=np.float64) + jitter
        rgb[sil] = colour_rgb
        objects.append(
            {
                "object": obj_id,
                "shape": shape,
                "colour": colour,
                "radius": radius,
                "cx": cx,
                "cy": cy,
            }
        )
    noise = rng.integers(-cfg.pixel_noise, cfg.pixel_noise + 1, size=(size, size, 3))
    rgb = np.clip(np.rint(rgb + noise), 0, 255).astype(np.uint8)
    return rgb, mask, objects


def _occlusion_ok(
    mask: np.ndarray,
    sil: np.ndarray,
    areas: list[int],
    limit: float,
    hideable: list[bool] | None = None,
) -> bool:
    """Whether drawing `sil` on top keeps every earlier object at most `limit` hidden (none
    at all for an object whose `hideable` entry is False)."""
    if not areas:
        return True
    covered = np.bincount(mask[sil], minlength=len(areas) + 1)[1:]
    visible = np.bincount(mask.ravel(), minlength=len(areas) + 1)[1:]
    hidden_after = np.asarray(areas) - visible + covered
    limits = limit * np.asarray(areas)
    if hideable is not None:
        limits = np.where(hideable, limits, 0.0)
    return bool(np.all(hidden_after <= limits))


def object_labels(objects: list[dict[str, Any]]) -> list[str]:
    """Sorted labels present among `objects`: their concepts (an empty shape or colour, as a
    word or an outline's inside has, is none); for objects with a form (the forms world) also
    "<concept>:<form>" for each concept and the form itself."""
    labels: set[str] = set()
    for o in objects:
        concepts = [c for c in (o["shape"], o["colour"]) if c]
        labels.update(concepts)
        if o.get("form"):
            labels.update(f"{c}{FORM_SEPARATOR}{o['form']}" for c in concepts)
            labels.add(o["form"])
    return sorted(labels)


def whole_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects among mask entries (objects.csv rows or `render_forms_image`'s list): all
    but the insides of outlines, which are parts of an outline already there (`part_of`)."""
    return [o for o in objects if (o.get("part") or "whole") != "inside"]


def patch_object_ids(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Per patch (row-major), the mask value covering the most pixels; 0 = background.

    `mask` is [..., H, W] with H and W multiples of `patch_size`; returns [..., n_patches].
    Ties go to the lower value, so a patch half background, half object counts as background.
    """
    mask = np.asarray(mask)
    h, w = mask.shape[-2:]
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"mask of {h}x{w} px does not split into patches of {patch_size} px")
    gh, gw = h // patch_size, w // patch_size
    lead = mask.shape[:-2]
    blocks = mask.reshape(*lead, gh, patch_size, gw, patch_size)
    blocks = np.moveaxis(blocks, -3, -2).reshape(*lead, gh * gw, patch_size * patch_size)
    n_values = int(mask.max(initial=0)) + 1
    counts = (blocks[..., None] == np.arange(n_values, dtype=mask.dtype)).sum(axis=-2)
    return counts.argmax(axis=-1).astype(np.uint8)


def patch_labels(
    mask: np.ndarray, objects: list[dict[str, Any]], patch_size: int, image_size: int
) -> list[list[str]]:
    """For each patch (row-major), the sorted concepts of the object covering most of its pixels.

    An empty list where background covers the most. `mask` is resized (nearest neighbour) to
    `image_size` first when needed, i.e. for a model that resizes the whole image without crop.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if mask.shape != (image_size, image_size):
        from PIL import Image

        resized = Image.fromarray(mask.astype(np.uint8)).resize(
            (image_size, image_size), Image.Resampling.NEAREST
        )
        mask = np.asarray(resized)
    by_id = {int(o["object"]): o for o in objects}
    ids = patch_object_ids(mask, patch_size)
    missing = sorted(set(int(i) for i in ids if i) - set(by_id))
    if missing:
        raise ValueError(f"mask values {missing} have no entry in objects")
    return [object_labels([by_id[int(i)]]) if i else [] for i in ids]
