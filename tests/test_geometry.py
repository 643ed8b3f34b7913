"""Patch geometry: masks, boxes and thumbnails follow the processor's own resize and centre crop.

The reference is always the family's image processor itself: the mask is encoded in the RGB
channels of an image (value = R + 256 G), pushed through the processor with nearest resampling
and without rescaling or normalisation, and decoded again. Each family is configured as its hub
checkpoints are, at tiny sizes: CLIP resizes the short side and crops a square (224/224 on the
hub; 32/32 here), DINOv2 with and without registers resizes the short side to more than the crop
(256/224; 40/32), SigLIP and ViT resize to a fixed square with no crop. Images are 320 x 240,
240 x 320 and 240 x 240.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from saev_core.backbone import load_backbone  # noqa: E402
from saev_core.data import ImageRecord  # noqa: E402
from saev_core.extract import ExtractConfig, ShardSetMismatch, extract, patch_majority  # noqa: E402
from saev_core.geometry import Geometry  # noqa: E402
from saev_core.intervene import TokenLayout, patches_in_bbox  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VISION = dict(TINY, image_size=32, patch_size=8)
SIZES = [(320, 240), (240, 320), (240, 240)]  # (width, height)


def _model(name: str) -> Any:
    import transformers as tf

    if name == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION))
    if name == "siglip":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION))
    if name == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**VISION))
    if name == "dinov2_registers":
        return tf.Dinov2WithRegistersModel(
            tf.Dinov2WithRegistersConfig(**VISION, num_register_tokens=4)
        )
    return tf.ViTModel(tf.ViTConfig(**VISION), add_pooling_layer=False)


def _processor(name: str) -> Any:
    import transformers as tf

    # The PIL backends, as without torchvision; the torchvision ones resample images a grey
    # level apart (masks go through PIL's nearest either way).

    if name == "clip":
        return tf.CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    if name in ("dinov2", "dinov2_registers"):
        return tf.BitImageProcessorPil(
            size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
        )
    if name == "siglip":
        return tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return tf.ViTImageProcessorPil(size={"height": 32, "width": 32})


FAMILIES = ("clip", "siglip", "dinov2", "dinov2_registers", "vit")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each family saved with its processor, loadable like a hub checkpoint."""
    root = tmp_path_factory.mktemp("geometry_families")
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        _model(name).save_pretrained(root / name)
        _processor(name).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def backbones(saved) -> dict[str, Any]:
    return {name: load_backbone(str(path), device="cpu") for name, path in saved.items()}


