"""The built-in `shapes` world: coloured shapes on textured backgrounds, deterministic from a seed.

Every image holds 1-3 objects, each a shape from `SHAPES` in a colour from `COLOURS`, with a
size (`radius`, half the width of the object's bounding box, in px) and an integer centre. Labels
are known per image (which concepts are present), per object (`objects.csv`) and per pixel (the
mask: 0 = background, i = object i). This is the ground truth the SAE features are judged against.

`generate(out_dir, cfg)` writes the layout every later stage reads:

    <out_dir>/images/<split>/<image_id:05d>.png   RGB PNG
    <out_dir>/masks/<split>/<image_id:05d>.png    8-bit grey PNG, 0 = background, i = object i
    <out_dir>/images.csv    image_id,split,image,mask,labels  (labels: ';'-joined sorted concepts)
    <out_dir>/objects.csv   image_id,object,shape,colour,radius,cx,cy
    <out_dir>/world.json    the config, the concept vocabulary, counts
    <out_dir>/captions.csv  image_id,caption  (the forms world only)

(The forms world, below, adds columns to objects.csv and mask values for outlines' insides.)

Determinism: image `i` is drawn from its own generator, seeded by the child `i` of
`SeedSequence(cfg.seed)` (`image_seed`), so any image can be regenerated alone with
`render_image(image_seed(cfg.seed, i), cfg)`. Pixels are computed with integer draws and
+ - * / sqrt only (no sin/exp, no normal draws, no BLAS), which IEEE 754 rounds the same on every
CPU; PNGs are written by PIL at a fixed compression level with no metadata chunks, so the same
config gives the same bytes (with the Pillow build pinned in constraints.txt).

Learnability (FINDINGS.md: a prototype ViT learned shape slowly): objects are large (radius
12-18 px on 64 px, i.e. 3-4.5 patches of 8 px across), upright, with distinct silhouettes (a
full disc, a full box with sharp corners, a pointed apex, a thin-armed cross with concave
corners); size varies more than area differs between shapes (circle 3.1 r^2, square 4 r^2,
triangle 2 r^2, cross 2 r^2), so area alone does not tell the shape; occlusion is capped so
each object keeps most of its silhouette.

**The forms world** (`FormsConfig`, `saev shapes --world forms --out data/forms`): the same
backgrounds, shapes and colours, but each object is drawn in one of `FORMS`, uniformly:

    filled   the default world's object (a red circle)
    outline  the same silhouette, only its `outline_width` px border in the colour (inside: background)
    word     one concept (uniform over the 8) written in Pillow's bundled FreeType font
             (`ImageFont.load_default(size=font_size)`, no download) in neutral grey ink, so a
             word carries exactly one concept: "red" in dark grey is the concept red, not a colour

Labels (`FORMS_VOCABULARY`, 35 names, plain ASCII with no quote, space or "@": they are SQL
string literals, YAML scalars, stats-table rows and MLflow metric-name parts as they are):

    circle ... yellow   the 8 plain concepts, in any form (what a cross-form feature detects)
    circle:word ...     "<concept>:<form>", 24 form-qualified labels (`form_label`; in SQL
                        split_part(label, ':', 1) is the concept, split_part(label, ':', 2) the form)
    filled outline word the 3 form labels: some object of that form is present

An object carries its concepts, each with its form, and its form: a red circle outline is
{circle, red, circle:outline, red:outline, outline}; the word "square" is {square,
square:word, word}. images.csv's `labels` is the union over the image's objects. objects.csv has
one row per mask value: it gains form, word, font_size, the part's box x0,y0,x1,y1, its `labels`
(';'-joined; what `data.load_records` gives as the mask value's labels, hence the patch labels),
`part` and `part_of` (`PARTS`). A filled object or a word is one part, "whole"; an outline is
two (`FORMS_VERSION` 2): its ink, the drawn line, with the object's number and all its labels,
and its inside (the silhouette minus the ink: background), numbered after all the objects, with
colour "" and so only the shape's labels {circle, circle:outline, outline}. A patch then carries
an outline's colour only where its ink is the mask value covering most of the patch, while the
inside keeps the shape. Measured on the default config (5000 images, 64 px, 8-px patches): of
the 27,580 patches an outline covered most, all carried its colour before; now 12,777 (46%) do;
13,308 are more inside than ink; 1,424 (5%), where neither part alone outweighs the background,
carry no label, the shape's included (patch labels vote per mask value). Placement, occlusion,
counts and captions treat an outline as one object (`whole_objects`: the rows not an inside). A
word's mask is its box (its ink's bounding box plus 1 px, at least 10 px tall, so some 8-px patch
row is mostly box: every word labels at least one patch); objects are opaque within their
silhouette or box, and no object may cover any of a word's box. captions.csv holds
one caption per image ("a red circle, an outline of a blue cross and the word square"; see
`caption`); `read_captions(data_dir)` reads it, or builds captions from objects.csv for a world
without one. The image stays 64 px with 8-px patches: the eight words at 11-13 px are 18-45 px
wide with an x-height of 6-7 px (one patch row, 3-6 patches across), legible in the images, and
every downstream stage (backbones, extraction, SAEs, stats) costs what it costs on today's world.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
CONCEPTS = SHAPES + COLOURS
SPLITS = ("train", "val", "test")
FORMAT = "saev-shapes/1"
FORMS = ("filled", "outline", "word")
FORM_SEPARATOR = ":"
CAPTIONS_CSV = "captions.csv"
EMPTY_CAPTION = "an empty picture"
# A word's mask box: its ink's bounding box plus this margin, at least this tall (see _word_glyphs).
WORD_MARGIN = 1
WORD_MIN_HEIGHT = 10

# Base RGB of each colour; each object adds its own jitter (cfg.colour_jitter), each pixel noise.
# Far apart in RGB and all saturated, while backgrounds are grey with a tint of at most +-10.
BASE_RGB = {
    "red": (205, 45, 45),
    "green": (45, 175, 65),
    "blue": (50, 80, 210),
    "yellow": (225, 205, 50),
}
BACKGROUNDS = ("noise", "stripes", "checker")
# Stripe directions as small integer vectors (no sin/cos: see the determinism note above).
STRIPE_DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1), (2, 1), (1, 2), (2, -1), (1, -2))
# Silhouette proportions, as fractions of the radius (half the bounding box). Measured on the
# demo ViT: with a square of half-side 0.9 r, a cross with arms of half-width 0.36 r and radii
# from 10 px, small squares and crosses were the concepts it confused (val accuracy 0.92 and
# 0.95 after 10 epochs); a full-box square, thinner arms and radii from 12 px gave 0.97 and 0.98.
SQUARE_HALF_SIDE = 1.0
CROSS_HALF_WIDTH = 0.3
OBJECT_COLUMNS = ("image_id", "object", "shape", "colour", "radius", "cx", "cy")
FORMS_OBJECT_COLUMNS = OBJECT_COLUMNS + (
    "form",
    "word",
    "font_size",
    "x0",
    "y0",
    "x1",
    "y1",
    "labels",
    "part",
    "part_of",
)
OUTPUTS = ("images", "masks", "images.csv", "objects.csv", CAPTIONS_CSV, "world.json")
# The forms world's layout, recorded in its world.json as `forms_version`: 1 gave an outline one
# mask value (its silhouette); 2 splits it into its ink and its inside (same images and labels).
FORMS_VERSION = 2
# What each mask value of the forms world is (objects.csv `part`): a whole object (filled, word),
# an outline's ink (the drawn line) or an outline's inside (the background it encloses).
PARTS = ("whole", "ink", "inside")


@dataclass(frozen=True)
class ShapesConfig:
    """How the shapes world is drawn; the `shapes` section of params.yaml."""

    seed: int = 0
    """Root seed; image i uses the child seed i of numpy's SeedSequence(seed)."""
    image_size: int = 64
    """Height and width of every image in px."""
    n_train: int = 4000
    """Images in the train split."""
    n_val: int = 500
    """Images in the val split."""
    n_test: int = 500
    """Images in the test split."""
    min_objects: int = 1
    """Fewest objects in an image."""
    max_objects: int = 3
    """Most objects in an image (at most 255: mask values are uint8)."""
    min_radius: int = 12
    """Smallest object radius (half its bounding box) in px; 12 = 3 patches of 8 px across."""
    max_radius: int = 18
    """Largest object radius in px; 18 on 64 px keeps three objects placeable."""
    position_step: int = 1
    """Object centres are multiples of this many px (8 = on patch corners of an 8-px ViT)."""
    radius_step: int = 1
    """Radii are min_radius + a multiple of this many px."""
    max_occlusion: float = 0.1
    """Largest fraction of an object's pixels that objects drawn later may cover."""
    placement_tries: int = 60
    """Random positions tried per object before the image keeps fewer objects."""
    colour_jitter: int = 25
    """Each object's RGB is its colour's base RGB plus a uniform offset in [-j, j] per channel."""
    pixel_noise: int = 6
    """Every pixel gets a uniform offset in [-n, n] per channel."""
    background_contrast: int = 28
    """Largest amplitude of the background texture, in grey levels."""
    compress_level: int = 6
    """PIL PNG compress_level (0-9); part of the bytes, so fixed in the config."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_images > 100_000:
            raise ValueError(f"at most 100000 images (5-digit ids), got {self.n_images}")
        if not 1 <= self.min_objects <= self.max_objects <= 255:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 255, got {self.min_objects}, {self.max_objects}"
            )
        if not 2 <= self.min_radius <= self.max_radius:
            raise ValueError(
                f"need 2 <= min_radius <= max_radius, got {self.min_radius}, {self.max_radius}"
            )
        if 2 * self.max_radius > self.image_size:
            raise ValueError(
                f"max_radius {self.max_radius} does not fit in image_size {self.image_size}"
            )
        if not 0.0 <= self.max_occlusion < 1.0:
            raise ValueError(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")
        if self.placement_tries < 1:
            raise ValueError(f"placement_tries must be >= 1, got {self.placement_tries}")
        for name in ("colour_jitter", "pixel_noise", "background_contrast"):
            if not 0 <= getattr(self, name) <= 60:
                raise ValueError(f"{name} must be in [0, 60], got {getattr(self, name)}")
        if not 0 <= self.compress_level <= 9:
            raise ValueError(f"compress_level must be in 0..9, got {self.compress_level}")

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_val + self.n_test

    def split_of(self, image_id: int) -> str:
        """The split that global `image_id` belongs to (train, then val, then test)."""
        if not 0 <= image_id < self.n_images:
            raise ValueError(f"image_id {image_id} not in 0..{self.n_images - 1}")
        if image_id < self.n_train:
            return "train"
        return "val" if image_id < self.n_train + self.n_val else "test"


def cfg_name(cfg: ShapesConfig) -> str:
    """The world's name: "forms" for a FormsConfig, else "shapes"."""
    return getattr(cfg, "world", "shapes")


