"""Extraction under stress: killed mid-run, grown folders, mismatched sets, bad files.

The contract (saev_core/extract/): `out_dir` is only ever absent or complete; a rerun after
`kill -9` ends with exactly the bytes an uninterrupted run writes; new images in a folder are
appended; a differently made set is never mixed into.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saev_core import loaders, shards
from saev_core.extract import ExtractConfig, ShardSetMismatch, extract
from saev_core.extract.publish import _recover_publication
from saev_core.validate import ShardValidationError, validate_shards

SMALL = dict(layers=(0, -1), batch_size=2, images_per_row_group=2, images_per_file=3, n_workers=1)


def cfg_for(model, data, out, **kw):
    return ExtractConfig(model=str(model), data=str(data), out_dir=str(out), **{**SMALL, **kw})


def digest(out: Path) -> dict[str, str]:
    """sha256 of every file in a shard set, by relative path."""
    return {
        str(p.relative_to(out)): shards.sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def clean(tiny_world, tiny_vit, tmp_path_factory):
    """An uninterrupted extraction, the reference for every other run."""
    out = tmp_path_factory.mktemp("clean") / "acts"
    extract(cfg_for(tiny_vit, tiny_world, out), progress=False)
    return out


def test_same_inputs_give_identical_files(clean, tiny_world, tiny_vit, tmp_path):
    again = tmp_path / "acts"
    extract(cfg_for(tiny_vit, tiny_world, again), progress=False)
    assert digest(again) == digest(clean)
    assert {"manifest.json", "images.parquet", "skipped.json"} <= set(digest(clean))
    assert not list(tmp_path.glob(".*"))  # no staging directory left behind


# A child process that extracts slowly (each shard write sleeps) so that it can be killed at
# chosen moments: after N finished chunks, or at a random time.
CHILD = """
import sys, time
from saev_core import shards
from saev_core.extract import ExtractConfig, extract
add = shards.ShardWriter.add
def slow_add(self, *a):
    time.sleep(0.03)
    add(self, *a)
shards.ShardWriter.add = slow_add
extract(ExtractConfig(model=sys.argv[1], data=sys.argv[2], out_dir=sys.argv[3], layers=(0, -1),
        batch_size=2, images_per_row_group=2, images_per_file=3, n_workers=1), progress=False)
"""


def _start(tiny_vit, tiny_world, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tiny_vit), str(tiny_world), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc, ready, timeout=120.0) -> bool:
    """SIGKILL `proc` as soon as `ready()`; False if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise TimeoutError("child extraction did not reach the kill point")


@pytest.mark.slow
def test_kill9_then_rerun_gives_the_clean_bytes(clean, tiny_world, tiny_vit, tmp_path):
    out = tmp_path / "acts"
    chunks = tmp_path / ".acts.partial" / "chunks"
    n_killed = 0
    # Kill after 1, 3 and 6 finished chunks (of 8), then once mid-way through a chunk.
    for n in (1, 3, 6):
        proc = _start(tiny_vit, tiny_world, out)
        n_killed += _kill_when(proc, lambda n=n: len(list(chunks.glob("*.json"))) >= n)
        # Never a partial shard set at out_dir: absent until complete.
        assert not out.exists()
    proc = _start(tiny_vit, tiny_world, out)
    start = time.time()
    n_killed += _kill_when(proc, lambda: time.time() - start > 0.5 and chunks.exists())
    assert n_killed >= 3, "the child finished before it could be killed: slow it down"
    assert not out.exists() or digest(out) == digest(clean)
    extract(cfg_for(tiny_vit, tiny_world, out), progress=False)
    assert digest(out) == digest(clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]


def test_interrupted_publication_is_finished_or_undone(clean, tmp_path):
    out, partial, old = tmp_path / "acts", tmp_path / ".acts.partial", tmp_path / ".acts.old"
    # Killed after the old set was moved aside but before the new one moved in.
    shutil.copytree(clean, partial)
    shutil.copytree(clean, old)
    (old / "marker").write_text("old")
    _recover_publication(out, partial, old)
    assert digest(out) == digest(clean) and not old.exists() and not partial.exists()
    # Killed while the (unfinished) new set was staged and the old set moved aside: undo.
    shutil.rmtree(out)
    shutil.copytree(clean, old)
    (partial / "chunks").mkdir(parents=True)
    _recover_publication(out, partial, old)
    assert digest(out) == digest(clean) and not old.exists()


def _folder(root: Path, tiny_world: Path, n: int) -> None:
    """An image folder `<class>/<file>.png` with the first `n` shapes images."""
    for path in sorted((tiny_world / "images").rglob("*.png"))[:n]:
        label = "odd" if int(path.stem) % 2 else "even"
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / label / f"img{path.stem}.png")