def make_mask(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Rectangles and ellipses of values up to 300 (two bytes) on background 0."""
    rng = np.random.default_rng(seed)
    im = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(im)
    for v in rng.permutation([7, 42, 255, 300, 3, 99])[: rng.integers(4, 7)]:
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        x1, y1 = x0 + rng.integers(15, w // 2), y0 + rng.integers(15, h // 2)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=int(v))
    return np.asarray(im).astype(np.uint16)


def through_processor(processor: Any, mask: np.ndarray) -> np.ndarray:
    """The mask as the model sees it, computed by the processor itself (nearest, no rescaling)."""
    m = mask.astype(np.int64)
    rgb = np.stack([m % 256, m // 256, np.zeros_like(m)], axis=-1).astype(np.uint8)
    out = processor(
        images=[Image.fromarray(rgb)],
        resample=Image.Resampling.NEAREST,
        do_rescale=False,
        do_normalize=False,
        return_tensors="np",
    )["pixel_values"][0]
    return (out[0].astype(np.int64) + 256 * out[1].astype(np.int64)).astype(mask.dtype)


def majority(m: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per patch (row-major), the most frequent value; ties to the lowest value."""
    gh, gw = grid
    ph, pw = m.shape[0] // gh, m.shape[1] // gw
    out = []
    for r in range(gh):
        for c in range(gw):
            counts = Counter(m[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].ravel().tolist())
            top = max(counts.values())
            out.append(min(v for v, n in counts.items() if n == top))
    return np.array(out)


def old_patch_majority(mask: np.ndarray, grid: tuple[int, int], size: tuple[int, int]):
    """The code before: the whole mask squashed to the input size by nearest neighbour."""
    h, w = size
    m = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((w, h), Image.NEAREST))
    return majority(m, grid)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mask_follows_the_processor(family, size, backbones):
    bb = backbones[family]
    w, h = size
    for seed in range(3):
        mask = make_mask(w, h, seed)
        want = through_processor(bb.processor, mask)
        got = bb.geometry.transform_mask(mask)
        assert got.shape == want.shape == bb.image_size
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            patch_majority(mask, bb.grid, bb.geometry), majority(want, bb.grid)
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_read_from_processor(family, backbones):
    g = backbones[family].geometry
    if family == "clip":
        assert (g.resize, g.shortest_edge, g.crop_height, g.crop_width) == (
            "shortest_edge",
            32,
            32,
            32,
        )
        assert g.resized_size(320, 240) == (42, 32)  # int(32 * 320 / 240) = 42, not round(42.7)
        assert g.crop_box(320, 240) == (5, 0, 37, 32)
    elif family.startswith("dinov2"):
        assert (g.resize, g.shortest_edge, g.crop_height) == ("shortest_edge", 40, 32)
        assert g.crop_box(240, 320) == (4, 10, 36, 42)  # resized 40 x 53: (53 - 32) // 2
    else:
        assert (g.resize, g.height, g.width, g.crop_height) == ("height_width", 32, 32, 0)
    assert Geometry.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_the_old_squash_disagrees_with_the_crop(backbones):
    """Before: on 320 x 240 under a cropping processor, patch labels were those of a squashed
    mask; some disagree with the processor's own crop. Now all agree."""
    for family in ("clip", "dinov2"):
        bb = backbones[family]
        agree_old, agree_new = [], []
        for seed in range(5):
            mask = make_mask(320, 240, seed)
            want = majority(through_processor(bb.processor, mask), bb.grid)
            agree_old.append(np.mean(old_patch_majority(mask, bb.grid, bb.image_size) == want))
            agree_new.append(np.mean(patch_majority(mask, bb.grid, bb.geometry) == want))
        assert np.mean(agree_old) < 0.95, family
        assert np.mean(agree_new) == 1.0, family


def test_view_is_the_processors_image(backbones):
    rng = np.random.default_rng(1)
    for family in ("clip", "dinov2", "vit"):
        bb = backbones[family]
        for w, h in SIZES:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            want = bb.processor(
                images=[image], do_rescale=False, do_normalize=False, return_tensors="np"
            )["pixel_values"][0]
            got = np.asarray(bb.geometry.view(image)).transpose(2, 0, 1)
            np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_crop_larger_than_the_image_pads_as_the_processor_does():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 20}, crop_size={"height": 33, "width": 25}
    )
    g = Geometry.from_processor(processor)
    for w, h in [(17, 19), (40, 30), (30, 41)]:
        mask = make_mask(w * 8, h * 8)[::8, ::8].copy()
        np.testing.assert_array_equal(g.transform_mask(mask), through_processor(processor, mask))


def test_unsupported_processor_settings_are_named():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, do_pad=True)
    with pytest.raises(ValueError, match="do_pad"):
        Geometry.from_processor(processor)
    with pytest.raises(ValueError, match="max_height"):
        Geometry.from_processor(
            SimpleNamespace(do_resize=True, size={"max_height": 4, "max_width": 4})
        )
    with pytest.raises(ValueError, match="geometry: unknown fields"):
        Geometry.from_dict({"resize": "none", "zoom": 2})


# ---------------------------------------------------------------------------------------------
# the cropped view downstream: probe targets, intervention scopes


CLASSES = {42: "cat", 300: "dog"}


def _record(tmp_path: Path, mask: np.ndarray) -> ImageRecord:
    path = tmp_path / "mask.png"
    Image.fromarray(mask.astype(np.uint16)).save(path)
    Image.fromarray(np.zeros((*mask.shape, 3), np.uint8)).save(tmp_path / "a.png")  # its image
    return ImageRecord(
        0, "val", "a.png", tmp_path / "a.png", (), path, {v: (c,) for v, c in CLASSES.items()}
    )


