"""Shard writer and readers: layout, exact round trip, each vector once per shuffled epoch."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from saev_core import shards


def write_set(root, n_images=10, n_tokens=5, d=6, dtype="float16", per_group=3, per_file=4):
    """A tiny shard set with a manifest, the way extract writes one."""
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(n_images, n_tokens, d)).astype(dtype)
    files = []
    for split, ids in (("train", np.arange(0, 7)), ("val", np.arange(7, n_images))):
        w = shards.ShardWriter(root, 0, split, d, np.dtype(dtype), n_tokens, per_group, per_file)
        for start in range(0, len(ids), 2):  # odd batch sizes vs groups and files
            sel = ids[start : start + 2]
            w.add(sel, np.arange(n_tokens, dtype=np.int32), acts[sel])
        files += w.close()
    manifest = {
        "schema": shards.SCHEMA_VERSION,
        "model": {"name": "tiny", "weights_sha256": "x"},
        "layers": [0],
        "tokens": {
            "policy": "all",
            "n_prefix_tokens": 1,
            "n_patches": n_tokens - 1,
            "written": list(range(n_tokens)),
            "n_tokens_written": n_tokens,
        },
        "dtype": dtype,
        "d_model": d,
        "n_images": n_images,
        "files": files,
    }
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    return acts


def test_writer_layout_and_row_groups(tmp_path):
    write_set(tmp_path)
    m = shards.read_manifest(tmp_path)
    paths = [f["path"] for f in m.data["files"]]
    assert paths == [
        "layer=0/train-00000.parquet",
        "layer=0/train-00001.parquet",
        "layer=0/val-00000.parquet",
    ]
    assert not list(tmp_path.rglob("*.tmp"))
    for f in m.data["files"]:
        pf = pq.ParquetFile(tmp_path / f["path"])
        assert pf.metadata.num_rows == f["rows"] == f["images"] * 5
        assert f["sha256"] == shards.sha256_file(tmp_path / f["path"])
        # every row group holds whole images
        for g in range(pf.num_row_groups):
            assert pf.metadata.row_group(g).num_rows % 5 == 0
        col = pf.schema_arrow.field("act").type
        assert col.byte_width == 6 * 2
        # no dictionary encoding on the vector column
        encodings = pf.metadata.row_group(0).column(2).encodings
        assert not any("DICT" in e for e in encodings)


def test_ordered_round_trip_exact(tmp_path):
    acts = write_set(tmp_path)
    got_ids, got_tok, got = [], [], []
    for ids, toks, x in shards.iter_ordered(tmp_path, 0):
        assert x.dtype == np.float32
        # whole images per batch
        assert all((ids == i).sum() == 5 for i in np.unique(ids))
        got_ids.append(ids), got_tok.append(toks), got.append(x)
    ids, toks, x = np.concatenate(got_ids), np.concatenate(got_tok), np.concatenate(got)
    np.testing.assert_array_equal(x, acts[ids, toks].astype(np.float32))
    assert len(ids) == 50


def test_token_filters(tmp_path):
    write_set(tmp_path)
    toks = np.concatenate([t for _, t, _ in shards.iter_ordered(tmp_path, 0, tokens="patches")])
    assert toks.min() == 1 and len(toks) == 40
    toks = np.concatenate([t for _, t, _ in shards.iter_ordered(tmp_path, 0, tokens="prefix")])
    assert set(toks) == {0}
    with pytest.raises(ValueError, match="tokens"):
        next(shards.iter_ordered(tmp_path, 0, tokens="cls-ish"))


@pytest.mark.parametrize("batch_size", [4, 7, 64])
def test_shuffled_each_vector_once(tmp_path, batch_size):
    acts = write_set(tmp_path)
    batches = list(shards.iter_shuffled(tmp_path, 0, batch_size, seed=1, buffer_groups=2))
    assert all(len(b) == batch_size for b in batches[:-1])
    got = np.concatenate(batches)
    want = acts.reshape(-1, 6).astype(np.float32)
    assert got.shape == want.shape
    # same multiset of rows, in a different order
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(got), key(want))
    assert not np.array_equal(got, want)
    again = np.concatenate(
        list(shards.iter_shuffled(tmp_path, 0, batch_size, seed=1, buffer_groups=2))
    )
    np.testing.assert_array_equal(got, again)


def test_split_selection_and_missing(tmp_path):
    write_set(tmp_path)
    n = sum(len(b) for b in shards.iter_shuffled(tmp_path, 0, 8, seed=0, splits=["val"]))
    assert n == 3 * 5
    with pytest.raises(ValueError, match="layer 3"):
        list(shards.iter_ordered(tmp_path, 3))
    with pytest.raises(FileNotFoundError, match="manifest"):
        shards.read_manifest(tmp_path / "nope")


def test_width_mismatch_refused(tmp_path):
    write_set(tmp_path)
    table = pq.read_table(tmp_path / "layer=0/train-00000.parquet")
    with pytest.raises(ValueError, match="width"):
        shards.arrow_to_acts(table.column("act"), np.dtype("float32"), 6)