def test_new_images_in_a_folder_are_appended(tiny_world, tiny_vit, tmp_path):
    folder, out = tmp_path / "folder", tmp_path / "acts"
    _folder(folder, tiny_world, 7)
    first = extract(cfg_for(tiny_vit, folder, out), progress=False)
    before = digest(out)
    old_ids = shards.read_images(out).set_index("key")["image_id"].to_dict()
    assert first["n_images"] == 7 and first["history"][0]["added_images"] == 7

    again = extract(cfg_for(tiny_vit, folder, out), progress=False)  # nothing new
    assert again == first and digest(out) == before
    # the same folder spelled another way is the same source, not a different shard set
    respelled = extract(cfg_for(tiny_vit, f"{folder}/", out), progress=False)
    assert respelled == first and digest(out) == before

    _folder(folder, tiny_world, 11)
    grown = extract(cfg_for(tiny_vit, folder, out), progress=False)
    assert grown["n_images"] == 11
    assert [h["added_images"] for h in grown["history"]] == [7, 4]
    after = digest(out)
    for f in first["files"]:  # the old shard files are untouched
        assert after[f["path"]] == before[f["path"]]
    ids = shards.read_images(out).set_index("key")["image_id"].to_dict()
    assert len(set(ids.values())) == 11
    assert {k: ids[k] for k in old_ids} == old_ids  # old images keep their ids
    assert min(v for k, v in ids.items() if k not in old_ids) > max(old_ids.values())

    # Appended vectors equal those of a fresh extraction of the grown folder.
    fresh = tmp_path / "fresh"
    extract(cfg_for(tiny_vit, folder, fresh), progress=False)
    for layer in (0, 1):
        assert _by_key(out, layer).keys() == _by_key(fresh, layer).keys()
        for key, acts in _by_key(out, layer).items():
            np.testing.assert_allclose(acts, _by_key(fresh, layer)[key], atol=2e-3, rtol=2e-3)
    assert validate_shards(out)["success"]


def _by_key(out: Path, layer: int) -> dict[str, np.ndarray]:
    key_of = shards.read_images(out).set_index("image_id")["key"].to_dict()
    acts: dict[str, list] = {}
    for ids, _, x in loaders.iter_ordered(out, layer):
        for i, v in zip(ids, x, strict=True):
            acts.setdefault(key_of[int(i)], []).append(v)
    return {k: np.stack(v) for k, v in acts.items()}


def test_a_differently_made_set_is_refused_or_replaced(clean, tiny_world, tiny_vit, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(clean, out)
    with pytest.raises(ShardSetMismatch, match="layers: has \\[0, 1\\], this run \\[1\\]"):
        extract(cfg_for(tiny_vit, tiny_world, out, layers=(1,)), progress=False)
    with pytest.raises(ShardSetMismatch, match="tokens"):
        extract(cfg_for(tiny_vit, tiny_world, out, tokens="patches"), progress=False)
    assert digest(out) == digest(clean)  # refused: untouched
    m = extract(cfg_for(tiny_vit, tiny_world, out, layers=(1,), overwrite=True), progress=False)
    assert m["layers"] == [1] and not (out / "layer=0").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ShardSetMismatch, match="not a shard set"):
        extract(cfg_for(tiny_vit, tiny_world, tmp_path / "other"), progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_bad_files_are_skipped_and_listed_or_stop_strict_runs(tiny_world, tiny_vit, tmp_path):
    folder = tmp_path / "folder"
    _folder(folder, tiny_world, 4)
    (folder / "odd" / "empty.png").write_bytes(b"")
    (folder / "odd" / "text.jpg").write_text("not an image")
    good = next((folder / "even").iterdir()).read_bytes()
    (folder / "even" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (32, 32)).save(folder / "even" / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(folder / "even" / "deep.png")
    out = tmp_path / "acts"
    m = extract(cfg_for(tiny_vit, folder, out, max_pixels=10_000), progress=False)
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped == m["skipped"] and m["n_images"] == 6
    names = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert set(names) == {"empty.png", "text.jpg", "truncated.png"}
    assert len(set(names.values())) == 3  # a distinct reason for each kind
    # CMYK and 16-bit grey are converted (not skipped) and listed as such
    converted = json.loads((out / "converted.json").read_text())
    assert {Path(c["path"]).name for c in converted} == {"cmyk.jpg", "deep.png"}
    assert sum(m["converted"].values()) == 2

    # A rerun neither retries nor re-lists the bad files: the set is up to date, bytes unchanged.
    before = digest(out)
    assert extract(cfg_for(tiny_vit, folder, out, max_pixels=10_000), progress=False) == m
    assert digest(out) == before
    # A fixed file is tried again: it joins the set and leaves the report.
    shutil.copy(next((folder / "even").glob("img*.png")), folder / "odd" / "empty.png")
    fixed = extract(cfg_for(tiny_vit, folder, out, max_pixels=10_000), progress=False)
    assert fixed["n_images"] == 7 and len(fixed["skipped"]) == 2
    assert fixed["converted"] == m["converted"]  # the converted ones stay listed
    assert "empty.png" not in {Path(s["path"]).name for s in fixed["skipped"]}

    with pytest.raises(ValueError, match="empty.png|text.jpg|truncated.png|cmyk.jpg|deep.png"):
        extract(cfg_for(tiny_vit, folder, tmp_path / "strict", strict=True), progress=False)
    assert not (tmp_path / "strict").exists()


def test_validation_checks_manifest_against_files(clean, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(clean, out)
    report = validate_shards(out, tmp_path / "acts.validation.json")
    assert report["success"] and report["norm_outliers"]["count"] >= 0
    names = {(c["file"], c["check"]) for c in report["checks"]}
    assert ("manifest.json", "expect_column_pair_values_to_be_equal") in names
    # Same shard set, same report: nothing time-dependent in it.
    again = validate_shards(out, tmp_path / "again.json")
    assert again == report

    victim = next(out.glob("layer=0/*.parquet"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01  # flip one bit, most likely in a vector: sha256 changes
    victim.write_bytes(bytes(data))
    shutil.copy(victim, out / "layer=0" / "stray-00000.parquet")
    with pytest.raises(ShardValidationError) as err:
        validate_shards(out)
    failed = {(f["check"], f["column"]) for f in err.value.failures}
    assert ("expect_column_values_to_be_in_set", "sha256_matches") in failed
    assert ("expect_column_values_to_be_in_set", "listed") in failed
