"""Writing and reading a world on disk: `generate` (PNGs, CSVs, world.json, captions; atomic,
and a no-op when the same world is already there), `read_world`, captions (`caption`,
`read_captions`), `WORLDS` and the `saev shapes` command (`main`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from saev_core.shapes.config import (
    CAPTIONS_CSV,
    COLOURS,
    CONCEPTS,
    EMPTY_CAPTION,
    FORM_SEPARATOR,
    FORMAT,
    FORMS,
    FORMS_OBJECT_COLUMNS,
    FORMS_VERSION,
    OBJECT_COLUMNS,
    OUTPUTS,
    SHAPES,
    SPLITS,
    ShapesConfig,
    cfg_name,
    image_seed,
)
from saev_core.shapes.forms import FORMS_VOCABULARY, FormsConfig, render_forms_image
from saev_core.shapes.render import object_labels, render_image, whole_objects


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
    from saev_core.config import to_dict

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

    from saev_core.config import to_dict

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


WORLDS: dict[str, type[ShapesConfig]] = {"shapes": ShapesConfig, "forms": FormsConfig}


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
            from saev_core.config import load_section

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
