"""Publishing a finished staging directory: the manifest assembled from the chunk records, and
the renames that replace `out_dir` atomically (or finish a publication a crash interrupted).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from saev_core import shards
from saev_core.extract.config import CHUNKS, CONVERTED, PLAN, SKIPPED
from saev_core.extract.plan import _chunk_record

# ---------------------------------------------------------------------------------------------
# Finishing: one manifest over base + new chunks, then an atomic swap


def _assemble(partial, plan, base, cfg, out_dir, written, identity) -> dict[str, Any]:
    """Write images, labels, skipped report and manifest for the finished staging directory."""
    images = [pq.read_table(out_dir / shards.IMAGES)] if base else []
    labels = [pq.read_table(out_dir / shards.PATCH_LABELS)] if base else []
    files = list(base["manifest"]["files"]) if base else []
    retried = {k for c in plan["chunks"] for k in c["keys"]}
    skipped = [s for s in (base["manifest"]["skipped"] if base else []) if s["key"] not in retried]
    converted = [c for c in (_read_converted(out_dir) if base else []) if c["key"] not in retried]
    chunk_names = list(base["manifest"]["chunks"]) if base else []
    for chunk in plan["chunks"]:
        stem = partial / CHUNKS / chunk["name"]
        images.append(pq.read_table(f"{stem}.images.parquet"))
        labels.append(pq.read_table(f"{stem}.labels.parquet"))
        record = _chunk_record(partial, chunk["name"])
        files += record["files"]
        skipped += record["skipped"]
        converted += record.get("converted", [])
        if record["files"]:  # a chunk of only bad images wrote nothing to remember
            chunk_names.append(chunk["name"])
    images_t = pa.concat_tables(images).sort_by("image_id")
    labels_t = pa.concat_tables(labels).sort_by([("image_id", "ascending"), ("token", "ascending")])
    if images_t.num_rows == 0:
        raise ValueError(f"no readable image in {cfg.data} ({len(skipped)} skipped)")
    shards.atomic_write_table(images_t, partial / shards.IMAGES)
    shards.atomic_write_table(labels_t, partial / shards.PATCH_LABELS)
    shards.atomic_write_json(partial / SKIPPED, skipped)
    converted.sort(key=lambda c: c["key"])
    shards.atomic_write_json(partial / CONVERTED, converted)

    files.sort(key=lambda f: (f["layer"], f["split"], f["path"]))
    splits = images_t.column("split").to_pylist()
    labels_list = images_t.column("labels").to_pylist()
    n_added = images_t.num_rows - (base["manifest"]["n_images"] if base else 0)
    manifest = {
        "schema": shards.SCHEMA_VERSION,
        **identity,
        "n_images": images_t.num_rows,
        "splits": {s: splits.count(s) for s in dict.fromkeys(splits)},
        "rows_per_layer": images_t.num_rows * len(written),
        "labels": sorted({lab for labs in labels_list for lab in labs}),
        "skipped": skipped,
        # images converted to RGB (CMYK, 16-bit grey), by conversion; listed in converted.json
        "converted": {
            how: n for how, n in sorted(Counter(c["conversion"] for c in converted).items())
        },
        "files": files,
        "chunks": chunk_names,
        "next_image_id": max(
            [max(images_t.column("image_id").to_pylist()) + 1]
            + [max(c["ids"]) + 1 for c in plan["chunks"]]
        ),
        "history": (base["manifest"]["history"] if base else [])
        + [{"chunks": [c["name"] for c in plan["chunks"]], "added_images": n_added}],
    }
    # The manifest marks the staging directory complete; the plan and chunk records go after it.
    shards.atomic_write_json(partial / shards.MANIFEST, manifest)
    (partial / PLAN).unlink()
    shutil.rmtree(partial / CHUNKS)
    return manifest


def _read_converted(out_dir: Path) -> list[dict]:
    """The converted-image list of an existing set ([] for a set from before it was kept)."""
    path = out_dir / CONVERTED
    return json.loads(path.read_text()) if path.exists() else []


def _publish(out_dir: Path, partial: Path, old: Path) -> None:
    """Swap the complete staging directory in for `out_dir` with renames only."""
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _recover_publication(out_dir: Path, partial: Path, old: Path) -> None:
    """Finish or undo a publication a crash interrupted (see `_publish`)."""
    complete = (partial / shards.MANIFEST).exists()
    if complete:  # killed after assembling: the plan/chunks cleanup and the swap may be pending
        (partial / PLAN).unlink(missing_ok=True)
        shutil.rmtree(partial / CHUNKS, ignore_errors=True)
        if out_dir.exists() and not old.exists():
            os.replace(out_dir, old)
        os.replace(partial, out_dir)
    elif old.exists() and not out_dir.exists():
        os.replace(old, out_dir)  # killed between the two renames of an unfinished swap
    shutil.rmtree(old, ignore_errors=True)
