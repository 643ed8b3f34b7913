"""Tests for the forms world: each concept as a filled shape, an outline and a written word.

Determinism, coverage of every concept x form in every split, labels against the pixels, the
captions against objects.csv, the labels reaching records, patch labels and shards, and an
outline's two parts (ink with its colour, inside with only its shape) against the world of
one-value outlines it replaced (`FORMS_VERSION` 1: same images, labels and captions).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from test_shapes import read_csv, tree_digest

from saev_core import shapes
from saev_core.data import load_records
from saev_core.shapes import (
    COLOURS,
    CONCEPTS,
    FORMS,
    FORMS_VERSION,
    SHAPES,
    FormsConfig,
    ShapesConfig,
    generate,
    image_seed,
    read_captions,
    render_forms_image,
    whole_objects,
)
from saev_core.shapes import forms as shapes_forms

SMALL = FormsConfig(seed=5, n_train=10, n_val=4, n_test=4)
SMALL_TREE_SHA256 = "115714d6858d55a5565fabcc5100d5387aa9e54b758589e9a1560f6eab0f4c75"
# SMALL as FORMS_VERSION 1 wrote it (an outline one mask value), digested by `_v1_digests` from
# that code's output: the images, images.csv and captions.csv; the masks' arrays; objects.csv.
V1_IMAGES_SHA256 = "97c3dc1cff8c625e697cebb7d302df50151f691c76d244b8677856b4fa103b96"
V1_MASKS_SHA256 = "0b3268c08e0cc31abffaba9fc4a8c076bb480064d7910b7b2a4ec54be892afe0"
V1_OBJECTS_SHA256 = "11ef105ecf6d7b4a655bfbe51fb0a30f7378ef30fe789e0fb76a8b0aa28d5424"
V1_OBJECT_COLUMNS = shapes.FORMS_OBJECT_COLUMNS[:-2]  # without part, part_of
# Enough images that every concept x form shows in every split (checked, not assumed).
COVER = FormsConfig(seed=0, n_train=100, n_val=100, n_test=100)
# Flat backgrounds and no pixel noise: ink, colour and background are told apart by value.
FLAT = FormsConfig(seed=1, n_train=40, n_val=10, n_test=10, pixel_noise=0, background_contrast=0)


def expected_labels(obj: dict[str, str]) -> set[str]:
    """An object's labels, spelled out from its columns (the documented vocabulary)."""
    concepts = {c for c in (obj["shape"], obj["colour"]) if c}
    return concepts | {f"{c}:{obj['form']}" for c in concepts} | {obj["form"]}


@pytest.fixture(scope="module")
def cover(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forms") / "cover"
    generate(out, COVER, progress=False)
    return out


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forms") / "flat"
    generate(out, FLAT, progress=False)
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, SMALL, progress=False)
    shapes_forms._word_glyphs.cache_clear()  # the words are rendered again, not reused from the cache
    generate(b, SMALL, progress=False)
    generate(c, FormsConfig(seed=6, n_train=10, n_val=4, n_test=4), progress=False)
    da, db, dc = tree_digest(a), tree_digest(b), tree_digest(c)
    assert da == db
    # Pinned (this code, Pillow 13.0.0 of constraints.txt, its FreeType 2.14.3): a change to how
    # the world is drawn shows here first; update it with the DVC-pinned data/forms, on purpose.
    whole = hashlib.sha256(b"".join(k.encode() + b"\0" + bytes.fromhex(v) for k, v in da.items()))
    assert whole.hexdigest() == SMALL_TREE_SHA256
    assert "captions.csv" in da and len(da) == 2 * 18 + 4
    assert da["objects.csv"] != dc["objects.csv"] and da["captions.csv"] != dc["captions.csv"]
    # Any image regenerates alone from its seed.
    rgb, mask, _ = render_forms_image(image_seed(SMALL.seed, 12), SMALL)
    assert np.array_equal(rgb, np.asarray(Image.open(a / "images/val/00012.png")))
    assert np.array_equal(mask, np.asarray(Image.open(a / "masks/val/00012.png")))
    world = json.loads((a / "world.json").read_text())
    assert world["world"] == "forms" and world["config"]["world"] == "forms"
    assert world["concepts"] == list(CONCEPTS)  # the plain concepts, as the default world's
    assert len(world["labels"]) == 8 + 8 * 3 + 3


