"""The Great Expectations suite passes a good shard set and names the check and file that fail."""

import json

import numpy as np
import pytest
from test_shards import write_set

from saev_core import shards
from saev_core.validate import ShardValidationError, validate_shards


def test_good_set_passes_and_writes_report(tmp_path):
    write_set(tmp_path / "s")
    report = validate_shards(tmp_path / "s", tmp_path / "report.json")
    assert report["success"] and report["n_failed"] == 0
    saved = json.loads((tmp_path / "report.json").read_text())
    checks = {c["check"] for c in saved["checks"]}
    assert {
        "expect_compound_columns_to_be_unique",
        "expect_table_row_count_to_equal",
        "expect_column_values_to_be_between",
    } <= checks


def _rewrite(root, path, acts_fn=None, ids_fn=None):
    """Rewrite one shard file with changed vectors or ids (keeping the manifest as it was)."""
    m = shards.read_manifest(root)
    f = root / path
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(f)
    acts = shards.arrow_to_acts(t.column("act"), m.dtype, m.d_model).copy()
    ids = t.column("image_id").to_numpy().copy()
    if acts_fn:
        acts_fn(acts)
    if ids_fn:
        ids_fn(ids)
    new = pa.table({"image_id": ids, "token": t.column("token"), "act": shards.acts_to_arrow(acts)})
    pq.write_table(new, f)


def test_nan_is_named_with_file(tmp_path):
    write_set(tmp_path)
    _rewrite(tmp_path, "layer=0/val-00000.parquet", acts_fn=lambda a: a.__setitem__((2, 1), np.nan))
    with pytest.raises(ShardValidationError) as err:
        validate_shards(tmp_path)
    msg = str(err.value)
    assert "n_nonfinite" in msg and "layer=0/val-00000.parquet" in msg
    assert "expect_column_values_to_be_between" in msg


def test_duplicate_keys_fail(tmp_path):
    write_set(tmp_path)
    # image 7 -> 0: (image_id, token) pairs now repeat across files
    _rewrite(tmp_path, "layer=0/val-00000.parquet", ids_fn=lambda i: i.__setitem__(i == 7, 0))
    with pytest.raises(ShardValidationError, match="expect_compound_columns_to_be_unique"):
        validate_shards(tmp_path, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False


def test_wrong_width_and_missing_rows(tmp_path):
    write_set(tmp_path, dtype="float16")
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["d_model"] = 5  # the files hold 6-wide vectors
    m["files"][0]["rows"] += 5
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardValidationError) as err:
        validate_shards(tmp_path)
    failed = {(f["check"], f["column"]) for f in err.value.failures}
    assert ("expect_column_values_to_be_between", "act_bytes") in failed
    assert ("expect_table_row_count_to_equal", "") in failed
