"""Partitioned extraction: chunks dealt out to several workers and merged by the manifest give
exactly the bytes of a single-worker run, for a fresh set and for new images appended to one."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_extract_safety import SMALL, cfg_for, digest

from saev_core.extract import (
    extract,
    extract_partition,
    merge_partitions,
    plan_partitions,
)


def partitioned(cfg, n: int) -> dict:
    """Plan, run the partitions concurrently (as mapped tasks would), merge."""
    plan = plan_partitions(cfg, n)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda names: extract_partition(cfg, names), plan["partitions"]))
    return merge_partitions(cfg)


@pytest.fixture(scope="module")
def single(tiny_world, tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "acts"
    extract(cfg_for(tiny_vit, tiny_world, out), progress=False)
    return out


def test_partitions_equal_a_single_worker_run(single, tiny_world, tiny_vit, tmp_path):
    out = tmp_path / "acts"
    cfg = cfg_for(tiny_vit, tiny_world, out)
    plan = plan_partitions(cfg, 3)
    # 24 images in chunks of 3 -> 8 chunks (train 4, val 2, test 2), dealt round robin.
    assert plan["n_chunks"] == 8 and [len(p) for p in plan["partitions"]] == [3, 3, 2]
    assert sorted(sum(plan["partitions"], [])) == sorted(
        f"{s}-{i:05d}" for s, n in [("train", 4), ("val", 2), ("test", 2)] for i in range(n)
    )
    with pytest.raises(RuntimeError, match="not extracted yet"):
        merge_partitions(cfg)  # nothing run yet: refuses to publish a partial set
    assert not out.exists()
    with ThreadPoolExecutor(3) as pool:
        ran = list(pool.map(lambda names: extract_partition(cfg, names), plan["partitions"]))
    assert ran == plan["partitions"]
    manifest = merge_partitions(cfg)
    assert manifest["n_images"] == 24
    assert digest(out) == digest(single)  # identical bytes, manifest included
    assert not list(tmp_path.glob(".*"))  # staging directory gone
    assert plan_partitions(cfg, 3)["up_to_date"]
    assert merge_partitions(cfg) == manifest  # merging again is a no-op


def test_a_failed_partition_is_rerun_alone(single, tiny_world, tiny_vit, tmp_path):
    out = tmp_path / "acts"
    cfg = cfg_for(tiny_vit, tiny_world, out)
    plan = plan_partitions(cfg, 2)
    first, second = plan["partitions"]
    extract_partition(cfg, first)
    # The second worker died: re-planning keeps the first one's chunks and deals out the rest.
    again = plan_partitions(cfg, 2)
    assert sorted(sum(again["partitions"], [])) == sorted(second)
    assert extract_partition(cfg, first) == []  # a retried partition skips finished chunks
    for names in again["partitions"]:
        extract_partition(cfg, names)
    merge_partitions(cfg)
    assert digest(out) == digest(single)


def test_appending_in_partitions_equals_appending_in_one(tiny_world, tiny_vit, tmp_path):
    from test_extract_safety import _folder

    folder = tmp_path / "folder"
    _folder(folder, tiny_world, 7)
    one, many = tmp_path / "one", tmp_path / "many"
    extract(cfg_for(tiny_vit, folder, one), progress=False)
    partitioned(cfg_for(tiny_vit, folder, many), 2)
    assert digest(one) == digest(many)
    _folder(folder, tiny_world, 13)
    extract(cfg_for(tiny_vit, folder, one), progress=False)
    grown = partitioned(cfg_for(tiny_vit, folder, many), 2)
    assert grown["n_images"] == 13 and [h["added_images"] for h in grown["history"]] == [7, 6]
    assert digest(one) == digest(many)
    shutil.rmtree(folder)


@pytest.mark.slow
def test_extract_flow_fans_out_as_mapped_tasks(
    prefect_harness, single, tiny_world, tiny_vit, tmp_path
):
    from flows.extract import extract_flow

    params = tmp_path / "params.yaml"
    out = tmp_path / "acts"
    cfg = {"model": str(tiny_vit), "data": str(tiny_world), "out_dir": str(out), **SMALL}
    params.write_text(__import__("yaml").safe_dump({"extract": {**cfg, "layers": [0, -1]}}))
    manifest = extract_flow(params=str(params), version=False, partitions=3)
    assert manifest["n_images"] == 24
    assert digest(out) == digest(single)
