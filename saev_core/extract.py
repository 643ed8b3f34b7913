"""The extract stage: run a backbone over images and record the residual stream as shards.

For each image batch the backbone runs once with forward hooks on the chosen blocks; the tokens
the policy selects (CLS, registers, patches) go to Parquet shards, one file per layer per chunk
of `images_per_file` images.

Safety, in the order a run meets it:
- **Refuse to mix.** An existing shard set made with another model, weights, layers, token
  policy, dtype, preprocessing or source is never appended to (`overwrite` replaces it instead).
- **Incremental.** If the shard set exists and matches, only images it does not hold yet (by
  their stable source key) are extracted; the manifest records what was added.
- **Resumable.** Work happens in a staging directory `.<name>.partial` next to `out_dir`. A
  chunk counts as done only once its files are renamed into place *and* its record
  `chunks/<chunk>.json` is written; a rerun after a crash (even `kill -9`) keeps done chunks,
  deletes anything else and extracts the rest with the same batches, so it ends with exactly
  the bytes an uninterrupted run writes.
- **Atomic publication.** The finished staging directory replaces `out_dir` by renames, so
  `out_dir` is always either absent, the previous complete set, or the new complete set.
- **Bad images** (corrupt, truncated, empty, not an image, huge) are skipped and listed with the
  reason in `skipped.json` and the manifest, or stop the run with `strict`. CMYK and 16-bit grey
  images are converted (`data.read_image`) and listed in `converted.json`, counted by kind in the
  manifest's `converted`; `strict` refuses them as bad images instead.
- **Held-out split.** A source without a val split gets one by a stable hash of the image keys
  (`extract.val_fraction`, see `saev_core.data`); the rule is part of the set's identity
  (`val_split` in the manifest), so a changed fraction is refused like any other change.

Nothing time- or machine-dependent is written into the shard set, so two extractions of the
same inputs give identical files and hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saev_core import shards
from saev_core.config import json_safe
from saev_core.data import (
    VAL_FRACTION,
    BadImage,
    ImageRecord,
    held_out_split,
    load_records,
    open_mask,
    read_image,
)
from saev_core.geometry import Geometry

PLAN = "plan.json"
CHUNKS = "chunks"
SKIPPED = "skipped.json"
CONVERTED = "converted.json"
# Reasons older versions skipped images for that `read_image` now converts.
_CONVERTED_NOW = ("CMYK colour: converting", "16-bit or float pixels (mode I;16")


@dataclass(frozen=True)
class ExtractConfig:
    """params.yaml section `extract`."""

    model: str = "artifacts/backbone"
    """Hub id or local directory of the backbone (the same loader handles both)."""
    data: str = "data/shapes"
    """Image source: shapes world, image folder, segmentation folder or saved HF dataset."""
    out_dir: str = "artifacts/activations/shapes"
    """The shard set; new images are appended to a matching one, see the module docstring."""
    layers: tuple[int, ...] = (2,)
    """Blocks whose output (residual stream) is recorded; negative indices count from the end."""
    tokens: Literal["all", "cls", "registers", "patches"] = "all"
    """Token policy: every token, only CLS, only the register tokens, or only the patches."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the vectors."""
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """dtype the model computes in: 'auto' = float16 on CUDA, float32 elsewhere."""
    batch_size: int = 64
    """Images per forward pass."""
    splits: tuple[str, ...] = ("train", "val", "test")
    """Which splits of the source to extract."""
    val_fraction: float = VAL_FRACTION
    """Share of train images held out as val (by a stable hash of each image's key) when the
    source has no val split, e.g. a flat class-folder set; 0 = none. Ignored when it has one."""
    images_per_row_group: int = 128
    """Whole images per Parquet row group (the unit of per-image reading)."""
    shuffle_seed: int | None = 0
    """Images of each split are written in an order permuted by this seed (a hash of the seed
    and each image's key), so that files and row groups of a class-sorted source (ImageNet-style
    class folders) mix classes and a training batch covers many of them; None keeps the source's
    order. Recorded in the manifest as part of the set's identity."""
    images_per_file: int = 4096
    """Whole images per shard file; also the unit of resumption after a crash."""
    device: str = "auto"
    """'auto' (CUDA, then MPS, then CPU), or a torch device string."""
    n_workers: int = 4
    """Threads that decode and preprocess the next batch while the model runs this one."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are skipped (decompression-bomb guard)."""
    strict: bool = False
    """Stop at the first bad image instead of skipping it and listing it in skipped.json; also
    refuse CMYK and 16-bit grey images instead of converting them."""
    overwrite: bool = False
    """Replace an existing shard set that was made differently instead of refusing."""

    def __post_init__(self):
        if not self.layers:
            raise ValueError("extract.layers: give at least one layer")
        for name in (
            "batch_size",
            "images_per_row_group",
            "images_per_file",
            "n_workers",
            "max_pixels",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"extract.{name} must be positive, got {getattr(self, name)}")
        if self.shuffle_seed is not None and (
            isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int)
        ):
            raise ValueError(
                f"extract.shuffle_seed must be an integer or null, got {self.shuffle_seed!r}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"extract.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.tokens not in ("all", "cls", "registers", "patches"):
            raise ValueError(
                f"extract.tokens must be all|cls|registers|patches, got {self.tokens!r}"
            )
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"extract.dtype must be float16|float32, got {self.dtype!r}")
        if self.precision not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"extract.precision must be auto|float32|float16|bfloat16, got {self.precision!r}"
            )


