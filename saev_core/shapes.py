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
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
CONCEPTS = SHAPES + COLOURS
SPLITS = ("train", "val", "test")
FORMAT = "saev-shapes/1"

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
OUTPUTS = ("images", "masks", "images.csv", "objects.csv", "world.json")


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


def _occlusion_ok(mask: np.ndarray, sil: np.ndarray, areas: list[int], limit: float) -> bool:
    if not areas:
        return True
    covered = np.bincount(mask[sil], minlength=len(areas) + 1)[1:]
    visible = np.bincount(mask.ravel(), minlength=len(areas) + 1)[1:]
    hidden_after = np.asarray(areas) - visible + covered
    return bool(np.all(hidden_after <= limit * np.asarray(areas)))


def object_labels(objects: list[dict[str, Any]]) -> list[str]:
    """Sorted concept names present among `objects`."""
    return sorted({o["shape"] for o in objects} | {o["colour"] for o in objects})


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
    _prepare_out_dir(out_dir, cfg, overwrite)
    image_rows: list[list[Any]] = []
    object_rows: list[list[Any]] = []
    concept_images = dict.fromkeys(CONCEPTS, 0)
    n_objects_hist = [0] * (cfg.max_objects + 1)
    for image_id in tqdm(range(cfg.n_images), desc="shapes", disable=not progress):
        split = cfg.split_of(image_id)
        rgb, mask, objects = render_image(image_seed(cfg.seed, image_id), cfg)
        image_rel = f"images/{split}/{image_id:05d}.png"
        mask_rel = f"masks/{split}/{image_id:05d}.png"
        _write_atomic(out_dir / image_rel, _png_bytes(rgb, cfg.compress_level))
        _write_atomic(out_dir / mask_rel, _png_bytes(mask, cfg.compress_level))
        labels = object_labels(objects)
        for c in labels:
            concept_images[c] += 1
        n_objects_hist[len(objects)] += 1
        image_rows.append([image_id, split, image_rel, mask_rel, ";".join(labels)])
        for o in objects:
            object_rows.append(
                [image_id, o["object"], o["shape"], o["colour"], o["radius"], o["cx"], o["cy"]]
            )
    _write_atomic(
        out_dir / "images.csv",
        _csv_bytes(["image_id", "split", "image", "mask", "labels"], image_rows),
    )
    _write_atomic(
        out_dir / "objects.csv",
        _csv_bytes(["image_id", "object", "shape", "colour", "radius", "cx", "cy"], object_rows),
    )
    counts = {
        "images": cfg.n_images,
        "train": cfg.n_train,
        "val": cfg.n_val,
        "test": cfg.n_test,
        "objects": len(object_rows),
        "images_with_n_objects": {str(n): c for n, c in enumerate(n_objects_hist) if n},
        "images_with_concept": concept_images,
    }
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
# Command line


def main(argv: list[str] | None = None) -> int:
    """`python -m saev_core.shapes --out data/shapes [--seed N] [--overwrite]`."""
    parser = argparse.ArgumentParser(
        prog="python -m saev_core.shapes",
        description="Generate the built-in shapes world (images, masks, labels) from a seed.",
    )
    parser.add_argument("--out", default="data/shapes", help="output directory (data/shapes)")
    parser.add_argument(
        "--params", help="read the config from this params.yaml first (section --section)"
    )
    parser.add_argument("--section", default="shapes", help="params.yaml section (shapes)")
    parser.add_argument("--seed", type=int, help="root seed (overrides params)")
    parser.add_argument("--n-train", type=int, help="images in the train split")
    parser.add_argument("--n-val", type=int, help="images in the val split")
    parser.add_argument("--n-test", type=int, help="images in the test split")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing world in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    overrides = {"seed": args.seed, "n_train": args.n_train, "n_val": args.n_val}
    overrides["n_test"] = args.n_test
    try:
        if args.params:
            from .config import load_section

            cfg = load_section(args.params, args.section, ShapesConfig, **overrides)
        else:
            cfg = replace(ShapesConfig(), **{k: v for k, v in overrides.items() if v is not None})
        counts = generate(args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **counts}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
