"""The shapes world's vocabulary and layout constants (shapes, colours, concepts, splits,
forms, parts, file formats), `ShapesConfig`, `cfg_name` and the per-image seed `image_seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
