"""Running the extract stage: in one process (`extract`), or as partitions planned, run
concurrently and merged (`plan_partitions`, `extract_partition`, `merge_partitions`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from saev_core import shards
from saev_core.data.records import load_records
from saev_core.extract.chunks import _ChunkExtractor
from saev_core.extract.config import CHUNKS, PLAN, ExtractConfig, ShardSetMismatch
from saev_core.extract.plan import _existing, _identity, _open_staging, _plan, pending
from saev_core.extract.publish import _assemble, _publish, _recover_publication

# ---------------------------------------------------------------------------------------------
# The run


def extract(cfg: ExtractConfig, progress: bool = True, backbone: Any = None) -> dict[str, Any]:
    """Run the extraction described by `cfg`; returns the manifest dict of the shard set.

    `backbone`: an already loaded `load_backbone(cfg.model, ...)` to reuse (a notebook, a
    benchmark); by default the model is loaded here.
    """
    from saev_core.backbone.hooks import resolve_layer, token_indices
    from saev_core.backbone.load import load_backbone

    started = time.time()
    out_dir = Path(cfg.out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    old = out_dir.parent / f".{out_dir.name}.old"
    _recover_publication(out_dir, partial, old)

    records = load_records(cfg.data, cfg.splits, cfg.val_fraction)
    device = None if cfg.device == "auto" else cfg.device
    bb = backbone or load_backbone(cfg.model, device=device, dtype=cfg.precision)
    if bb.name != str(cfg.model):
        raise ValueError(f"the backbone given was loaded from {bb.name}, not {cfg.model}")
    layers = sorted({resolve_layer(layer, bb.n_layers) for layer in cfg.layers})
    written = np.asarray(token_indices(bb, cfg.tokens), dtype=np.int32)
    identity = _identity(cfg, bb, layers, written)

    base = _existing(out_dir, identity, cfg.overwrite)
    todo = pending(records, base["manifest"] if base else None, base["keys"] if base else ())
    if base and not todo:
        shutil.rmtree(partial, ignore_errors=True)  # a crash's leftover of other inputs
        print(f"{out_dir}: up to date, all {len(records)} images extracted or skipped")
        return base["manifest"]

    plan = _plan(identity, todo, base, cfg.images_per_file)
    done = _open_staging(partial, plan, base, out_dir)
    n_todo = sum(len(c["keys"]) for c in plan["chunks"] if c["name"] not in done)
    if done:
        print(f"resuming {out_dir}: {len(done)} of {len(plan['chunks'])} chunks already done")

    by_key = {r.key: r for r in todo}
    extractor = _ChunkExtractor(cfg, bb, layers, written, partial)
    from tqdm import tqdm

    with tqdm(total=n_todo, desc="extract", unit="img", disable=not progress) as bar:
        try:
            for chunk in plan["chunks"]:
                if chunk["name"] in done:
                    continue
                recs = [by_key[k] for k in chunk["keys"]]
                extractor.run(chunk, recs, bar)
        finally:
            extractor.close()

    manifest = _assemble(partial, plan, base, cfg, out_dir, written, identity)
    _publish(out_dir, partial, old)
    added = manifest["n_images"] - (base["manifest"]["n_images"] if base else 0)
    print(
        f"{out_dir}: {added} images extracted in {time.time() - started:.1f} s "
        f"({manifest['n_images']} in the set, {len(manifest['skipped'])} skipped and "
        f"{sum(manifest['converted'].values())} converted in all)"
    )
    return manifest


# ---------------------------------------------------------------------------------------------
# Partitioned extraction: one plan, its chunks shared among workers, one merge
#
# `extract()` does plan -> chunks -> assemble -> publish in one process. The three functions
# below split the same steps so that an orchestrator can fan the chunks out (Prefect mapped
# tasks, one per partition). A chunk's files and record depend only on the plan, never on who
# wrote them, so the merged set is byte-identical to a single-worker run; a partition that fails
# can be retried and only redoes its unfinished chunks.


def plan_partitions(cfg: ExtractConfig, n_partitions: int) -> dict[str, Any]:
    """Stage the plan of an extraction and deal its unfinished chunks out to `n_partitions`.

    Returns `{"out_dir", "up_to_date", "n_chunks", "partitions": [[chunk name, ...], ...]}`;
    partitions may be fewer than asked for (never empty ones), and none when up to date.
    """
    from saev_core.backbone.hooks import resolve_layer, token_indices
    from saev_core.backbone.load import load_backbone

    if n_partitions <= 0:
        raise ValueError(f"n_partitions must be positive, got {n_partitions}")
    out_dir = Path(cfg.out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    _recover_publication(out_dir, partial, out_dir.parent / f".{out_dir.name}.old")
    records = load_records(cfg.data, cfg.splits, cfg.val_fraction)
    # Loaded as the partitions load it: the identity records the precision it computes in.
    bb = load_backbone(
        cfg.model, device=None if cfg.device == "auto" else cfg.device, dtype=cfg.precision
    )
    layers = sorted({resolve_layer(layer, bb.n_layers) for layer in cfg.layers})
    written = np.asarray(token_indices(bb, cfg.tokens), dtype=np.int32)
    identity = _identity(cfg, bb, layers, written)
    base = _existing(out_dir, identity, cfg.overwrite)
    todo = pending(records, base["manifest"] if base else None, base["keys"] if base else ())
    if base and not todo:
        return {"out_dir": str(out_dir), "up_to_date": True, "n_chunks": 0, "partitions": []}
    plan = _plan(identity, todo, base, cfg.images_per_file)
    done = _open_staging(partial, plan, base, out_dir)
    names = [c["name"] for c in plan["chunks"] if c["name"] not in done]
    # Round robin, so that every partition gets a share of every split.
    parts = [names[i::n_partitions] for i in range(min(n_partitions, len(names)))]
    return {
        "out_dir": str(out_dir),
        "up_to_date": False,
        "n_chunks": len(plan["chunks"]),
        "partitions": parts,
    }


def extract_partition(cfg: ExtractConfig, chunks: list[str], progress: bool = False) -> list[str]:
    """Extract the named chunks of the staged plan (skipping finished ones); returns those run."""
    from tqdm import tqdm

    from saev_core.backbone.hooks import resolve_layer, token_indices
    from saev_core.backbone.load import load_backbone

    out_dir = Path(cfg.out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if not (partial / PLAN).exists():
        raise FileNotFoundError(f"no staged plan in {partial}: call plan_partitions first")
    plan = json.loads((partial / PLAN).read_text())
    device = None if cfg.device == "auto" else cfg.device
    bb = load_backbone(cfg.model, device=device, dtype=cfg.precision)
    layers = sorted({resolve_layer(layer, bb.n_layers) for layer in cfg.layers})
    written = np.asarray(token_indices(bb, cfg.tokens), dtype=np.int32)
    if _identity(cfg, bb, layers, written) != plan["identity"]:
        raise ShardSetMismatch(f"{partial} was planned for other inputs; plan again")
    by_name = {c["name"]: c for c in plan["chunks"]}
    unknown = sorted(set(chunks) - set(by_name))
    if unknown:
        raise ValueError(f"chunks {unknown} are not in the plan staged in {partial}")
    todo = [by_name[n] for n in chunks if not (partial / CHUNKS / f"{n}.json").exists()]
    wanted = {k for c in todo for k in c["keys"]}
    by_key = {
        r.key: r for r in load_records(cfg.data, cfg.splits, cfg.val_fraction) if r.key in wanted
    }
    extractor = _ChunkExtractor(cfg, bb, layers, written, partial)
    with tqdm(total=len(wanted), desc="extract", unit="img", disable=not progress) as bar:
        try:
            for chunk in todo:
                extractor.run(chunk, [by_key[k] for k in chunk["keys"]], bar)
        finally:
            extractor.close()
    return [c["name"] for c in todo]


def merge_partitions(cfg: ExtractConfig) -> dict[str, Any]:
    """Assemble the finished chunks of the staged plan into one manifest and publish the set."""
    out_dir = Path(cfg.out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    old = out_dir.parent / f".{out_dir.name}.old"
    if not (partial / PLAN).exists():
        _recover_publication(out_dir, partial, old)
        if (out_dir / shards.MANIFEST).exists():  # up to date, or merged by an earlier try
            return json.loads((out_dir / shards.MANIFEST).read_text())
        raise FileNotFoundError(f"no staged plan in {partial}: call plan_partitions first")
    plan = json.loads((partial / PLAN).read_text())
    missing = [
        c["name"] for c in plan["chunks"] if not (partial / CHUNKS / f"{c['name']}.json").exists()
    ]
    if missing:
        raise RuntimeError(
            f"{len(missing)} chunk(s) of {out_dir} not extracted yet ({missing[:5]}); "
            "rerun their partitions, then merge"
        )
    identity = plan["identity"]
    base = _existing(out_dir, identity, cfg.overwrite)
    written = np.asarray(identity["tokens"]["written"], dtype=np.int32)
    manifest = _assemble(partial, plan, base, cfg, out_dir, written, identity)
    _publish(out_dir, partial, old)
    return manifest
