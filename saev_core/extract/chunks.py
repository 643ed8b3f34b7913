"""Extracting one chunk: the backbone over its image batches with hooks on the chosen blocks,
the tokens written to shards, and the per-patch labels (`patch_majority`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from saev_core import shards
from saev_core.data.images import BadImage, ImageRecord, open_mask, read_image
from saev_core.extract.config import CHUNKS, ExtractConfig
from saev_core.extract.plan import _file_digest
from saev_core.geometry import Geometry


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
        from saev_core.backbone.hooks import preprocess

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

        from saev_core.backbone.hooks import record_blocks

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
