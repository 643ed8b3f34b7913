"""Planning an extraction: the shard set's identity, what an existing set already holds
(`pending`), the seeded order of the images to extract, and the staging directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from saev_core import shards
from saev_core.config import json_safe
from saev_core.data.images import ImageRecord
from saev_core.data.layout import held_out_split
from saev_core.extract.config import _CONVERTED_NOW, CHUNKS, PLAN, ExtractConfig, ShardSetMismatch
from saev_core.geometry import Geometry


def _identity(cfg: ExtractConfig, bb: Any, layers: list[int], written: np.ndarray) -> dict:
    """Everything that must agree for two runs' vectors to belong in one shard set."""
    return json_safe(
        {
            "model": {
                "name": _same_path(cfg.model),
                "class": type(bb.model).__name__,
                "weights_sha256": bb.weights_sha256,
                "precision": str(bb.dtype).removeprefix("torch."),
            },
            "preprocessing": bb.processor.to_dict(),
            # How original pixels map to the input (resize, centre crop): patch labels use it.
            "geometry": bb.geometry.to_dict() if bb.geometry is not None else None,
            "layers": layers,
            "tokens": {
                "policy": cfg.tokens,
                "n_prefix_tokens": bb.n_prefix_tokens,
                "n_registers": bb.n_registers,
                "has_cls": bb.has_cls,
                "n_patches": bb.n_patches,
                "grid": list(bb.grid),
                "written": written.tolist(),
                "n_tokens_written": len(written),
                "layout": "token 0 = CLS (if any), then registers, then patches in row-major order",
            },
            "dtype": cfg.dtype,
            "d_model": bb.d_model,
            "source": _same_path(cfg.data),
            # Which images are val: the source's own split, or a hash of the key (saev_core/data/layout.py).
            "val_split": held_out_split(cfg.data, cfg.val_fraction),
            # The order images are written in (see `_plan`); null = the source's order.
            "shuffle_seed": cfg.shuffle_seed,
        }
    )


def _same_path(name: str) -> str:
    """One spelling per local path (relative to the working directory when under it, else
    absolute; no trailing slash), so `data/x/` and `/abs/data/x` are one source; hub ids and
    other non-paths are left as they are."""
    path = Path(name)
    if not path.exists():
        return str(name)
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _existing(out_dir: Path, identity: dict, overwrite: bool) -> dict | None:
    """The existing complete shard set at `out_dir` if this run may extend it, else None."""
    if not out_dir.exists():
        return None
    if not (out_dir / shards.MANIFEST).exists():
        if overwrite or not any(out_dir.iterdir()):
            return None
        raise ShardSetMismatch(
            f"{out_dir} exists but holds no {shards.MANIFEST}: not a shard set. Choose another "
            "out_dir, delete it, or set overwrite to replace it."
        )
    manifest = json.loads((out_dir / shards.MANIFEST).read_text())
    if manifest.get("schema") != shards.SCHEMA_VERSION and not overwrite:
        raise ShardSetMismatch(
            f"{out_dir} was written by another version of saev-flow (manifest schema "
            f"{manifest.get('schema')!r}, this one writes {shards.SCHEMA_VERSION}): set overwrite "
            "to re-extract it, or choose another out_dir"
        )
    theirs = {k: manifest.get(k) for k in identity}
    if (
        "geometry" not in manifest
        and identity["geometry"] is not None
        and Geometry.from_dict(identity["geometry"]).squashes
    ):
        # A set from before geometry was recorded squashed masks to the input size: the same
        # patch labels as now when the processor does not crop. A cropping one must re-extract.
        theirs["geometry"] = identity["geometry"]
    if "val_split" not in manifest and identity["val_split"] == {"from": "source"}:
        # A set from before the held-out split was recorded used the source's splits as is.
        theirs["val_split"] = identity["val_split"]
    if "shuffle_seed" not in manifest and identity["shuffle_seed"] is None:
        # A set from before shuffled extraction was written in the source's order.
        theirs["shuffle_seed"] = None
    if theirs != identity:
        if overwrite:
            print(f"{out_dir}: made differently, replacing it (overwrite=True)")
            return None
        diffs = [k for k in identity if theirs.get(k) != identity[k]]
        detail = "; ".join(
            f"{k}: has {_short(theirs.get(k))}, this run {_short(identity[k])}" for k in diffs
        )
        hint = ""
        if "val_split" in diffs and "val_split" not in manifest:
            hint = (
                " This set predates held-out splits of sources without a val folder: "
                "val_fraction 0 keeps extending it as it was made."
            )
        if "shuffle_seed" in diffs and "shuffle_seed" not in manifest:
            hint += (
                " This set predates shuffled extraction: shuffle_seed null keeps extending it "
                "in the source's order; overwrite re-extracts it shuffled."
            )
        raise ShardSetMismatch(
            f"{out_dir} holds shards made differently ({detail}). Refusing to mix them: choose "
            f"another out_dir, or set overwrite to replace the set.{hint}"
        )
    images = pq.read_table(out_dir / shards.IMAGES, columns=["key"]).column("key").to_pylist()
    return {"manifest": manifest, "keys": images}


