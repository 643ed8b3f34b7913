"""Tests for the built-in shapes world: determinism, layout, labels, masks, patch labels."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saev_core import shapes
from saev_core.shapes import (
    CONCEPTS,
    ShapesConfig,
    generate,
    image_seed,
    patch_labels,
    patch_object_ids,
    render_image,
    shape_mask,
)
from saev_core.shapes import world as shapes_world

TINY = ShapesConfig(seed=3, n_train=12, n_val=4, n_test=4)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, TINY, progress=False)
    return out


def test_same_seed_same_bytes_other_seed_differs(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, TINY, progress=False)
    assert tree_digest(world) == tree_digest(again)

    other = tmp_path / "other"
    generate(other, ShapesConfig(seed=4, n_train=12, n_val=4, n_test=4), progress=False)
    a, b = tree_digest(world), tree_digest(other)
    assert a.keys() == b.keys()
    assert a["images/train/00000.png"] != b["images/train/00000.png"]
    assert a["objects.csv"] != b["objects.csv"]


def test_one_image_regenerates_alone(world: Path) -> None:
    rgb, mask, objects = render_image(image_seed(TINY.seed, 13), TINY)
    assert np.array_equal(rgb, np.asarray(Image.open(world / "images/val/00013.png")))
    assert np.array_equal(mask, np.asarray(Image.open(world / "masks/val/00013.png")))
    rows = [r for r in read_csv(world / "objects.csv") if r["image_id"] == "13"]
    assert [int(r["object"]) for r in rows] == [o["object"] for o in objects]
    assert [r["shape"] for r in rows] == [o["shape"] for o in objects]


def test_layout_and_columns(world: Path) -> None:
    images = read_csv(world / "images.csv")
    assert list(images[0]) == ["image_id", "split", "image", "mask", "labels"]
    assert [int(r["image_id"]) for r in images] == list(range(20))
    assert [r["split"] for r in images] == ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    assert images[14]["image"] == "images/val/00014.png"
    assert images[19]["mask"] == "masks/test/00019.png"
    objects = read_csv(world / "objects.csv")
    assert list(objects[0]) == ["image_id", "object", "shape", "colour", "radius", "cx", "cy"]
    for r in images:
        im = Image.open(world / r["image"])
        m = Image.open(world / r["mask"])
        assert (im.mode, im.size) == ("RGB", (64, 64))
        assert (m.mode, m.size) == ("L", (64, 64))
        assert not im.info  # no metadata chunks
    meta = json.loads((world / "world.json").read_text())
    assert meta["concepts"] == list(CONCEPTS)
    assert meta["counts"]["images"] == 20
    assert meta["counts"]["objects"] == len(objects)
    assert meta["config"]["seed"] == 3
    assert (world / "world.json").read_bytes().endswith(b"}\n")
    assert not list(world.rglob("*.tmp"))


def test_labels_and_masks_match_objects(world: Path) -> None:
    objects = read_csv(world / "objects.csv")
    for r in read_csv(world / "images.csv"):
        mine = [o for o in objects if o["image_id"] == r["image_id"]]
        assert 1 <= len(mine) <= 3
        expected = sorted({o["shape"] for o in mine} | {o["colour"] for o in mine})
        assert r["labels"] == ";".join(expected)
        mask = np.asarray(Image.open(world / r["mask"]))
        assert set(np.unique(mask)) == {0} | {int(o["object"]) for o in mine}
        for o in mine:
            full = shape_mask(o["shape"], int(o["cx"]), int(o["cy"]), int(o["radius"]), 64)
            visible = (mask == int(o["object"])) & full
            assert visible.sum() == (mask == int(o["object"])).sum()  # never outside its shape
            assert visible.sum() >= 0.9 * full.sum()  # max_occlusion = 0.1
            assert 12 <= int(o["radius"]) <= 18


def test_object_pixels_carry_their_colour() -> None:
    rgb, mask, objects = render_image(image_seed(0, 5), ShapesConfig())
    for o in objects:
        mean = rgb[mask == o["object"]].astype(float).mean(axis=0)
        base = np.asarray(shapes.BASE_RGB[o["colour"]], dtype=float)
        assert np.abs(mean - base).max() <= 25 + 2  # colour_jitter plus noise averaging out


def test_shape_silhouettes_differ() -> None:
    masks = {s: shape_mask(s, 32, 32, 16, 64) for s in shapes.SHAPES}
    for a in shapes.SHAPES:
        for b in shapes.SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 100
    assert masks["circle"][32, 32] and not masks["circle"][17, 17]
    assert masks["square"][18, 18] and not masks["cross"][18, 18]
    assert masks["triangle"][47, 17] and not masks["triangle"][17, 17]


def test_patch_labels_on_hand_made_mask() -> None:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[0:8, 0:8] = 1  # patch 0: all object 1
    mask[0:8, 8:13] = 2  # patch 1: 40 of 64 px object 2
    mask[8:12, 0:8] = 1  # patch 2: exactly half object 1: a tie goes to background
    mask[8:16, 8:16] = 2  # patch 3: object 2 ...
    mask[8:11, 8:16] = 1  # ... 40 px, object 1 24 px
    objects = [
        {"object": 1, "shape": "square", "colour": "red"},
        {"object": 2, "shape": "cross", "colour": "blue"},
    ]
    assert patch_object_ids(mask, 8).tolist() == [1, 2, 0, 2]
    assert patch_labels(mask, objects, 8, 16) == [
        ["red", "square"],
        ["blue", "cross"],
        [],
        ["blue", "cross"],
    ]
    # A model that sees the image at 32 px with 16 px patches: the mask is resized first.
    assert patch_labels(mask, objects, 16, 32) == patch_labels(mask, objects, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        patch_labels(mask, objects, 5, 16)
    with pytest.raises(ValueError, match=r"\[2\]"):
        patch_labels(mask, objects[:1], 8, 16)


def test_refuses_to_overwrite(world: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(foreign, TINY, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "w"
    generate(out, TINY, progress=False)
    before = tree_digest(out)
    generate(out, TINY, progress=False)  # same config: rebuilt, same bytes
    assert tree_digest(out) == before
    other = ShapesConfig(seed=3, n_train=2, n_val=1, n_test=1)
    with pytest.raises(FileExistsError):
        generate(out, other, progress=False)
    counts = generate(out, other, overwrite=True, progress=False)
    assert counts["images"] == 4
    assert len(list((out / "images" / "train").iterdir())) == 2  # old outputs removed


def test_lattice_positions_and_radii() -> None:
    cfg = ShapesConfig(position_step=8, radius_step=3, n_train=30, n_val=0, n_test=0)
    for i in range(30):
        _, mask, objects = render_image(image_seed(0, i), cfg)
        for o in objects:
            assert o["cx"] % 8 == 0 and o["cy"] % 8 == 0
            assert o["radius"] in (12, 15, 18)
            assert o["radius"] <= o["cx"] <= 64 - o["radius"]


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="max_radius"):
        ShapesConfig(max_radius=40)
    with pytest.raises(ValueError, match="min_objects"):
        ShapesConfig(min_objects=0)
    with pytest.raises(ValueError, match="n_val"):
        ShapesConfig(n_val=-1)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--seed", "3", "--n-train", "2", "--n-val", "1", "--n-test", "1"]
    assert shapes.main([*argv, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 4
    assert shapes.main([*argv[:2], "--seed", "4", "--no-progress"]) == 2
    assert "overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shapes.main(["--help"])


# The default world must not change while variants (the forms world) are added: a digest of TINY's
# whole tree, computed with the code of commit a346184 (before the forms world), and the pinned
# data/shapes (DVC) where it is checked out.
TINY_TREE_SHA256 = "70e7e2975b3fbcfe3623c41eb4d88a50bbb21ce863a688afa1ce4086cd6b77c3"
PINNED = Path(__file__).resolve().parents[1] / "data" / "shapes"


def test_default_world_bytes_unchanged(world: Path) -> None:
    h = hashlib.sha256()
    for p in sorted(world.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(world)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    assert h.hexdigest() == TINY_TREE_SHA256
    assert not (world / "captions.csv").exists()


@pytest.mark.skipif(not (PINNED / "world.json").exists(), reason="data/shapes not checked out")
def test_default_world_matches_the_pinned_data() -> None:
    from saev_core.config import to_dict

    cfg = ShapesConfig()
    assert json.loads((PINNED / "world.json").read_text())["config"] == to_dict(cfg)
    images = {r["image_id"]: r for r in read_csv(PINNED / "images.csv")}
    objects = read_csv(PINNED / "objects.csv")
    for image_id in (0, 1, 2, 3999, 4000, 4499, 4500, 4999):
        rgb, mask, objs = render_image(image_seed(cfg.seed, image_id), cfg)
        row = images[str(image_id)]
        assert (
            shapes_world._png_bytes(rgb, cfg.compress_level) == (PINNED / row["image"]).read_bytes()
        )
        assert (
            shapes_world._png_bytes(mask, cfg.compress_level) == (PINNED / row["mask"]).read_bytes()
        )
        assert row["labels"] == ";".join(shapes.object_labels(objs))
        mine = [o for o in objects if o["image_id"] == str(image_id)]
        assert [(o["shape"], o["colour"], int(o["radius"])) for o in mine] == [
            (o["shape"], o["colour"], o["radius"]) for o in objs
        ]