def test_probe_targets_use_the_crop(backbones, tmp_path):
    from saev_core.probes import patch_targets

    bb = backbones["clip"]
    mask = make_mask(320, 240, seed=2)
    mask[:, :40] = 42  # a cat in the left margin, which the crop cuts away
    record = _record(tmp_path, mask)
    classes = ["background", "cat", "dog"]
    values = majority(through_processor(bb.processor, mask), bb.grid)
    want = np.array([classes.index(CLASSES[v]) if v in CLASSES else 0 for v in values])
    np.testing.assert_array_equal(patch_targets(record, classes, bb.grid, bb.geometry), want)


def test_intervention_scopes_use_the_crop(backbones, tmp_path):
    from saev_core.hypotheses.readers import _scope

    bb = backbones["clip"]
    layout = TokenLayout.of_backbone(bb)
    assert layout.geometry == bb.geometry
    w, h = 320, 240
    mask = make_mask(w, h, seed=3)
    mask[mask == 42] = 0
    mask[60:200, 0:150] = 42  # the cat: partly in the cut-away margin
    record = _record(tmp_path, mask)
    es = SimpleNamespace(records=[record], images=[np.zeros((h, w, 3), np.uint8)])
    reader = SimpleNamespace(layout=layout)
    idx = np.array([0])

    # target: the patches the processor's crop of the cat's pixels covers at least half
    cat = through_processor(bb.processor, (mask == 42).astype(np.uint16)).astype(bool)
    gh, gw = bb.grid
    cover = cat.reshape(gh, 8, gw, 8).mean(axis=(1, 3)).ravel()
    tokens = _scope(SimpleNamespace(scope="target", target="cat"), reader, es, idx)
    assert tokens.shape == (1, bb.n_tokens)
    assert not tokens[0, : bb.n_prefix_tokens].any()
    np.testing.assert_array_equal(tokens[0, bb.n_prefix_tokens :].numpy(), cover >= 0.5)

    # region: a box inside the crop covers the patches its processed pixels fall in
    box = (118.0, 79.0, 202.0, 162.0)  # in the input: x 10.5..21.5, y 10.5..21.6, off borders
    box_mask = np.zeros((h, w), np.uint16)
    box_mask[79:162, 118:202] = 1
    inside = through_processor(bb.processor, box_mask).reshape(gh, 8, gw, 8).any(axis=(1, 3))
    tokens = _scope(SimpleNamespace(scope="region", bbox=box), reader, es, idx)
    np.testing.assert_array_equal(tokens[0, bb.n_prefix_tokens :].numpy(), inside.ravel())
    # a box in the margin the crop cuts away touches no patch (the squash gave it column 0)
    margin = (0.0, 0.0, 30.0, 240.0)
    assert not patches_in_bbox(layout, margin, (h, w)).any()
    assert patches_in_bbox(TokenLayout(1, True, bb.grid, bb.image_size), margin, (h, w)).any()


# ---------------------------------------------------------------------------------------------
# the manifest records the geometry


def _segmentation_folder(root: Path) -> Path:
    """Two non-square images with masks per split, classes 1 = cat, 2 = dog."""
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            for sub in ("images", "masks"):
                (root / sub / split).mkdir(parents=True, exist_ok=True)
            w, h = (320, 240) if i % 2 == 0 else (240, 320)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            mask = make_mask(w, h, seed=10 + i)
            mask = np.where(mask == 0, 0, np.where(mask % 2, 1, 2)).astype(np.uint8)
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    return root


