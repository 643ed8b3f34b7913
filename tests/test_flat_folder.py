"""A flat class-folder set (no split folders, some CMYK / 16-bit / broken files) runs through
extract, validate, train and stats with only the model, the data and the output paths given."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from saev_core import shards
from saev_core.browser import browser_data
from saev_core.data import CMYK_PLAIN, GREY16, BadImage
from saev_core.extract import ExtractConfig, ShardSetMismatch, extract
from saev_core.stats.stage import StatsStage, stats_stage
from saev_core.training.stage import TrainStage, train_stage
from saev_core.validate import validate_shards

torch.set_num_threads(min(2, torch.get_num_threads()))
CLASSES = {"ant": (200, 40, 40), "bee": (40, 200, 40), "cow": (40, 40, 200)}
SAE = {"arch": "topk", "d_sae": 32, "k": 4, "batch_size": 64, "n_epochs": 1, "warmup_steps": 2,
       "aux_k": 8, "dead_after_tokens": 64, "device": "cpu"}  # fmt: skip


def hashed_val(key: str, fraction: float = 0.1) -> bool:
    """The held-out rule, written out independently of saev_core."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < fraction * 2**64


def photo(colour, size, seed):
    """A noisy image of one dominant colour, `size` = (w, h)."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(colour, 30, (size[1], size[0], 3)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat") / "photos"
    for c, (name, colour) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True)
        for i in range(14):
            size = (48, 36) if i % 2 else (40, 40)
            photo(colour, size, 100 * c + i).save(root / name / f"{i:02d}.jpg", quality=90)
    # converted by default: a CMYK JPEG without a profile and a 16-bit grey PNG
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(root / "ant/cmyk.jpg", format="JPEG")
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(root / "cow/deep.png")
    # still skipped and reported
    (root / "bee/broken.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 20)
    (root / "bee/empty.png").write_bytes(b"")
    return root


def test_flat_folder_end_to_end(folder, tiny_vit, tmp_path):
    acts = tmp_path / "acts"
    # what a user changes: model, data, output paths (and the layer: the tiny ViT has 2 blocks)
    cfg = ExtractConfig(model=str(tiny_vit), data=str(folder), out_dir=str(acts), layers=(1,))
    m = extract(cfg, progress=False)

    keys = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    good = [k for k in keys if k not in ("bee/broken.jpg", "bee/empty.png")]
    images = shards.read_images(acts)
    assert sorted(images["key"]) == good
    want = {k: "val" if hashed_val(k) else "train" for k in good}
    assert dict(zip(images["key"], images["split"], strict=True)) == want
    n_val = sum(s == "val" for s in want.values())
    assert n_val > 0 and m["splits"] == {"train": len(good) - n_val, "val": n_val}
    assert m["val_split"] == {
        "from": "train", "fraction": 0.1, "by": "blake2b-64(key) < fraction * 2^64"
    }  # fmt: skip
    assert sorted(s["key"] for s in m["skipped"]) == ["bee/broken.jpg", "bee/empty.png"]
    assert m["converted"] == {CMYK_PLAIN: 1, GREY16: 1}
    listed = json.loads((acts / "converted.json").read_text())
    assert [(c["key"], c["conversion"]) for c in listed] == [
        ("ant/cmyk.jpg", CMYK_PLAIN),
        ("cow/deep.png", GREY16),
    ]
    labels = dict(zip(images["key"], images["labels"].map(list), strict=True))
    assert all(labels[k] == [k.split("/")[0]] for k in good)

    validate_shards(acts, tmp_path / "report.json")

    sae_dir = tmp_path / "sae"
    metrics = train_stage(
        TrainStage(shard_dir=str(acts), layer=1, out_dir=str(sae_dir), sae=SAE), progress=False
    )
    assert np.isfinite(metrics["fvu"])

    stats_dir = tmp_path / "stats"
    out = stats_stage(
        StatsStage(
            sae_dir=str(sae_dir),
            shard_dir=str(acts),
            out_dir=str(stats_dir),
            run="flat",
            options={"n_top": 4, "n_heatmaps": 2, "splits": ["train", "val"]},  # as params.yaml
        ),
        progress=False,
    )
    assert sorted(out["labels"]) == sorted(CLASSES)
    fl = pd.read_parquet(stats_dir / "feature_labels.parquet")
    assert fl["image_auroc"].notna().any()
    # the browser shows image-level associations for this source (no masks)
    data = browser_data(stats_dir, ".")
    assert data["label_level"] == "image"
    assert any(f["auroc"] is not None for f in data["features"])


def test_a_changed_fraction_is_refused(folder, tiny_vit, tmp_path):
    base = dict(model=str(tiny_vit), data=str(folder), out_dir=str(tmp_path / "a"), layers=(0,))
    extract(ExtractConfig(**base), progress=False)
    with pytest.raises(ShardSetMismatch, match="val_split"):
        extract(ExtractConfig(**base, val_fraction=0.3), progress=False)
    m = extract(ExtractConfig(**base, val_fraction=0.3, overwrite=True), progress=False)
    images = shards.read_images(tmp_path / "a")
    assert m["val_split"]["fraction"] == 0.3
    assert dict(zip(images["key"], images["split"], strict=True)) == {
        k: "val" if hashed_val(k, 0.3) else "train" for k in images["key"]
    }


def test_strict_refuses_cmyk(tmp_path, tiny_vit):
    root = tmp_path / "photos"
    (root / "ant").mkdir(parents=True)
    photo((200, 40, 40), (40, 40), 0).save(root / "ant/a.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(root / "ant/b.jpg", format="JPEG")
    cfg = dict(model=str(tiny_vit), data=str(root), layers=(0,))
    with pytest.raises(BadImage, match=r"b\.jpg: CMYK colour \(strict"):
        extract(ExtractConfig(**cfg, out_dir=str(tmp_path / "a"), strict=True), progress=False)
    m = extract(ExtractConfig(**cfg, out_dir=str(tmp_path / "b")), progress=False)
    assert m["n_images"] == 2 and m["converted"] == {CMYK_PLAIN: 1} and m["skipped"] == []


def test_images_older_versions_skipped_for_their_mode_are_retried(folder):
    from saev_core.data import load_records
    from saev_core.extract import pending

    records = load_records(folder)
    old = {  # what a set extracted before conversion lists as skipped
        "ant/cmyk.jpg": "CMYK colour: converting to RGB without its ICC profile shifts colours",
        "cow/deep.png": "16-bit or float pixels (mode I;16): RGB conversion clips them",
        "bee/broken.jpg": "corrupt header (starts like an image, but PIL cannot read it)",
    }
    manifest = {
        "skipped": [
            {
                "key": k,
                "path": str(folder / k),
                "reason": why,
                "sha256": hashlib.sha256((folder / k).read_bytes()).hexdigest(),
            }
            for k, why in old.items()
        ]  # fmt: skip
    }
    extracted = [r.key for r in records if r.key not in old and r.key != "bee/empty.png"]
    todo = pending(records, manifest, extracted)
    # the two it can now convert come back; the corrupt one (unchanged) does not
    assert sorted(r.key for r in todo) == ["ant/cmyk.jpg", "bee/empty.png", "cow/deep.png"]