def pending(records: list[ImageRecord], manifest: dict | None, keys) -> list[ImageRecord]:
    """The records a shard set still lacks: neither extracted nor skipped as they are now.

    A skipped image is tried again only when its bytes changed (a fixed file), or when it was
    skipped for a reason this version converts instead (CMYK, 16-bit grey: the reasons older
    versions wrote); otherwise every rerun (a scheduled refresh) would retry and re-list the
    same bad file.
    """
    known = set(keys)
    for entry in (manifest or {}).get("skipped", []):
        if str(entry.get("reason", "")).startswith(_CONVERTED_NOW):
            continue
        record_sha = entry.get("sha256")
        if record_sha is None or record_sha == _file_digest(entry.get("path")):
            known.add(entry["key"])
    return [r for r in records if r.key not in known]


def _file_digest(path: Any) -> str | None:
    """sha256 of a file's bytes, or None for what is not a readable file (dataset rows)."""
    try:
        return shards.sha256_file(path) if path and Path(path).is_file() else None
    except OSError:
        return None


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def _shuffled(recs: list[ImageRecord], ids: list[int], seed: int | None):
    """`recs` and their `ids` in the order the seed gives (unchanged for None).

    The order sorts images by a hash of the seed and the key, so it depends on nothing but the
    two: the same for every partition count and machine, and images appended later are spread
    the same way. A class-folder source lists a class's images together; written as listed, a
    row group would hold one class and a shuffled batch only the few row groups in its window.
    """
    if seed is None:
        return recs, ids
    rank = [hashlib.blake2b(f"{seed}\0{r.key}".encode(), digest_size=8).digest() for r in recs]
    order = sorted(range(len(recs)), key=rank.__getitem__)
    return [recs[i] for i in order], [ids[i] for i in order]


def _plan(identity: dict, todo: list[ImageRecord], base: dict | None, per_file: int) -> dict:
    """Image ids and chunks for the images to extract; identical for identical inputs.

    Ids follow the source's order (fresh sets keep the source's ids; appended images continue
    after the last); the images are then written in the order `identity["shuffle_seed"]` gives.
    """
    next_id = 0
    next_index: dict[str, int] = {}
    if base:
        next_id = int(base["manifest"]["next_image_id"])
        for f in base["manifest"]["files"]:
            index = int(Path(f["path"]).stem.rsplit("-", 1)[1])
            next_index[f["split"]] = max(next_index.get(f["split"], 0), index + 1)
        for entry in base["manifest"]["chunks"]:
            index = int(entry.rsplit("-", 1)[1])
            split = entry.rsplit("-", 1)[0]
            next_index[split] = max(next_index.get(split, 0), index + 1)
    chunks = []
    for split in dict.fromkeys(r.split for r in todo):
        recs = [r for r in todo if r.split == split]
        # Fresh sets keep the source's ids; appended images continue after the last.
        ids = [r.image_id if not base else next_id + i for i, r in enumerate(recs)]
        recs, ids = _shuffled(recs, ids, identity.get("shuffle_seed"))
        for start in range(0, len(recs), per_file):
            part = recs[start : start + per_file]
            index = next_index.get(split, 0)
            next_index[split] = index + 1
            chunks.append(
                {
                    "name": f"{split}-{index:05d}",
                    "split": split,
                    "index": index,
                    "keys": [r.key for r in part],
                    "ids": ids[start : start + per_file],
                }
            )
        if base:
            next_id += len(recs)
    return {"identity": identity, "chunks": chunks}


def _open_staging(partial: Path, plan: dict, base: dict | None, out_dir: Path) -> set[str]:
    """Prepare `partial` for `plan`; returns the names of chunks a previous run finished."""
    done: set[str] = set()
    if (partial / PLAN).exists() and json.loads((partial / PLAN).read_text()) == plan:
        for record in sorted((partial / CHUNKS).glob("*.json")):
            done.add(record.stem)
    elif partial.exists():
        print(f"discarding {partial}: left by an interrupted run with different inputs")
        shutil.rmtree(partial)
    if not done:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / CHUNKS).mkdir(parents=True)
        if base:  # start from the existing set: hard links, so nothing is copied or moved
            for f in base["manifest"]["files"]:
                (partial / f["path"]).parent.mkdir(parents=True, exist_ok=True)
                _link(out_dir / f["path"], partial / f["path"])
        shards.atomic_write_json(partial / PLAN, plan)
        return done
    # Keep exactly the files of base and finished chunks; anything else is a crash's leftover.
    keep = {f["path"] for f in base["manifest"]["files"]} if base else set()
    for name in done:
        keep.update(f["path"] for f in _chunk_record(partial, name)["files"])
    for path in partial.glob("layer=*/*"):
        if str(path.relative_to(partial)) not in keep:
            path.unlink()
    for path in (partial / CHUNKS).iterdir():
        if path.name.split(".")[0] not in done:
            path.unlink()
    for path in partial.iterdir():  # e.g. images.parquet.tmp of a crash while assembling
        if path.is_file() and path.name != PLAN:
            path.unlink()
    return done


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copy2(src, dst)


def _chunk_record(partial: Path, name: str) -> dict:
    return json.loads((partial / CHUNKS / f"{name}.json").read_text())
