"""Real shuffling (issue 13.3): a class-sorted folder gives batches of many classes, the loader
draws pieces from across the whole set, vectors mapped from the files equal pyarrow's reading,
and the trainer's normalisation comes from a sample of the whole set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from saev_core import loaders, shards
from saev_core.extract import ExtractConfig, extract
from saev_core.loaders import common as loaders_common
from saev_core.loaders import pages as loaders_pages
from saev_core.loaders import shuffled as loaders_shuffled
from saev_core.sae import SAE
from saev_core.training.stage import TrainStage, train_stage

torch.set_num_threads(min(2, torch.get_num_threads()))

N_CLASSES, PER_CLASS = 200, 6  # an ImageNet-style folder: c000/ ... c199/, class-sorted
PER_GROUP = 32  # images per row group (class-sorted: 5-6 classes per row group)
# Rows per batch: 128 images' worth of the tiny ViT's 17 tokens, half a window of 8 row groups,
# so that no rows carry over from one window to the next (carried rows add other classes).
BATCH = 4 * PER_GROUP * 17


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sorted") / "imagenet"
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        (root / f"c{c:03d}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # every vector distinct
            Image.fromarray(pixels).save(root / f"c{c:03d}" / f"{i}.png")
    return root


def extract_folder(folder, tiny_vit, out, **kw) -> Path:
    cfg = ExtractConfig(
        model=str(tiny_vit),
        data=str(folder),
        out_dir=str(out),
        layers=(0,),
        splits=("train",),
        val_fraction=0,
        batch_size=100,
        images_per_row_group=PER_GROUP,
        device="cpu",
        n_workers=2,
        **kw,
    )
    extract(cfg, progress=False)
    return out


def classes_per_batch(shard_dir: Path) -> list[int]:
    """Distinct classes (the image's folder, from images.parquet) in each full shuffled batch."""
    images = shards.read_images(shard_dir)
    class_of = {
        int(i): Path(p).parent.name for i, p in zip(images.image_id, images.path, strict=True)
    }
    image_of = {}
    for ids, _, acts in loaders.iter_ordered(shard_dir, 0, dtype=None):
        image_of.update((row.tobytes(), int(i)) for i, row in zip(ids, acts, strict=True))
    assert len(image_of) == N_CLASSES * PER_CLASS * 17  # every vector tells its image
    batches = list(loaders.iter_shuffled(shard_dir, 0, BATCH, seed=0, dtype=None))
    return [len({class_of[image_of[r.tobytes()]] for r in b}) for b in batches[:-1]]


def test_class_sorted_folder_gives_batches_of_many_classes(class_folder, tiny_vit, tmp_path):
    out = extract_folder(class_folder, tiny_vit, tmp_path / "shuffled")
    m = shards.read_manifest(out)
    assert m.data["shuffle_seed"] == 0
    counts = classes_per_batch(out)
    assert len(counts) >= 8
    # 2,176 rows from a window of 8 row groups x 32 images: ~140 of the 200 classes
    assert min(counts) >= 100, counts
    # the same folder written in its own (class-sorted) order: a window holds ~45 classes (the
    # last windows' batches more: rows carried over from earlier windows)
    sorted_out = extract_folder(class_folder, tiny_vit, tmp_path / "sorted", shuffle_seed=None)
    assert shards.read_manifest(sorted_out).data["shuffle_seed"] is None
    assert np.median(classes_per_batch(sorted_out)) < 60


# ---------------------------------------------------------------------------------------------
# the loader: pieces from across the set, mapped straight from the files


def write_groups(root, acts, per_group, **rewrite):
    """`acts` [images, tokens, d] float16 as one train file, one row group per `per_group`
    images, with a manifest; with `rewrite`, pyarrow rewrites the file with those options."""
    n, t, d = acts.shape
    w = shards.ShardWriter(root, 0, "train", d, np.float16, t, per_group, 10**6)
    w.add(np.arange(n), np.arange(t, dtype=np.int32), acts)
    files = w.close()
    if rewrite:
        path = root / files[0]["path"]
        pq.write_table(pq.read_table(path), path, row_group_size=per_group * t, **rewrite)
        files[0]["sha256"] = shards.sha256_file(path)
    manifest = {
        "schema": shards.SCHEMA_VERSION,
        "model": {"name": "tiny", "weights_sha256": "x"},
        "layers": [0],
        "tokens": {
            "policy": "all",
            "n_prefix_tokens": 1,
            "n_patches": t - 1,
            "written": list(range(t)),
            "n_tokens_written": t,
        },
        "dtype": "float16",
        "d_model": d,
        "n_images": n,
        "files": files,
    }
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    return root


def rows_sorted(a):
    return a[np.lexsort(a.T[::-1])]


def test_a_batch_draws_on_many_more_row_groups_than_the_window_holds(tmp_path):
    # 60 row groups of 8 images, each group one "class" (a class-sorted set, unshuffled)
    acts = np.random.default_rng(0).normal(size=(480, 4, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, per_group=8)
    group_of = {acts[i, t].tobytes(): i // 8 for i in range(480) for t in range(4)}
    batches = list(
        loaders.iter_shuffled(root, 0, 64, seed=0, buffer_groups=2, piece_rows=4, dtype=None)
    )
    # a window: 2 row groups' worth of rows, in pieces of one image from 16 places
    groups = [len({group_of[r.tobytes()] for r in b}) for b in batches[:-1]]
    assert min(groups) >= 10, groups  # reading whole row groups, a batch sees at most 3
    got = np.concatenate(batches)
    np.testing.assert_array_equal(rows_sorted(got), rows_sorted(acts.reshape(-1, 8)))


# small pages (20 vectors of 48 bytes), in both data page versions, and a compressed file
MANY = {
    "compression": "none",
    "data_page_size": 1000,
    "write_batch_size": 10,
    "use_dictionary": ["image_id", "token"],
}
LAYOUTS = {
    "ShardWriter": {},
    "many pages": MANY,
    "many v2 pages": {**MANY, "data_page_version": "2.0"},
    "compressed": {"compression": "zstd"},
}


@pytest.mark.parametrize("how", list(LAYOUTS))
@pytest.mark.parametrize("tokens", ["all", "patches", "prefix"])
def test_mapped_vectors_equal_pyarrows_reading(tmp_path, how, tokens):
    acts = np.random.default_rng(1).normal(size=(90, 5, 24)).astype(np.float16)
    root = write_groups(tmp_path, acts, 16, **LAYOUTS[how])
    m = shards.read_manifest(root)
    groups = loaders_common._row_groups(m, 0, None)
    assert len(groups) == 6
    if how == "compressed":
        assert not any(g.direct for g in groups)  # read through pyarrow
    else:
        runs = [loaders_pages._act_runs(g, m) for g in groups]
        assert all(g.direct for g in groups) and all(r is not None for r in runs)
        n_pages = [len(r) for r in runs]
        assert set(n_pages) == {1} if how == "ShardWriter" else min(n_pages) > 1
    # what pyarrow reads, independently of the loaders
    table = pq.read_table(root / m.data["files"][0]["path"])
    want = np.frombuffer(b"".join(table.column("act").to_pylist()), np.float16).reshape(-1, 24)
    token = table.column("token").to_numpy()
    keep = {"all": token >= 0, "patches": token >= 1, "prefix": token < 1}[tokens]
    got = np.concatenate(
        list(loaders.iter_shuffled(root, 0, 50, seed=2, tokens=tokens, piece_rows=7, dtype=None))
    )
    np.testing.assert_array_equal(rows_sorted(got), rows_sorted(want[keep]))


def test_a_file_replaced_while_mapped_is_refused(tmp_path):
    acts = np.random.default_rng(2).normal(size=(40, 5, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, 4)
    it = loaders.iter_shuffled(
        root, 0, 5, seed=0, buffer_groups=1, prefetch_groups=1, prefetch_batches=1
    )
    next(it)
    path = next((tmp_path / "layer=0").glob("*.parquet"))
    data, st = path.read_bytes(), path.stat()
    # another file with the same layout and size, swapped in atomically as extract and DVC do
    # (an unlink then a write lets the reader thread find no file in between: another error)
    new = path.with_name(path.name + ".new")
    new.write_bytes(data[:-1] + b"\0")
    # written later (not within the same clock tick as the first, as it can be in a test)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.replace(new, path)
    with pytest.raises(OSError, match="changed while it was being read"):
        for _ in it:
            pass


# ---------------------------------------------------------------------------------------------
# normalisation and b_dec from a sample of the whole set


def halves(tmp_path, shift=4.0):
    """40 row groups of 40 images x 5 tokens: the first half centred at 0, the second at
    `shift` (a set extended with other images, or sorted by class)."""
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(1600, 5, 6)).astype(np.float32)
    acts[800:] += shift
    root = write_groups(tmp_path / "shards", acts.astype(np.float16), per_group=40)
    return root, acts.astype(np.float16).astype(np.float64).reshape(-1, 6)


def test_sample_rows_is_uniform_over_the_whole_set(tmp_path):
    root, x = halves(tmp_path)
    sample = loaders.sample_rows(root, 0, 1600, seed=0, dtype=None)
    assert sample.shape == (1600, 6) and sample.dtype == np.float16
    # rows of the set, none twice
    rows = {r.tobytes() for r in x.astype(np.float16)}
    assert len({r.tobytes() for r in sample}) == 1600
    assert all(r.tobytes() in rows for r in sample)
    # uniform: the mean of the sample is the whole set's (std of the error ~0.05 here)
    np.testing.assert_allclose(sample.astype(np.float64).mean(0), x.mean(0), atol=0.25)
    # in a random order: its first rows are a uniform sample too, not one row group's
    assert 0.3 < (sample[:100, 0] > 2).mean() < 0.7
    # token policies and a sample larger than the set
    assert len(loaders.sample_rows(root, 0, 10**6, seed=0)) == 8000
    prefix = loaders.sample_rows(root, 0, 10**6, seed=0, tokens="prefix")
    np.testing.assert_array_equal(
        rows_sorted(prefix),
        rows_sorted(x.reshape(1600, 5, 6)[:, 0].astype(np.float16).astype(np.float32)),
    )


@pytest.mark.parametrize("seed", range(4))
def test_training_normalises_with_the_whole_sets_statistics(tmp_path, seed):
    root, x = halves(tmp_path)
    sae = {
        "arch": "topk",
        "d_sae": 12,
        "k": 2,
        "batch_size": 1600,
        "n_epochs": 1,
        "warmup_steps": 1,
        "aux_k": 4,
        "dead_after_tokens": 64,
        "device": "cpu",
        "norm_max_tokens": 1600,
        "seed": seed,
    }
    io = TrainStage(
        shard_dir=str(root),
        layer=0,
        out_dir=str(tmp_path / "sae"),
        sae=sae,
        train_split="train",
        eval_split="train",
    )
    train_stage(io, progress=False)
    got = SAE.load(tmp_path / "sae")
    # numpy over the whole set: the two halves' means are 0 and 4, the set's 2
    np.testing.assert_allclose(got.norm_mean.numpy(), x.mean(0), atol=0.25)
    # the first window (8 of 40 row groups) would have a mean anywhere in 2 +- 0.6
    scale = np.sqrt(6) / np.linalg.norm(x - x.mean(0), axis=1).mean()
    assert float(got.norm_scale) == pytest.approx(scale, rel=0.05)


def test_token_policies_refuse_a_file_not_tiled_by_image(tmp_path):
    acts = np.random.default_rng(4).normal(size=(8, 5, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, 4)
    path = root / shards.read_manifest(root).data["files"][0]["path"]
    table = pq.read_table(path)
    token = table.column("token").to_numpy().copy()
    token[:5] = token[:5][::-1]  # the first image's tokens in another order
    table = table.set_column(1, "token", pa.array(token, pa.int32()))
    pq.write_table(table, path, row_group_size=20, compression="none", use_dictionary=False)
    assert len(list(loaders.iter_shuffled(root, 0, 8, seed=0))) == 5  # "all" needs no layout
    with pytest.raises(ValueError, match="does not hold whole images"):
        list(loaders.iter_shuffled(root, 0, 8, seed=0, tokens="patches"))


# ---------------------------------------------------------------------------------------------
# files the mapped reading must not misread, and the open-file limit (review of issue 13.3)


def test_many_mapped_pieces_fit_the_open_file_limit(tmp_path):
    # every mapped piece is an open file (Python's mmap keeps a duplicate descriptor): a
    # window of 400 one-row pieces, plus the reader's queue, passes a soft limit set just
    # above what the process holds now; the reader raises the soft limit (up to the hard one)
    resource = pytest.importorskip("resource")
    acts = np.random.default_rng(5).normal(size=(200, 4, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, per_group=100)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 200
    if hard != resource.RLIM_INFINITY and hard < low + 1200:
        pytest.skip(f"hard limit on open files {hard} too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        batches = list(
            loaders.iter_shuffled(
                root, 0, 64, seed=0, buffer_groups=1, prefetch_groups=1, piece_rows=1, dtype=None
            )
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, low), hard))
    got = np.concatenate(batches)
    np.testing.assert_array_equal(rows_sorted(got), rows_sorted(acts.reshape(-1, 8)))


def test_a_hard_limit_too_low_for_the_window_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    acts = np.random.default_rng(5).normal(size=(200, 4, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, per_group=100)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))\n"
        "from saev_core import loaders\n"
        "try:\n"
        "    list(loaders.iter_shuffled(sys.argv[1], 0, 64, seed=0, buffer_groups=1,\n"
        "                               prefetch_groups=1, piece_rows=1, dtype=None))\n"
        "except OSError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 3, run.stdout + run.stderr
    assert "803 pieces" in run.stdout and "ulimit -n" in run.stdout, run.stdout
    assert "Too many open files" not in run.stdout


def test_null_vectors_are_refused_naming_the_file(tmp_path):
    acts = np.random.default_rng(6).normal(size=(8, 4, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, per_group=4)
    path = root / shards.read_manifest(root).data["files"][0]["path"]
    table = pq.read_table(path)
    col = table.column("act").combine_chunks()
    valid = np.ones(len(col), bool)
    valid[3] = False
    with_null = pa.FixedSizeBinaryArray.from_buffers(
        col.type, len(col), [pa.array(valid).buffers()[1], col.buffers()[1]]
    )
    table = table.set_column(2, "act", with_null)
    pq.write_table(table, path, row_group_size=16, compression="none", use_dictionary=False)
    readers = {
        "shuffled": lambda: list(loaders.iter_shuffled(root, 0, 8, seed=0, dtype=None)),
        "ordered": lambda: list(loaders.iter_ordered(root, 0, dtype=None)),
        "sample": lambda: loaders.sample_rows(root, 0, 100, seed=0, dtype=None),
    }
    for name, read in readers.items():
        with pytest.raises(ValueError, match="1 null vectors") as err:
            read()
        assert str(path) in str(err.value), name


@pytest.mark.parametrize("layout", ["list", "width"])
def test_vectors_of_another_layout_are_refused_naming_the_file(tmp_path, layout):
    acts = np.random.default_rng(7).normal(size=(8, 4, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, per_group=4)
    path = root / shards.read_manifest(root).data["files"][0]["path"]
    table = pq.read_table(path)
    flat = np.frombuffer(b"".join(table.column("act").to_pylist()), np.float16)
    if layout == "list":  # a fixed-size list of float16, as an older layout might have been
        act = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), 8)
        table = table.set_column(2, "act", act)
        want = "found column act.list.element"
    else:  # 4-byte vectors, as many rows, under a manifest of 16-byte ones
        act = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(4), len(table), [None, pa.py_buffer(flat[: 2 * len(table)].tobytes())]
        )
        table = table.set_column(2, "act", act)
        want = "vectors of 4 bytes"
    pq.write_table(table, path, compression="none", use_dictionary=False)
    for read in (
        lambda: list(loaders.iter_shuffled(root, 0, 8, seed=0)),
        lambda: list(loaders.iter_ordered(root, 0)),
    ):
        with pytest.raises(ValueError, match=want) as err:
            read()
        assert str(path) in str(err.value)


def test_a_piece_read_through_pyarrow_holds_only_its_rows(tmp_path, monkeypatch):
    # a group that looked mappable but whose pages are not plain vectors is read whole by
    # pyarrow for each of its pieces: each piece must keep only its own rows, not the group
    acts = np.random.default_rng(8).normal(size=(16, 4, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, per_group=8)
    monkeypatch.setattr(loaders_pages, "_parse_runs", lambda group, m: None)
    m = shards.read_manifest(root)
    groups = loaders_common._row_groups(m, 0, None)
    reader = loaders_shuffled._PieceReader(m, groups, "all")
    ((array, rows),) = reader.read(loaders_shuffled._Piece(0, 4, 12))
    assert rows is None and len(array) == 8
    assert array.base is None or array.base.nbytes == array.nbytes  # not a view of 32 rows
    got = np.concatenate(list(loaders.iter_shuffled(root, 0, 5, seed=1, piece_rows=3)))
    np.testing.assert_array_equal(
        rows_sorted(got), rows_sorted(acts.reshape(-1, 8).astype(np.float32))
    )


def test_groups_read_whole_by_pyarrow_keep_the_window_bounded(tmp_path, monkeypatch):
    # a compressed file cannot be mapped: each row group is one piece read whole, and must take
    # as much of the window as its rows, not one piece's place (a window of `buffer_groups` x
    # 8 pieces of 4 rows would otherwise pool 8 x `buffer_groups` whole row groups)
    acts = np.random.default_rng(9).normal(size=(64, 4, 8)).astype(np.float16)
    root = write_groups(tmp_path, acts, 8, compression="zstd")  # 8 groups of 32 rows
    assert not any(
        g.direct for g in loaders_common._row_groups(shards.read_manifest(root), 0, None)
    )
    pools = []
    gather = loaders_shuffled._gather

    def spy(parts, offsets, idx, out):
        pools.append(int(offsets[-1]))
        return gather(parts, offsets, idx, out)

    monkeypatch.setattr(loaders_shuffled, "_gather", spy)
    got = np.concatenate(
        list(loaders.iter_shuffled(root, 0, 16, seed=0, buffer_groups=2, piece_rows=4, dtype=None))
    )
    np.testing.assert_array_equal(rows_sorted(got), rows_sorted(acts.reshape(-1, 8)))
    assert max(pools) <= 2 * 32 + 16, pools  # 2 row groups' worth, plus rows carried over


def test_sample_rows_draws_from_the_splits_asked_for_only(tmp_path):
    rng = np.random.default_rng(10)
    acts = {"train": rng.normal(size=(30, 4, 8)), "val": rng.normal(size=(10, 4, 8)) + 10}
    files = []
    for split, a in acts.items():
        w = shards.ShardWriter(tmp_path, 0, split, 8, np.float16, 4, 5, 10**6)
        w.add(np.arange(len(a)) + (100 if split == "val" else 0), np.arange(4, dtype=np.int32), a)
        files += w.close()
    write_groups(tmp_path / "unused", acts["train"].astype(np.float16), 5)
    manifest = json.loads((tmp_path / "unused" / shards.MANIFEST).read_text())
    (tmp_path / shards.MANIFEST).write_text(json.dumps({**manifest, "files": files}))
    for split, a in acts.items():
        rows = {r.tobytes() for r in a.astype(np.float16).reshape(-1, 8)}
        got = loaders.sample_rows(tmp_path, 0, 10**6, seed=1, splits=[split], dtype=None)
        assert len(got) == len(rows) and {r.tobytes() for r in got} == rows