class ShardSetMismatch(ValueError):
    """An existing shard set was made differently from what this run asks for."""


def patch_majority(mask, grid: tuple[int, int], geometry: Geometry | tuple[int, int]) -> np.ndarray:
    """Per patch (row-major), the mask value covering most of its pixels in the model's input.

    `geometry` is the processor's resize and crop (`Backbone.geometry`), so the mask goes through
    the same steps as the image; a plain (h, w) means the whole mask squashed to that size (a
    processor that resizes without cropping). Ties go to the lower value (background first).
    """
    if not isinstance(geometry, Geometry):
        geometry = Geometry.squash(*geometry)
    m = geometry.transform_mask(np.asarray(mask))
    h, w = m.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    if ph == 0 or pw == 0:
        raise ValueError(f"a {h}x{w} model input cannot hold a {gh}x{gw} patch grid")
    blocks = m[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw).transpose(0, 2, 1, 3)
    values, inverse = np.unique(blocks.reshape(gh * gw, ph * pw), return_inverse=True)
    inverse = inverse.reshape(gh * gw, ph * pw)
    counts = np.stack([(inverse == i).sum(1) for i in range(len(values))], axis=1)
    # values are sorted, and argmax takes the first maximum: the lowest value wins a tie
    return values[counts.argmax(1)].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The run


def extract(cfg: ExtractConfig, progress: bool = True, backbone: Any = None) -> dict[str, Any]:
    """Run the extraction described by `cfg`; returns the manifest dict of the shard set.

    `backbone`: an already loaded `load_backbone(cfg.model, ...)` to reuse (a notebook, a
    benchmark); by default the model is loaded here.
    """
    from saev_core.backbone import load_backbone, resolve_layer, token_indices

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
            # Which images are val: the source's own split, or a hash of the key (data.py).
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


# ---------------------------------------------------------------------------------------------
# One chunk: batches through the model, into one file per layer


