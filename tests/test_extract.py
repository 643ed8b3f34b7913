"""Extraction: the shards hold exactly the backbone's residual stream, with labels and manifest."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from saev_core import loaders, shards
from saev_core.backbone import load_backbone
from saev_core.extract import ExtractConfig, extract, patch_majority


def run(tiny_world, tiny_vit, out, **kw):
    kw.setdefault("layers", (0, -1))
    cfg = ExtractConfig(
        model=str(tiny_vit),
        data=str(tiny_world),
        out_dir=str(out),
        batch_size=5,
        images_per_row_group=4,
        images_per_file=8,
        **kw,
    )
    return extract(cfg, progress=False)


def test_manifest_and_files(tiny_world, tiny_vit, tmp_path):
    out = tmp_path / "acts"
    m = run(tiny_world, tiny_vit, out)
    assert m["layers"] == [0, 1] and m["d_model"] == 32 and m["dtype"] == "float16"
    assert m["tokens"]["n_prefix_tokens"] == 1 and m["tokens"]["n_patches"] == 16
    assert m["n_images"] == 24 and m["splits"] == {"train": 12, "val": 6, "test": 6}
    assert m["model"]["weights_sha256"] and len(m["model"]["weights_sha256"]) == 64
    for layer in (0, 1):
        rows = sum(f["rows"] for f in m["files"] if f["layer"] == layer)
        assert rows == 24 * 17
    for f in m["files"]:
        assert shards.sha256_file(out / f["path"]) == f["sha256"]
    assert json.loads((out / "manifest.json").read_text()) == m
    # nothing temporary left next to the output
    assert [p.name for p in tmp_path.iterdir()] == ["acts"]


def test_vectors_equal_hidden_states(tiny_world, tiny_vit, tmp_path):
    out = tmp_path / "acts"
    run(tiny_world, tiny_vit, out, dtype="float32")
    bb = load_backbone(str(tiny_vit), device="cpu")
    images = shards.read_images(out)
    first = images.iloc[:3]
    pixels = bb.processor(
        images=[Image.open(p).convert("RGB") for p in first["path"]], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        hs = bb.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    got = {}
    for ids, toks, x in loaders.iter_ordered(out, 1):
        for i, t, v in zip(ids, toks, x, strict=True):
            got[(int(i), int(t))] = v
    for row, image_id in enumerate(first["image_id"]):
        want = hs[2][row].numpy()  # block 1's output = hidden_states[2]
        have = np.stack([got[(int(image_id), t)] for t in range(17)])
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_patch_labels_follow_masks(tiny_world, tiny_vit, tmp_path):
    out = tmp_path / "acts"
    run(tiny_world, tiny_vit, out, splits=("val",))
    labels = shards.read_patch_labels(out)
    images = shards.read_images(out)
    assert set(images["split"]) == {"val"} and len(images) == 6
    objects = pd.read_csv(tiny_world / "objects.csv")
    image_id = int(images["image_id"].iloc[0])
    mask = np.asarray(Image.open(tiny_world / f"masks/val/{image_id:05d}.png"))
    values = patch_majority(mask, (4, 4), (32, 32))
    mine = labels[labels["image_id"] == image_id]
    for patch, v in enumerate(values):
        got = set(mine.loc[mine["token"] == patch + 1, "label"])
        if v == 0:
            assert got == set()
        else:
            obj = objects[(objects["image_id"] == image_id) & (objects["object"] == v)].iloc[0]
            assert got == {obj["shape"], obj["colour"]}
    assert labels["token"].min() >= 1  # never the CLS token


def test_patch_majority_by_hand():
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 1  # top-left patch fully object 1
    mask[2:, 2:] = 2
    mask[2, 0] = 3  # one pixel of 4: background wins
    np.testing.assert_array_equal(patch_majority(mask, (2, 2), (4, 4)), [1, 0, 0, 2])


def test_token_policy_and_corrupt_image(tiny_world, tiny_vit, tmp_path):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    bad = world / "images/train/00001.png"
    bad.write_bytes(b"not a png")
    m = run(world, tiny_vit, tmp_path / "acts", tokens="patches", splits=("train",))
    assert [s["path"] for s in m["skipped"]] == [str(bad)]
    assert m["n_images"] == 11 and m["tokens"]["written"] == list(range(1, 17))
    ids = np.concatenate([i for i, _, _ in loaders.iter_ordered(tmp_path / "acts", 0)])
    assert 1 not in set(ids.tolist()) and len(ids) == 11 * 16


def test_bad_layer_and_missing_data(tiny_world, tiny_vit, tmp_path):
    with pytest.raises(ValueError, match="layer 5"):
        run(tiny_world, tiny_vit, tmp_path / "a", layers=(5,))
    with pytest.raises(FileNotFoundError):
        extract(
            ExtractConfig(
                model=str(tiny_vit), data=str(tmp_path / "nope"), out_dir=str(tmp_path / "b")
            ),
            progress=False,
        )
    assert not (tmp_path / "a").exists()


def file_order(out, layer=0) -> dict[str, list[int]]:
    """Image ids in the order each file of `layer` holds them, by file."""
    m = shards.read_manifest(out)
    order = {}
    for f in m.files(layer):
        ids = pq.read_table(out / f["path"], columns=["image_id"]).column(0).to_numpy()
        order[f["path"]] = list(dict.fromkeys(ids.tolist()))
    return order


def test_images_are_written_in_a_seeded_order(tiny_world, tiny_vit, tmp_path):
    import hashlib

    m = run(tiny_world, tiny_vit, tmp_path / "a", layers=(0,))
    plain = run(tiny_world, tiny_vit, tmp_path / "plain", layers=(0,), shuffle_seed=None)
    other = run(tiny_world, tiny_vit, tmp_path / "b", layers=(0,), shuffle_seed=7)
    assert (m["shuffle_seed"], plain["shuffle_seed"], other["shuffle_seed"]) == (0, None, 7)
    images = shards.read_images(tmp_path / "a")
    # ids stay the source's: the image table is the same whatever the order
    pd.testing.assert_frame_equal(images, shards.read_images(tmp_path / "plain"))
    key_of = dict(zip(images.image_id, images.key, strict=True))

    def rank(seed, image_id):  # the documented rule: a hash of the seed and the key
        return hashlib.blake2b(f"{seed}\0{key_of[image_id]}".encode(), digest_size=8).digest()

    for seed, out in ((0, "a"), (7, "b")):
        for split in ("train", "val", "test"):
            got = sum((v for k, v in sorted(file_order(tmp_path / out).items()) if split in k), [])
            ids = images.image_id[images.split == split].tolist()
            assert got == sorted(ids, key=lambda i: rank(seed, i)), (seed, split)
    train = sum((v for k, v in sorted(file_order(tmp_path / "a").items()) if "train" in k), [])
    assert train != sorted(train)  # 12 images: not in source order
    plain_train = sum((v for k, v in file_order(tmp_path / "plain").items() if "train" in k), [])
    assert plain_train == sorted(plain_train)

    # the same vectors per image and token, in another place
    def by_key(out):
        return {
            (int(i), int(t)): v.tobytes()
            for ids, toks, x in loaders.iter_ordered(out, 0, dtype=None)
            for i, t, v in zip(ids, toks, x, strict=True)
        }

    assert by_key(tmp_path / "a") == by_key(tmp_path / "plain")


def test_the_order_is_part_of_the_sets_identity(tiny_world, tiny_vit, tmp_path):
    from saev_core.extract import ShardSetMismatch

    out = tmp_path / "acts"
    run(tiny_world, tiny_vit, out, layers=(0,))
    with pytest.raises(ShardSetMismatch, match="shuffle_seed: has 0, this run 3"):
        run(tiny_world, tiny_vit, out, layers=(0,), shuffle_seed=3)
    # a set from before shuffled extraction (no shuffle_seed in its manifest)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shuffle_seed"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardSetMismatch, match="predates shuffled extraction"):
        run(tiny_world, tiny_vit, out, layers=(0,))
    assert run(tiny_world, tiny_vit, out, layers=(0,), shuffle_seed=None) == manifest  # up to date
    with pytest.raises(ValueError, match="shuffle_seed must be an integer or null"):
        ExtractConfig(shuffle_seed="yes")