def _one_value_outlines(mask: np.ndarray, rows: list[dict[str, str]]) -> np.ndarray:
    """`mask` with each outline's inside given back to its outline (`part_of`): one value per
    object, as FORMS_VERSION 1 wrote it. `rows` are the image's objects.csv rows."""
    lut = np.arange(256, dtype=np.uint8)
    for r in rows:
        lut[int(r["object"])] = int(r["part_of"])
    return lut[mask]


def test_outline_parts_keep_images_labels_and_captions(tmp_path: Path) -> None:
    """Splitting outlines into ink and inside changes the masks' values and objects.csv's rows
    only: merged back, both are FORMS_VERSION 1's, byte for byte."""
    out = tmp_path / "w"
    generate(out, SMALL, progress=False)
    images = hashlib.sha256()
    for path in sorted((out / "images").rglob("*.png")):
        images.update(path.relative_to(out).as_posix().encode() + b"\0" + path.read_bytes())
    for name in ("images.csv", "captions.csv"):
        images.update(name.encode() + b"\0" + (out / name).read_bytes())
    assert images.hexdigest() == V1_IMAGES_SHA256

    rows = read_csv(out / "objects.csv")
    by_image: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    masks = hashlib.sha256()
    n_split = 0
    for path in sorted((out / "masks").rglob("*.png")):
        mask = np.asarray(Image.open(path))
        merged = _one_value_outlines(mask, by_image.get(int(path.stem), []))
        n_split += int((merged != mask).any())
        masks.update(merged.tobytes())
    assert masks.hexdigest() == V1_MASKS_SHA256
    assert n_split >= 3  # the pins above are met by a world with outlines split, not by chance

    whole = [r for r in rows if r["part"] != "inside"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(V1_OBJECT_COLUMNS)
    writer.writerows([r[c] for c in V1_OBJECT_COLUMNS] for r in whole)
    assert hashlib.sha256(buf.getvalue().encode()).hexdigest() == V1_OBJECTS_SHA256

    # The parts: objects first (ink or whole, part_of = itself), then the insides.
    for mine in by_image.values():
        n = sum(r["part"] != "inside" for r in mine)
        for r in mine:
            v, owner = int(r["object"]), mine[int(r["part_of"]) - 1]
            if r["part"] == "inside":
                assert v > n and owner["part"] == "ink" and owner["form"] == "outline"
                assert (r["shape"], r["colour"]) == (owner["shape"], "")
                assert set(r["labels"].split(";")) == {
                    r["shape"],
                    f"{r['shape']}:outline",
                    "outline",
                }
            else:
                assert v <= n and owner is r
                assert r["part"] == ("ink" if r["form"] == "outline" else "whole")
    world = json.loads((out / "world.json").read_text())
    assert world["forms_version"] == FORMS_VERSION == 2
    assert "inside" in world["mask"] and "part_of" in world["parts"]
    counts = world["counts"]
    assert counts["objects"] == len(whole) and counts["outline_insides"] == len(rows) - len(whole)
    hist = counts["images_with_n_objects"]
    assert sum(int(k) * c for k, c in hist.items()) == len(whole)


def insides_of(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r["part"] == "inside"]


def test_an_outline_is_one_object_to_occlusion(cover: Path) -> None:
    """Merged back into one value, every drawing keeps >= 1 - max_occlusion of its silhouette
    and every word all of its box; an outline's ink and inside tile its visible silhouette."""
    rows = read_csv(cover / "objects.csv")
    by_image: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    captions = read_captions(cover)
    n_outlines = 0
    for rec in load_records(cover):
        mask = np.asarray(Image.open(rec.mask_path))
        mine = by_image.get(rec.image_id, [])
        merged = _one_value_outlines(mask, mine)
        for r in whole_objects(mine):
            v = int(r["object"])
            if r["form"] == "word":
                area = (int(r["x1"]) - int(r["x0"])) * (int(r["y1"]) - int(r["y0"]))
                assert (merged == v).sum() == area
                continue
            full = shapes.shape_mask(r["shape"], int(r["cx"]), int(r["cy"]), int(r["radius"]), 64)
            assert not (merged == v)[~full].any()
            assert (merged == v).sum() >= (1 - COVER.max_occlusion) * full.sum()
            if r["form"] == "outline":
                n_outlines += 1
                ink = shapes.outline_ink(full, COVER.outline_width)
                assert not ((mask == v) & ~ink).any()  # the ink's value is only on the ink
                insides = [
                    int(o["object"]) for o in insides_of(mine) if o["part_of"] == r["object"]
                ]
                assert not (np.isin(mask, insides) & ink).any()
        text = captions[rec.image_id]  # one phrase per object, none for an inside
        phrases = [] if text == shapes.EMPTY_CAPTION else _parse_caption(text)
        assert len(phrases) == len(whole_objects(mine)) == len(mine) - len(insides_of(mine))
    assert n_outlines >= 100


def test_every_concept_in_every_form_in_each_split(cover: Path) -> None:
    objects = pd.read_csv(cover / "objects.csv", keep_default_na=False)
    objects = objects[objects["part"] != "inside"]  # an outline's inside is part of an object
    images = pd.read_csv(cover / "images.csv", keep_default_na=False)
    objects = objects.merge(images[["image_id", "split"]], on="image_id")
    long = pd.concat(
        [
            objects[objects[col] != ""][["split", "form", col]].rename(columns={col: "concept"})
            for col in ("shape", "colour")
        ]
    )
    seen = long.groupby(["split", "concept", "form"]).size()
    for split in ("train", "val", "test"):
        for concept in CONCEPTS:
            for form in FORMS:
                assert seen.get((split, concept, form), 0) >= 1, (split, concept, form)
    # world.json's per-split counts are these counts.
    counts = json.loads((cover / "world.json").read_text())["counts"]["objects_with_label"]
    for (split, concept, form), n in seen.items():
        assert counts[split][f"{concept}:{form}"] == n
    # A word writes one concept; a drawing has both a shape and a colour.
    words = objects[objects["form"] == "word"]
    assert ((words["shape"] == "") ^ (words["colour"] == "")).all()
    assert (words["word"] == words["shape"] + words["colour"]).all()
    assert words["font_size"].between(COVER.min_font_size, COVER.max_font_size).all()
    drawings = objects[objects["form"] != "word"]
    assert drawings["shape"].isin(SHAPES).all() and drawings["colour"].isin(COLOURS).all()
    assert (drawings["word"] == "").all() and (drawings["font_size"] == 0).all()


def test_labels_follow_objects(cover: Path) -> None:
    objects = read_csv(cover / "objects.csv")
    by_image: dict[str, list[dict[str, str]]] = {}
    for o in objects:
        assert set(o["labels"].split(";")) == expected_labels(o)
        if o["part"] == "inside":  # no colour: the inside shows the background
            assert o["colour"] == "" and set(o["labels"].split(";")).isdisjoint(COLOURS)
        by_image.setdefault(o["image_id"], []).append(o)
    vocabulary = set(json.loads((cover / "world.json").read_text())["labels"])
    for r in read_csv(cover / "images.csv"):
        want = set().union(*(expected_labels(o) for o in by_image.get(r["image_id"], [])))
        assert set(filter(None, r["labels"].split(";"))) == want
        assert want <= vocabulary
    # Labels are safe as they are: no quote, space or "@" (MLflow refuses "@" in metric names).
    assert all(re.fullmatch(r"[a-z]+(:[a-z]+)?", label) for label in vocabulary)


def _patch_majority(mask: np.ndarray, p: int) -> np.ndarray:
    """Per 8-px patch, the most frequent mask value (ties to the lower), by hand."""
    h, w = mask.shape
    out = np.zeros((h // p, w // p), dtype=int)
    for i in range(h // p):
        for j in range(w // p):
            counts = np.bincount(mask[i * p : (i + 1) * p, j * p : (j + 1) * p].ravel())
            out[i, j] = int(np.argmax(counts))
    return out


def test_patch_labels_agree_with_pixels(flat: Path) -> None:
    """Flat backgrounds (grey >= 70), ink <= 40 and saturated colours: a pixel is ink when all
    its channels are 20 below the image's flat background, coloured when they spread by > 60.
    A patch's labels are those of its majority mask value, as records hand them out."""
    objects = read_csv(flat / "objects.csv")
    records = {r.image_id: r for r in load_records(flat)}
    n_word_patches = n_word_ink = n_outline_inside = 0
    n_inside_only = n_ink_patches = n_were_coloured = 0
    for image_id, rec in records.items():
        rgb = np.asarray(Image.open(rec.path)).astype(int)
        mask = np.asarray(Image.open(rec.mask_path))
        background = rgb[mask == 0]
        assert (background == background[0]).all()  # flat, as configured
        ink = rgb.max(axis=-1) < background.min() - 20
        coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 60
        mine = [o for o in objects if int(o["image_id"]) == image_id]
        # The reader hands each mask value its object's labels (what patch labels come from).
        assert rec.mask_labels == {
            int(o["object"]): tuple(sorted(expected_labels(o))) for o in mine
        }
        assert set(rec.labels) == set().union(*(expected_labels(o) for o in mine))
        words = [int(o["object"]) for o in mine if o["form"] == "word"]
        insides = [int(o["object"]) for o in mine if o["part"] == "inside"]
        assert not (ink & ~np.isin(mask, words)).any()  # ink only inside word boxes
        # Colour only on filled objects and outlines' ink.
        assert not (coloured & np.isin(mask, [0, *words, *insides])).any()
        majority = _patch_majority(mask, 8)
        merged = _patch_majority(_one_value_outlines(mask, mine), 8)
        for i, j in np.ndindex(*majority.shape):
            block = (slice(8 * i, 8 * i + 8), slice(8 * j, 8 * j + 8))
            labels = set(rec.mask_labels.get(int(majority[i, j]), ()))
            o = mine[int(majority[i, j]) - 1] if majority[i, j] else None
            if not coloured[block].any() and o and o["form"] != "word":
                assert labels.isdisjoint(COLOURS)  # no colour to see, no colour (but a word's)
            if np.isin(mask[block], insides).all():  # inside-only: the shape, no colour
                assert labels == expected_labels(o) and o["shape"] in labels
                n_inside_only += 1
            if o and o["part"] == "ink":  # mostly its ink (or ink >= inside > background)
                assert {o["colour"], f"{o['colour']}:outline", o["shape"]} <= labels
                n_ink_patches += 1
            was = mine[int(merged[i, j]) - 1] if merged[i, j] else None
            if was and was["form"] == "outline" and was["colour"] not in labels:
                n_were_coloured += 1  # a one-value outline gave this patch its colour
        for o in mine:
            v = int(o["object"])
            visible = mask == v
            x0, y0, x1, y1 = (int(o[k]) for k in ("x0", "y0", "x1", "y1"))
            assert visible[y0:y1, x0:x1].sum() == visible.sum()  # the box holds the mask
            patches = np.argwhere(majority == v)
            if o["part"] == "inside":  # background only, deeper than the ink
                owner = mine[int(o["part_of"]) - 1]
                assert not coloured[visible].any() and visible.any()
                sil = shapes.shape_mask(
                    o["shape"], int(o["cx"]), int(o["cy"]), int(o["radius"]), 64
                )
                hollow = sil & ~shapes.outline_ink(sil, FLAT.outline_width)
                assert owner["part"] == "ink" and not (visible & ~hollow).any()
                n_outline_inside += int(visible.sum())
                continue
            if o["form"] == "word":
                assert visible.sum() == (x1 - x0) * (y1 - y0)  # nothing covers a word
                assert len(patches) >= 1  # every word labels at least one patch
                for i, j in patches:
                    n_ink = int(ink[8 * i : 8 * i + 8, 8 * j : 8 * j + 8].sum())
                    assert n_ink >= 3  # a patch at a word's edge may hold only ascenders
                    n_word_patches += 1
                    n_word_ink += n_ink
                continue
            base = np.asarray(shapes.BASE_RGB[o["colour"]])
            nearest = {
                c: np.abs(rgb[visible & coloured].mean(axis=0) - np.asarray(b)).sum()
                for c, b in shapes.BASE_RGB.items()
            }
            assert min(nearest, key=nearest.get) == o["colour"]
            assert np.abs(rgb[visible & coloured].mean(axis=0) - base).max() <= 26
            if o["form"] == "filled":
                assert coloured[visible].all()
                continue
            # An outline's ink: coloured all of it, on the silhouette's rim, never deep inside.
            full = shapes.shape_mask(o["shape"], int(o["cx"]), int(o["cy"]), int(o["radius"]), 64)
            depth = ndimage.distance_transform_edt(np.pad(full, 1))[1:-1, 1:-1]
            assert coloured[visible].all() and (visible & (depth <= 1.0)).any()
            assert not (visible & (depth > FLAT.outline_width * 1.5)).any()
    assert n_word_patches >= 10 and n_outline_inside > 0
    assert n_word_ink / n_word_patches >= 8  # most word patches hold whole letters
    assert n_inside_only >= 5 and n_ink_patches >= 20 and n_were_coloured >= n_inside_only


def _parse_caption(text: str) -> list[tuple[str, str, str]]:
    """(form, shape, colour) per phrase of a caption, by regular expressions."""
    parts = re.split(r", | and ", text)
    out = []
    for part in parts:
        if m := re.fullmatch(r"a ([a-z]+) ([a-z]+)", part):
            out.append(("filled", m[2], m[1]))
        elif m := re.fullmatch(r"an outline of a ([a-z]+) ([a-z]+)", part):
            out.append(("outline", m[2], m[1]))
        elif m := re.fullmatch(r"the word ([a-z]+)", part):
            word = m[1]
            out.append(("word", word if word in SHAPES else "", word if word in COLOURS else ""))
        else:
            raise AssertionError(f"unparsed phrase {part!r} in {text!r}")
    return out


def test_captions_match_objects(cover: Path, tmp_path: Path) -> None:
    captions = read_captions(cover)
    file_rows = read_csv(cover / "captions.csv")
    assert captions == {int(r["image_id"]): r["caption"] for r in file_rows}
    assert sorted(captions) == list(range(COVER.n_images))
    objects = read_csv(cover / "objects.csv")
    for image_id, text in captions.items():
        mine = [o for o in objects if int(o["image_id"]) == image_id and o["part"] != "inside"]
        assert _parse_caption(text) == [(o["form"], o["shape"], o["colour"]) for o in mine]
    # Checked by eye on images/train/00002.png of seed 0: two circle outlines, "triangle" above.
    assert captions[2] == (
        "an outline of a red circle, an outline of a blue circle and the word triangle"
    )

    # Without captions.csv the captions are built from objects.csv: the same text.
    bare = tmp_path / "bare"
    shutil.copytree(cover, bare)
    (bare / "captions.csv").unlink()
    assert read_captions(bare) == captions


def test_captions_of_the_default_world_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    generate(out, ShapesConfig(seed=3, n_train=6, n_val=2, n_test=2), progress=False)
    assert not (out / "captions.csv").exists()
    captions = read_captions(out)
    objects = read_csv(out / "objects.csv")
    assert sorted(captions) == list(range(10))
    for image_id, text in captions.items():
        mine = [o for o in objects if int(o["image_id"]) == image_id]
        assert _parse_caption(text) == [("filled", o["shape"], o["colour"]) for o in mine]

    (out / "captions.csv").write_text("image_id,text\n0,a red circle\n")
    with pytest.raises(ValueError, match=r"captions\.csv.*caption"):
        read_captions(out)
    (out / "captions.csv").write_text("image_id,caption\nzero,a red circle\n")
    with pytest.raises(ValueError, match="line 2"):
        read_captions(out)
    with pytest.raises(FileNotFoundError, match="images.csv"):
        read_captions(tmp_path / "nowhere")


def test_patch_labels_reach_the_shards(tmp_path: Path, tiny_vit: Path) -> None:
    """Extraction with a 32 px model: the forms labels of each patch's majority mask value (an
    outline's inside: its shape's labels, no colour)."""
    from saev_core import shards
    from saev_core.extract import ExtractConfig, extract, patch_majority

    world = tmp_path / "forms"
    generate(world, FormsConfig(seed=2, n_train=4, n_val=4, n_test=4), progress=False)
    out = tmp_path / "acts"
    cfg = ExtractConfig(model=str(tiny_vit), data=str(world), out_dir=str(out), layers=(0,))
    extract(cfg, progress=False)
    labels = shards.read_patch_labels(out)
    objects = pd.read_csv(world / "objects.csv", keep_default_na=False)
    masks = {int(r["image_id"]): r["mask"] for r in read_csv(world / "images.csv")}
    assert set(labels["image_id"]) <= set(masks) and len(set(labels["image_id"])) >= 8
    seen_forms, seen_parts = set(), set()
    for image_id, rel in masks.items():
        mask = np.asarray(Image.open(world / rel))
        values = patch_majority(mask, (4, 4), (32, 32))
        mine = labels[labels["image_id"] == image_id]
        for patch, v in enumerate(values):
            got = set(mine.loc[mine["token"] == patch + 1, "label"])
            if v == 0:
                assert got == set()
                continue
            obj = objects[(objects["image_id"] == image_id) & (objects["object"] == v)].iloc[0]
            assert got == expected_labels(obj.to_dict())
            if obj["part"] == "inside":
                assert got.isdisjoint(COLOURS) and obj["shape"] in got
            seen_forms.add(obj["form"])
            seen_parts.add(obj["part"])
    assert seen_forms == set(FORMS) and seen_parts == set(shapes.PARTS)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="wider than image_size"):
        FormsConfig(max_font_size=30)
    with pytest.raises(ValueError, match="world"):
        FormsConfig(world="shapes")
    with pytest.raises(ValueError, match="outline_width"):
        FormsConfig(outline_width=0)
    with pytest.raises(ValueError, match="max_objects <= 127"):  # an outline takes two values
        FormsConfig(max_objects=128)
    assert FormsConfig(max_objects=127).max_objects == 127
    with pytest.raises(ValueError, match="font_size"):
        FormsConfig(min_font_size=14, max_font_size=12)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from saev_core import cli

    out = tmp_path / "cli"
    argv = ["shapes", "--world", "forms", "--out", str(out), "--seed", "3"]
    argv += ["--n-train", "2", "--n-val", "1", "--n-test", "1", "--no-progress"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 4 and "objects_with_label" in printed
    assert len(read_csv(out / "captions.csv")) == 4
    assert json.loads((out / "world.json").read_text())["config"]["seed"] == 3

    params = tmp_path / "params.yaml"
    params.write_text("forms:\n  seed: 9\n  n_train: 1\n  n_val: 1\n  n_test: 1\n  max_ink: 30\n")
    out2 = tmp_path / "from_params"
    assert shapes.main(["--world", "forms", "--params", str(params), "--out", str(out2)]) == 0
    config = json.loads((out2 / "world.json").read_text())["config"]
    assert (config["seed"], config["max_ink"], config["world"]) == (9, 30, "forms")
    params.write_text("forms:\n  font: big\n")
    assert shapes.main(["--world", "forms", "--params", str(params), "--out", str(out2)]) == 2
    assert "font" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        shapes.main(["--help"])
    assert "--world" in capsys.readouterr().out