class _ChunkExtractor:
    """Runs the chunks of a plan; decoding of the next batch overlaps the current forward."""

    def __init__(self, cfg: ExtractConfig, bb: Any, layers: list[int], written, partial: Path):
        self.cfg, self.bb, self.layers, self.written, self.partial = (
            cfg,
            bb,
            layers,
            written,
            partial,
        )
        self.decoders = ThreadPoolExecutor(cfg.n_workers, thread_name_prefix="decode")
        self.prefetch = ThreadPoolExecutor(1, thread_name_prefix="batch")

    def close(self) -> None:
        self.prefetch.shutdown(wait=True, cancel_futures=True)
        self.decoders.shutdown(wait=True, cancel_futures=True)

    def _decode(self, rec: ImageRecord):
        """(image or None, skipped entry or None, converted entry or None) of one record."""
        try:
            im, how = read_image(rec, max_pixels=self.cfg.max_pixels, strict=self.cfg.strict)
        except BadImage as e:
            if self.cfg.strict:
                raise BadImage(f"{rec.path}: {e} (strict mode stops at bad images)") from e
            entry = {"key": rec.key, "path": str(rec.path), "reason": str(e)}
            return None, {**entry, "sha256": _file_digest(rec.path)}, None
        converted = {"key": rec.key, "path": str(rec.path), "conversion": how} if how else None
        return im, None, converted

    def _prepare(self, recs: list[ImageRecord]):
        """Decode and preprocess one batch: (kept records, pixel_values or None, skipped,
        converted)."""
        from saev_core.backbone import preprocess

        decoded = list(self.decoders.map(self._decode, recs))
        kept = [(r, im) for r, (im, _, _) in zip(recs, decoded, strict=True) if im is not None]
        skipped = [s for _, s, _ in decoded if s is not None]
        converted = [c for _, _, c in decoded if c is not None]
        if not kept:
            return [], None, skipped, converted
        pixels = preprocess(self.bb, [im for _, im in kept])
        return [r for r, _ in kept], pixels, skipped, converted

    def run(self, chunk: dict, recs: list[ImageRecord], bar: Any) -> None:
        import torch

        from saev_core.backbone import record_blocks

        cfg, bb = self.cfg, self.bb
        id_of = dict(zip(chunk["keys"], chunk["ids"], strict=True))
        writers = {
            layer: shards.ShardWriter(
                self.partial,
                layer,
                chunk["split"],
                bb.d_model,
                np.dtype(cfg.dtype),
                len(self.written),
                cfg.images_per_row_group,
                cfg.images_per_file,
                first_index=chunk["index"],
            )
            for layer in self.layers
        }
        batches = [recs[i : i + cfg.batch_size] for i in range(0, len(recs), cfg.batch_size)]
        image_rows: list[dict] = []
        label_rows: dict[str, list] = {"image_id": [], "token": [], "label": []}
        skipped: list[dict] = []
        converted: list[dict] = []
        written_t = torch.as_tensor(self.written, device=bb.device, dtype=torch.long)
        store = getattr(torch, cfg.dtype)
        pending: Future | None = (
            self.prefetch.submit(self._prepare, batches[0]) if batches else None
        )
        for b in range(len(batches)):
            kept, pixels, bad, changed = pending.result()
            pending = (
                self.prefetch.submit(self._prepare, batches[b + 1])
                if b + 1 < len(batches)
                else None
            )
            skipped += bad
            converted += changed
            bar.update(len(batches[b]))
            if not kept:
                continue
            with torch.inference_mode(), record_blocks(bb, self.layers) as acts:
                bb.model(pixel_values=pixels)
            ids = np.array([id_of[r.key] for r in kept], dtype=np.int64)
            for layer in self.layers:
                x = acts[layer].index_select(1, written_t).to(store).cpu().numpy()
                if not np.isfinite(x).all():
                    bad_ids = ids[~np.isfinite(x).all(axis=(1, 2))].tolist()
                    raise ValueError(
                        f"non-finite activations at layer {layer} for image ids {bad_ids[:10]} "
                        f"(dtype {cfg.dtype}; float16 overflows above 65504: try dtype float32)"
                    )
                writers[layer].add(ids, self.written, x)
            for r, image_id in zip(kept, ids, strict=True):
                image_rows.append(
                    {
                        "image_id": int(image_id),
                        "key": r.key,
                        "split": r.split,
                        "path": str(r.path),
                        "labels": list(r.labels),
                    }
                )
                if r.mask_labels and bb.n_patches:
                    _add_patch_labels(label_rows, r, int(image_id), bb)
        files = []
        for w in writers.values():
            files += w.close()
        # The chunk is done once this record exists: tables first, the json (the marker) last.
        stem = self.partial / CHUNKS / chunk["name"]
        shards.atomic_write_table(_images_table(image_rows), Path(f"{stem}.images.parquet"))
        shards.atomic_write_table(_labels_table(label_rows), Path(f"{stem}.labels.parquet"))
        shards.atomic_write_json(
            Path(f"{stem}.json"), {"files": files, "skipped": skipped, "converted": converted}
        )


def _add_patch_labels(rows: dict, record: ImageRecord, image_id: int, bb: Any) -> None:
    if bb.geometry is None:
        raise ValueError(
            f"{record.mask_path}: cannot label patches from masks, the processor's resize and "
            f"crop are unknown ({bb.geometry_error})"
        )
    mask = np.asarray(open_mask(record))
    values = patch_majority(mask, bb.grid, bb.geometry)
    for patch, value in enumerate(values):
        for label in record.mask_labels.get(int(value), ()):
            rows["image_id"].append(image_id)
            rows["token"].append(bb.n_prefix_tokens + patch)
            rows["label"].append(label)


def _images_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array([r["image_id"] for r in rows], pa.int64()),
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.string())),
        }
    )


def _labels_table(rows: dict) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array(rows["image_id"], pa.int64()),
            "token": pa.array(rows["token"], pa.int32()),
            "label": pa.array(rows["label"], pa.string()),
        }
    )


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
    from saev_core.backbone import load_backbone, resolve_layer, token_indices

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

    from saev_core.backbone import load_backbone, resolve_layer, token_indices

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