def test_manifest_records_geometry_and_labels_follow_the_crop(saved, tmp_path):
    from saev_core import shards

    data = _segmentation_folder(tmp_path / "seg")
    out = tmp_path / "acts"
    cfg = ExtractConfig(
        model=str(saved["clip"]), data=str(data), out_dir=str(out), splits=("train", "val"),
        layers=(0,), batch_size=2, device="cpu", n_workers=1,
    )  # fmt: skip
    m = extract(cfg, progress=False)
    assert m["geometry"] == {
        "resize": "shortest_edge",
        "shortest_edge": 32,
        "longest_edge": 0,
        "height": 0,
        "width": 0,
        "crop_height": 32,
        "crop_width": 32,
        "resample": "bicubic",
        "backend": "pil",
    }
    assert json.loads((out / shards.MANIFEST).read_text())["geometry"] == m["geometry"]

    processor = _processor("clip")
    labels = shards.read_patch_labels(out)
    for row in shards.read_images(out).itertuples():
        mask = np.asarray(Image.open(Path(row.path.replace("/images/", "/masks/"))))
        values = majority(through_processor(processor, mask), (4, 4))
        want = {(p + 1, {1: "cat", 2: "dog"}[v]) for p, v in enumerate(values) if v}
        mine = labels[labels.image_id == row.image_id]
        assert set(zip(mine.token, mine.label, strict=True)) == want

    # A set from before the geometry was recorded: a cropping processor must not extend it.
    manifest = json.loads((out / shards.MANIFEST).read_text())
    del manifest["geometry"]
    (out / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardSetMismatch, match="geometry"):
        extract(cfg, progress=False)


def test_old_manifest_without_geometry_still_reads(tiny_world, tiny_vit, tmp_path):
    """A squashing processor (the demo ViT): an old set is extended as before, and the browser
    falls back to whole-image thumbnails."""
    import pandas as pd

    from saev_core import shards
    from saev_core.browser import _geometry

    out = tmp_path / "acts"
    cfg = ExtractConfig(
        model=str(tiny_vit), data=str(tiny_world), out_dir=str(out), splits=("val",),
        layers=(0,), batch_size=8, device="cpu", n_workers=1,
    )  # fmt: skip
    m = extract(cfg, progress=False)
    assert m["geometry"]["resize"] == "height_width" and m["geometry"]["crop_height"] == 0
    run = pd.Series({"shard_dir": str(out)})
    assert _geometry(run, tmp_path) == Geometry.from_dict(m["geometry"])
    manifest = json.loads((out / shards.MANIFEST).read_text())
    del manifest["geometry"]
    (out / shards.MANIFEST).write_text(json.dumps(manifest))
    assert _geometry(run, tmp_path) is None
    assert extract(cfg, progress=False)["n_images"] == m["n_images"]  # up to date, no error


def test_browser_thumbnail_is_the_processors_view(backbones, tmp_path):
    from saev_core.browser import _thumb

    bb = backbones["clip"]
    rng = np.random.default_rng(5)
    path = tmp_path / "wide.png"
    image = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    image.save(path)
    want = bb.processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")
    got = np.asarray(_thumb(path, 64, bb.geometry, bb.grid)).transpose(2, 0, 1)
    np.testing.assert_array_equal(got, want["pixel_values"][0].astype(np.uint8))
    assert _thumb(path, 64).size == (64, 48)  # no geometry: the whole image, as before


# ---------------------------------------------------------------------------------------------
# a processor the geometry cannot follow: checked against the processor itself, refused clearly


class _Flipping:
    """A processor that mirrors its output: settings read like CLIP's, pixels land elsewhere."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        out["pixel_values"] = out["pixel_values"][..., ::-1].copy()
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_read_geometry_checks_the_processor_itself(family):
    from saev_core.geometry import read_geometry

    processor = _processor(family)
    geometry, why = read_geometry(processor)
    assert why == "" and geometry == Geometry.from_processor(processor)
    geometry, why = read_geometry(_Flipping(processor))
    assert geometry is None and "moves pixels otherwise" in why


def test_without_a_geometry_pixels_refuse_to_map_to_patches(tmp_path):
    from saev_core.extract.chunks import _add_patch_labels

    record = _record(tmp_path, np.zeros((8, 8), np.uint8))
    bb = SimpleNamespace(geometry=None, geometry_error="it mirrors", grid=(2, 2))
    with pytest.raises(ValueError, match="cannot label patches.*it mirrors"):
        _add_patch_labels({"image_id": [], "token": [], "label": []}, record, 0, bb)
    layout = TokenLayout(1, True, (2, 2), (32, 32), None, "it mirrors")
    with pytest.raises(ValueError, match="it mirrors"):
        patches_in_bbox(layout, (0, 0, 4, 4), (8, 8))
