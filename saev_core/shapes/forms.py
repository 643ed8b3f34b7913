"""The forms world (`FormsConfig`): the same concepts drawn as filled shapes, outlines or words,
and their form labels (`form_label`, `FORM_LABELS`, `FORMS_VOCABULARY`); `render_forms_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from saev_core.shapes.config import (
    BASE_RGB,
    COLOURS,
    CONCEPTS,
    FORM_SEPARATOR,
    FORMS,
    SHAPES,
    WORD_MARGIN,
    WORD_MIN_HEIGHT,
    ShapesConfig,
)
from saev_core.shapes.render import _background, _occlusion_ok, shape_mask


@dataclass(frozen=True)
class FormsConfig(ShapesConfig):
    """The `forms` world (`saev shapes --world forms`): ShapesConfig plus how outlines and words
    are drawn. Its own dataclass, so the default world's config (and so its bytes) is untouched."""

    world: str = "forms"
    """Marks the variant in world.json's config; must be "forms"."""
    outline_width: int = 3
    """Width in px of an outline drawing's line (inside the silhouette)."""
    min_font_size: int = 11
    """Smallest font size (px) of a word, in Pillow's bundled font (ImageFont.load_default)."""
    max_font_size: int = 13
    """Largest font size of a word; 13 px writes "triangle" 45 px wide on the 64 px image."""
    min_ink: int = 10
    """Darkest grey of a word's neutral ink."""
    max_ink: int = 40
    """Lightest grey of a word's ink; backgrounds are at least about 52, so ink stays darker."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.world != "forms":
            raise ValueError(f"world must be 'forms', got {self.world!r}")
        if self.max_objects > 127:
            # Each outline takes two mask values (ink, inside) in an 8-bit mask.
            raise ValueError(f"the forms world needs max_objects <= 127, got {self.max_objects}")
        if not 1 <= self.outline_width <= self.min_radius:
            raise ValueError(
                f"need 1 <= outline_width <= min_radius, got {self.outline_width}, {self.min_radius}"
            )
        if not 6 <= self.min_font_size <= self.max_font_size:
            raise ValueError(
                "need 6 <= min_font_size <= max_font_size, got "
                f"{self.min_font_size}, {self.max_font_size}"
            )
        widest = max(_word_glyphs(w, self.max_font_size)[1][2] for w in CONCEPTS)
        if widest > self.image_size:
            raise ValueError(
                f"max_font_size {self.max_font_size} writes a word {widest} px wide, wider than "
                f"image_size {self.image_size}"
            )
        if not 0 <= self.min_ink <= self.max_ink <= 255:
            raise ValueError(
                f"need 0 <= min_ink <= max_ink <= 255, got {self.min_ink}, {self.max_ink}"
            )


def form_label(concept: str, form: str) -> str:
    """The form-qualified label of a concept, e.g. "circle:word" (`FORM_SEPARATOR`)."""
    return f"{concept}{FORM_SEPARATOR}{form}"


FORM_LABELS = tuple(form_label(c, f) for c in CONCEPTS for f in FORMS)


FORMS_VOCABULARY = CONCEPTS + FORM_LABELS + FORMS


def _object_concepts(obj: dict[str, Any]) -> list[str]:
    return [c for c in (obj["shape"], obj["colour"]) if c]


@lru_cache(maxsize=64)
def _word_glyphs(word: str, font_size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(coverage float64 [h, w] in [0, 1], box): `word` in Pillow's bundled font at `font_size`.

    The array is the word's mask box: its ink's bounding box with `WORD_MARGIN` px on every
    side, grown at the bottom then the top to at least `WORD_MIN_HEIGHT` px, so that a box
    always holds a patch row in which it covers most pixels. `box` = (ink_x0, ink_y0, w, h)
    gives where the ink's bounding box starts inside it. Rendered once, then pasted at integer
    offsets, so a word's pixels are the same wherever it is placed.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("the forms world needs Pillow built with FreeType (load_default(size))")
    left, top, right, bottom = font.getbbox(word)
    pad = 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), word, font=font, fill=255)
    cov = np.asarray(canvas)
    ys, xs = np.nonzero(cov)
    cov = cov[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64) / 255.0
    ink_h, ink_w = cov.shape
    h = max(ink_h + 2 * WORD_MARGIN, WORD_MIN_HEIGHT)
    w = ink_w + 2 * WORD_MARGIN
    top_pad = WORD_MARGIN + (h - ink_h - 2 * WORD_MARGIN) // 2
    box = np.zeros((h, w), dtype=np.float64)
    box[top_pad : top_pad + ink_h, WORD_MARGIN : WORD_MARGIN + ink_w] = cov
    box.setflags(write=False)
    return box, (WORD_MARGIN, top_pad, w, h)


def outline_ink(sil: np.ndarray, width: int) -> np.ndarray:
    """The pixels of silhouette `sil` within `width` px (8-neighbour steps) of its edge."""
    inner = sil.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        h, w = inner.shape
        nxt = inner.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                nxt &= p[dy : dy + h, dx : dx + w]
        inner = nxt
    return sil & ~inner


def render_forms_image(
    image_seed: int, cfg: FormsConfig
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Draw one forms-world image from its seed: (rgb uint8 [H, W, 3], mask uint8 [H, W], objects).

    As `render_image`, but each object first draws its form (uniform over `FORMS`):
    filled and outline objects draw a shape and a colour as in the default world (an outline
    is `outline_width` px of the colour inside the silhouette, the inside showing the
    background); a word draws one concept (uniform over `CONCEPTS`) and writes it in neutral
    grey ink. An object covers its silhouette (filled, outline: an outline's inside is part of
    the drawing) or its word box (`_word_glyphs`); objects are opaque there, so what lies under
    an outline's inside or a word's box is the background, never an earlier object. Placement
    and occlusion treat each object, an outline included, as one silhouette.

    The mask then gives each of the n objects drawn its number 1..n, and each outline's inside
    (the silhouette minus its ink, as far as later objects leave it visible) the next free
    number, n + 1, ... in drawing order. An outline's colour is only on its ink, so only the
    ink's mask value carries colour labels, while the inside carries the shape (patch labels
    come from the mask value covering most of a patch).

    `objects[v - 1]` describes mask value v: {object, shape, colour, radius, cx, cy, form,
    word, font_size, x0, y0, x1, y1, part, part_of}. `part` is "whole" (filled, word), "ink"
    (an outline's line, with the object's number) or "inside" (colour "": it shows the
    background); `part_of` the object's number (itself but for an inside). The first n
    entries are the objects, in drawing order (`whole_objects`). A word has the concept it
    writes in `shape` or `colour` (the other is ""), a radius of half its box's width and
    (cx, cy) its box's centre, floored; (x0, y0, x1, y1) is the part's box as drawn (before
    later objects), ends exclusive; font_size is 0 for a drawing.
    """
    rng = np.random.default_rng(image_seed)
    size = cfg.image_size
    background = _background(rng, cfg)
    rgb = background.copy()
    mask = np.zeros((size, size), dtype=np.uint8)
    areas: list[int] = []
    objects: list[dict[str, Any]] = []
    hideable: list[bool] = []  # words may not be covered at all: a hidden letter is another word
    insides: list[tuple[int, np.ndarray]] = []  # (object number, inside) of each outline
    n_wanted = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    step = cfg.position_step
    for _ in range(n_wanted):
        form = FORMS[int(rng.integers(len(FORMS)))]
        if form == "word":
            word = CONCEPTS[int(rng.integers(len(CONCEPTS)))]
            shape, colour = (word, "") if word in SHAPES else ("", word)
            ink_grey = float(rng.integers(cfg.min_ink, cfg.max_ink + 1))
        else:
            word = ""
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
        placed = None
        for _try in range(cfg.placement_tries):
            if form == "word":
                font_size = int(rng.integers(cfg.min_font_size, cfg.max_font_size + 1))
                glyphs, (_, _, w, h) = _word_glyphs(word, font_size)
                x0 = step * int(rng.integers(0, (size - w) // step + 1))
                y0 = step * int(rng.integers(0, (size - h) // step + 1))
                x1, y1 = x0 + w, y0 + h
                sil = np.zeros((size, size), dtype=bool)
                sil[y0:y1, x0:x1] = True
                radius, cx, cy = w // 2, (x0 + x1) // 2, (y0 + y1) // 2
            else:
                font_size = 0
                n_radii = (cfg.max_radius - cfg.min_radius) // cfg.radius_step + 1
                radius = cfg.min_radius + cfg.radius_step * int(rng.integers(n_radii))
                lo, hi = -(-radius // step), (size - radius) // step
                cx = step * int(rng.integers(lo, hi + 1))
                cy = step * int(rng.integers(lo, hi + 1))
                sil = shape_mask(shape, cx, cy, radius, size)
            if _occlusion_ok(mask, sil, areas, cfg.max_occlusion, hideable):
                placed = (font_size, radius, cx, cy, sil)
                break
        if placed is None:
            continue
        font_size, radius, cx, cy, sil = placed
        obj_id = len(objects) + 1
        mask[sil] = obj_id
        areas.append(int(sil.sum()))
        hideable.append(form != "word")
        rgb[sil] = background[sil]
        if form == "word":
            ys, xs = np.nonzero(sil)
            alpha = np.zeros((size, size), dtype=np.float64)
            alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = glyphs
            alpha = alpha[:, :, None]
            rgb = rgb * (1.0 - alpha) + ink_grey * alpha
        elif form == "outline":
            ink = outline_ink(sil, cfg.outline_width)
            rgb[ink] = np.asarray(BASE_RGB[colour], dtype=np.float64) + jitter
            insides.append((obj_id, sil & ~ink))
        else:
            rgb[sil] = np.asarray(BASE_RGB[colour], dtype=np.float64) + jitter
        ys, xs = np.nonzero(sil)
        objects.append(
            {
                "object": obj_id,
                "shape": shape,
                "colour": colour,
                "radius": radius,
                "cx": cx,
                "cy": cy,
                "form": form,
                "word": word,
                "font_size": font_size,
                "x0": int(xs.min()),
                "y0": int(ys.min()),
                "x1": int(xs.max()) + 1,
                "y1": int(ys.max()) + 1,
                "part": "ink" if form == "outline" else "whole",
                "part_of": obj_id,
            }
        )
    # Split each outline into ink and inside only now: placement above saw whole silhouettes.
    # No draw from rng here, so the pixels (and the noise below) are those of one-value outlines.
    for obj_id, inside in insides:
        visible = inside & (mask == obj_id)
        if not visible.any():
            continue  # a thin inside (a cross's arm) may be all ink, or covered
        ys, xs = np.nonzero(inside)
        value = len(objects) + 1
        mask[visible] = value
        drawing = objects[obj_id - 1]
        objects.append(
            drawing
            | {
                "object": value,
                "colour": "",
                "x0": int(xs.min()),
                "y0": int(ys.min()),
                "x1": int(xs.max()) + 1,
                "y1": int(ys.max()) + 1,
                "part": "inside",
                "part_of": obj_id,
            }
        )
    noise = rng.integers(-cfg.pixel_noise, cfg.pixel_noise + 1, size=(size, size, 3))
    rgb = np.clip(np.rint(rgb + noise), 0, 255).astype(np.uint8)
    return rgb, mask, objects