def image_seed(seed: int, image_id: int) -> int:
    """The seed of image `image_id`: child `image_id` of `SeedSequence(seed)`, as an int."""
    child = np.random.SeedSequence(seed, spawn_key=(image_id,))
    return int(child.generate_state(1, np.uint64)[0])


# ---------------------------------------------------------------------------------------------
# Rendering


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


# ---------------------------------------------------------------------------------------------
# The forms world: every concept as a filled object, an outline drawing and a written word


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


WORLDS: dict[str, type[ShapesConfig]] = {"shapes": ShapesConfig, "forms": FormsConfig}


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


def whole_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects among mask entries (objects.csv rows or `render_forms_image`'s list): all
    but the insides of outlines, which are parts of an outline already there (`part_of`)."""
    return [o for o in objects if (o.get("part") or "whole") != "inside"]


# ---------------------------------------------------------------------------------------------
# Patch labels


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


# ---------------------------------------------------------------------------------------------
# Writing the dataset


def _png_bytes(array: np.ndarray, compress_level: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # No pnginfo, no optimize: PIL then writes only IHDR, IDAT and IEND chunks.
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _is_same_world(out_dir: Path, cfg: ShapesConfig) -> bool:
    from .config import to_dict

    try:
        world = json.loads((out_dir / "world.json").read_text())
    except (OSError, ValueError):
        return False
    return world.get("format") == FORMAT and world.get("config") == to_dict(cfg)


def _prepare_out_dir(out_dir: Path, cfg: ShapesConfig, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite and not _is_same_world(out_dir, cfg):
            raise FileExistsError(
                f"{out_dir} is not empty and is not a shapes world made with this config; "
                "pass overwrite=True (--overwrite) to replace it"
            )
        # world.json goes first: from here until it is rewritten, the directory reads as partial.
        for name in reversed(OUTPUTS):
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for split in SPLITS:
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "masks" / split).mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | Path, cfg: ShapesConfig, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Write the world for `cfg` into `out_dir` (layout in the module docstring); return counts.

    Refuses a non-empty `out_dir` unless it holds a world made with the same config (which is
    then rebuilt, byte for byte the same) or `overwrite` is set (old outputs are removed first).
    world.json is written last, so its presence marks a complete world.
    """
    from tqdm import tqdm

    from .config import to_dict

    out_dir = Path(out_dir)
    forms = isinstance(cfg, FormsConfig)
    render = render_forms_image if forms else render_image
    vocabulary = FORMS_VOCABULARY if forms else CONCEPTS
    object_columns = FORMS_OBJECT_COLUMNS if forms else OBJECT_COLUMNS
    _prepare_out_dir(out_dir, cfg, overwrite)
    image_rows: list[list[Any]] = []
    object_rows: list[list[Any]] = []
    caption_rows: list[list[Any]] = []
    concept_images = dict.fromkeys(vocabulary, 0)
    label_objects = {s: dict.fromkeys(vocabulary, 0) for s in SPLITS}
    n_objects_hist = [0] * (cfg.max_objects + 1)
    n_insides = 0
    for image_id in tqdm(range(cfg.n_images), desc=cfg_name(cfg), disable=not progress):
        split = cfg.split_of(image_id)
        rgb, mask, objects = render(image_seed(cfg.seed, image_id), cfg)
        image_rel = f"images/{split}/{image_id:05d}.png"
        mask_rel = f"masks/{split}/{image_id:05d}.png"
        _write_atomic(out_dir / image_rel, _png_bytes(rgb, cfg.compress_level))
        _write_atomic(out_dir / mask_rel, _png_bytes(mask, cfg.compress_level))
        labels = object_labels(objects)  # an outline's ink holds all its labels, so: its objects'
        for c in labels:
            concept_images[c] += 1
        whole = whole_objects(objects)
        n_objects_hist[len(whole)] += 1
        n_insides += len(objects) - len(whole)
        image_rows.append([image_id, split, image_rel, mask_rel, ";".join(labels)])
        for o in objects:
            if forms:
                own = object_labels([o])
                o = o | {"labels": ";".join(own)}
                if o["part"] != "inside":  # objects_with_label counts objects, not their parts
                    for label in own:
                        label_objects[split][label] += 1
            object_rows.append([image_id] + [o[c] for c in object_columns[1:]])
        if forms:
            caption_rows.append([image_id, caption(whole)])
    _write_atomic(
        out_dir / "images.csv",
        _csv_bytes(["image_id", "split", "image", "mask", "labels"], image_rows),
    )
    _write_atomic(out_dir / "objects.csv", _csv_bytes(list(object_columns), object_rows))
    if forms:
        _write_atomic(out_dir / CAPTIONS_CSV, _csv_bytes(["image_id", "caption"], caption_rows))
    counts = {
        "images": cfg.n_images,
        "train": cfg.n_train,
        "val": cfg.n_val,
        "test": cfg.n_test,
        "objects": len(object_rows) - n_insides,
        "images_with_n_objects": {str(n): c for n, c in enumerate(n_objects_hist) if n},
        "images_with_concept": concept_images,
    }
    if forms:
        counts["objects_with_label"] = label_objects
        counts["outline_insides"] = n_insides
    world = {
        "format": FORMAT,
        "config": to_dict(cfg),
        "concepts": list(CONCEPTS),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "splits": list(SPLITS),
        "counts": counts,
        "image_seed": "int(numpy.random.SeedSequence(seed, spawn_key=(image_id,)).generate_state(1, numpy.uint64)[0])",
        "mask": "0 = background, i = object i of objects.csv; later objects drawn on top",
        "radius": "half the width of the object's bounding box in px; centre (cx, cy) in px, pixel j covers [j, j+1)",
    }
    if forms:
        world |= {
            "world": "forms",
            "forms": list(FORMS),
            "labels": list(FORMS_VOCABULARY),
            "form_separator": FORM_SEPARATOR,
            "captions": f"{CAPTIONS_CSV}: image_id,caption (saev_core.shapes.read_captions)",
            "font": "PIL.ImageFont.load_default(size=font_size), the FreeType font bundled with Pillow",
            "forms_version": FORMS_VERSION,
            "mask": "0 = background, v = row `object` v of the image in objects.csv: 1..n the n objects (a silhouette, an outline's ink, a word's box) in drawing order, later on top; then each outline's visible inside, in drawing order",
            "parts": "objects.csv part: whole (filled, word), ink (an outline's line: all its labels) or inside (an outline's inside, the background it encloses: colour '', only its shape labels); part_of: the object it belongs to",
        }
    text = json.dumps(world, sort_keys=True, indent=2) + "\n"
    _write_atomic(out_dir / "world.json", text.encode())
    return counts


def read_world(data_dir: str | Path) -> dict[str, Any]:
    """world.json of a generated world, with clear errors when it is missing or foreign."""
    path = Path(data_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shapes world at {data_dir}: {path} is missing")
    world = json.loads(path.read_text())
    if world.get("format") != FORMAT:
        raise ValueError(f"{path}: format {world.get('format')!r}, expected {FORMAT!r}")
    return world


# ---------------------------------------------------------------------------------------------
# Captions


def object_phrase(obj: dict[str, Any]) -> str:
    """How a caption names one object: "a red circle", "an outline of a red circle", "the word
    red". `obj` has shape and colour (either may be "" for a word) and optionally form (default
    filled, as every object of the default world is)."""
    form = obj.get("form") or "filled"
    if form == "filled":
        return f"a {obj['colour']} {obj['shape']}"
    if form == "outline":
        return f"an outline of a {obj['colour']} {obj['shape']}"
    if form == "word":
        return f"the word {obj.get('word') or obj['shape'] or obj['colour']}"
    raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")


def caption(objects: list[dict[str, Any]]) -> str:
    """One image's caption: its objects' phrases in drawing order, "A", "A and B", "A, B and C";
    "an empty picture" when no object could be placed. An outline's inside (a part, not an
    object: `whole_objects`) adds no phrase."""
    phrases = [object_phrase(o) for o in whole_objects(objects)]
    if not phrases:
        return EMPTY_CAPTION
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def read_captions(data_dir: str | Path) -> dict[int, str]:
    """image_id -> caption of every image in a shapes world (any variant).

    Reads `captions.csv` (image_id,caption) when the world has one (the forms world does);
    otherwise builds each caption from objects.csv with `caption` (every object filled unless
    the file has a form column; rows whose part is "inside" skipped), for every image_id in
    images.csv. Errors name the file and
    field that is missing or malformed.
    """
    data_dir = Path(data_dir)
    captions_csv = data_dir / CAPTIONS_CSV
    if captions_csv.is_file():
        out: dict[int, str] = {}
        with captions_csv.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"image_id", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{captions_csv}: missing column(s) {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                try:
                    image_id = int(row["image_id"])
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{captions_csv} line {line}: image_id {row['image_id']!r} is not an int"
                    ) from None
                if image_id in out:
                    raise ValueError(f"{captions_csv} line {line}: image_id {image_id} repeated")
                out[image_id] = row["caption"]
        return out
    images_csv, objects_csv = data_dir / "images.csv", data_dir / "objects.csv"
    for path in (images_csv, objects_csv):
        if not path.is_file():
            raise FileNotFoundError(f"no captions in {data_dir}: {CAPTIONS_CSV} and {path} missing")
    by_image: dict[int, list[dict[str, Any]]] = {}
    with objects_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image_id", "object", "shape", "colour"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{objects_csv}: missing column(s) {sorted(missing)}")
        for row in reader:
            by_image.setdefault(int(row["image_id"]), []).append(row)
    with images_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        if "image_id" not in (reader.fieldnames or ()):
            raise ValueError(f"{images_csv}: missing column 'image_id'")
        ids = [int(row["image_id"]) for row in reader]
    return {i: caption(sorted(by_image.get(i, []), key=lambda o: int(o["object"]))) for i in ids}


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """`saev shapes [--world shapes|forms] --out DIR [--params P] [--seed N] [--overwrite]`."""
    parser = argparse.ArgumentParser(
        prog="saev shapes",
        description="Generate a built-in image world (images, masks, labels) from a seed: "
        "`shapes` (filled coloured shapes) or `forms` (each concept as a filled shape, an outline "
        "drawing and a written word, with captions).",
    )
    parser.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default="shapes",
        help="which world: shapes (default) or forms",
    )
    parser.add_argument("--out", help="output directory (data/<world>)")
    parser.add_argument(
        "--params", help="read the config from this params.yaml first (section --section)"
    )
    parser.add_argument("--section", help="params.yaml section (default: the world's name)")
    parser.add_argument("--seed", type=int, help="root seed (overrides params)")
    parser.add_argument("--n-train", type=int, help="images in the train split")
    parser.add_argument("--n-val", type=int, help="images in the val split")
    parser.add_argument("--n-test", type=int, help="images in the test split")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing world in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    cls = WORLDS[args.world]
    out = args.out or f"data/{args.world}"
    overrides = {"seed": args.seed, "n_train": args.n_train, "n_val": args.n_val}
    overrides["n_test"] = args.n_test
    try:
        if args.params:
            from .config import load_section

            section = args.section or args.world
            cfg = load_section(args.params, section, cls, **overrides)
        else:
            cfg = replace(cls(), **{k: v for k, v in overrides.items() if v is not None})
        counts = generate(out, cfg, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), **counts}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
