"""The extract stage: run a backbone over images and record the residual stream as shards.

For each image batch the backbone runs once with forward hooks on the chosen blocks; the
outputs (CLS/registers/patches, as the token policy says) go to `ShardWriter`s, one per layer.
Everything is written into a temporary directory next to `out_dir` that is renamed into place
only when the manifest is complete, so a crash never leaves a shard set that looks finished.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from saev_core import shards
from saev_core.config import json_safe
from saev_core.data import ImageRecord, load_records


@dataclass(frozen=True)
class ExtractConfig:
    """params.yaml section `extract`."""

    model: str = "artifacts/backbone"
    """Hub id or local directory of the backbone (the same loader handles both)."""
    data: str = "data/shapes"
    """Image source: the shapes world or an image folder with class sub-folders."""
    out_dir: str = "artifacts/activations/shapes"
    """Where the shard set is written (replaced as a whole when the run completes)."""
    layers: tuple[int, ...] = (2,)
    """Blocks whose output (residual stream) is recorded; negative indices count from the end."""
    tokens: Literal["all", "cls", "patches"] = "all"
    """Token policy: CLS (and registers) plus patches, only the prefix tokens, or only patches."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the vectors."""
    batch_size: int = 64
    """Images per forward pass."""
    splits: tuple[str, ...] = ("train", "val", "test")
    """Which splits of the source to extract."""
    images_per_row_group: int = 128
    """Whole images per Parquet row group (the unit of shuffling and per-image reading)."""
    images_per_file: int = 4096
    """Whole images per shard file."""
    device: str = "auto"
    """'auto' (CUDA, then MPS, then CPU), or a torch device string."""

    def __post_init__(self):
        if not self.layers:
            raise ValueError("extract.layers: give at least one layer")
        for name in ("batch_size", "images_per_row_group", "images_per_file"):
            if getattr(self, name) <= 0:
                raise ValueError(f"extract.{name} must be positive, got {getattr(self, name)}")
        if self.tokens not in ("all", "cls", "patches"):
            raise ValueError(f"extract.tokens must be all|cls|patches, got {self.tokens!r}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"extract.dtype must be float16|float32, got {self.dtype!r}")


def patch_majority(mask, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Per patch (row-major), the mask value covering most of its pixels after resizing the
    mask (nearest neighbour) to the model's input `size` (h, w)."""
    from PIL import Image

    h, w = size
    gh, gw = grid
    m = np.asarray(Image.fromarray(np.asarray(mask)).resize((w, h), Image.NEAREST))
    ph, pw = h // gh, w // gw
    blocks = m[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(gh * gw, ph * pw)
    n_values = int(m.max()) + 1
    counts = np.stack([(blocks == v).sum(1) for v in range(n_values)], axis=1)
    return counts.argmax(1)  # ties go to the lower value (background first)


def _open_image(record: ImageRecord):
    from PIL import Image

    with Image.open(record.path) as im:
        return im.convert("RGB")


def extract(cfg: ExtractConfig, progress: bool = True) -> dict[str, Any]:
    """Run the extraction described by `cfg`; returns the manifest dict."""
    import torch
    from tqdm import tqdm

    from saev_core.backbone import load_backbone, preprocess, record_blocks, resolve_layer

    started = time.time()
    records = load_records(cfg.data, cfg.splits)
    bb = load_backbone(cfg.model, device=None if cfg.device == "auto" else cfg.device)
    layers = sorted({resolve_layer(layer, bb.n_layers) for layer in cfg.layers})
    n_prefix, n_patches = bb.n_prefix_tokens, bb.n_patches
    all_tokens = np.arange(n_prefix + n_patches, dtype=np.int32)
    written = {
        "all": all_tokens,
        "cls": all_tokens[:n_prefix],
        "patches": all_tokens[n_prefix:],
    }[cfg.tokens]
    if len(written) == 0:
        raise ValueError(f"token policy {cfg.tokens!r} selects no token for {cfg.model}")
    dtype = np.dtype(cfg.dtype)
    size = bb.image_size

    out_dir = Path(cfg.out_dir)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        files: list[dict[str, Any]] = []
        image_rows: list[dict[str, Any]] = []
        label_rows: dict[str, list] = {"image_id": [], "token": [], "label": []}
        skipped: list[dict[str, str]] = []
        split_counts: dict[str, int] = {}
        bar = tqdm(total=len(records), desc="extract", unit="img", disable=not progress)
        for split in dict.fromkeys(r.split for r in records):
            split_records = [r for r in records if r.split == split]
            writers = {
                layer: shards.ShardWriter(
                    tmp_dir,
                    layer,
                    split,
                    bb.d_model,
                    dtype,
                    len(written),
                    cfg.images_per_row_group,
                    cfg.images_per_file,
                )
                for layer in layers
            }
            for start in range(0, len(split_records), cfg.batch_size):
                batch, images = [], []
                for r in split_records[start : start + cfg.batch_size]:
                    try:
                        images.append(_open_image(r))
                        batch.append(r)
                    except Exception as e:  # corrupt or unreadable file: skip and report
                        skipped.append({"path": str(r.path), "reason": f"{type(e).__name__}: {e}"})
                bar.update(len(split_records[start : start + cfg.batch_size]))
                if not batch:
                    continue
                pixels = preprocess(bb, images)
                with torch.no_grad(), record_blocks(bb, layers) as acts:
                    bb.model(pixel_values=pixels)
                ids = np.array([r.image_id for r in batch], dtype=np.int64)
                for layer in layers:
                    a = acts[layer][:, written, :].float().cpu().numpy()
                    if a.shape[1] != len(written):
                        raise ValueError(f"layer {layer} gave {a.shape[1]} tokens")
                    writers[layer].add(ids, written, a)
                for r in batch:
                    image_rows.append(
                        {
                            "image_id": r.image_id,
                            "split": r.split,
                            "path": str(r.path),
                            "labels": list(r.labels),
                        }
                    )
                    if r.mask_path is not None and n_patches:
                        _add_patch_labels(label_rows, r, bb.grid, size, n_prefix)
            for w in writers.values():
                files += w.close()
            split_counts[split] = sum(1 for row in image_rows if row["split"] == split)
        bar.close()
        if not image_rows:
            raise ValueError(f"no readable image in {cfg.data} ({len(skipped)} skipped)")

        images_table = pa.table(
            {
                "image_id": pa.array([r["image_id"] for r in image_rows], pa.int64()),
                "split": pa.array([r["split"] for r in image_rows], pa.string()),
                "path": pa.array([r["path"] for r in image_rows], pa.string()),
                "labels": pa.array([r["labels"] for r in image_rows], pa.list_(pa.string())),
            }
        )
        shards.atomic_write_table(images_table, tmp_dir / shards.IMAGES)
        labels_table = pa.table(
            {
                "image_id": pa.array(label_rows["image_id"], pa.int64()),
                "token": pa.array(label_rows["token"], pa.int32()),
                "label": pa.array(label_rows["label"], pa.string()),
            }
        )
        shards.atomic_write_table(labels_table, tmp_dir / shards.PATCH_LABELS)

        manifest = {
            "schema": shards.SCHEMA_VERSION,
            "model": {
                "name": cfg.model,
                "class": type(bb.model).__name__,
                "weights_sha256": bb.weights_sha256,
            },
            "preprocessing": json_safe(bb.processor.to_dict()),
            "layers": layers,
            "tokens": {
                "policy": cfg.tokens,
                "n_prefix_tokens": n_prefix,
                "n_patches": n_patches,
                "grid": list(bb.grid),
                "written": written.tolist(),
                "n_tokens_written": len(written),
                "layout": "token 0 = CLS, then registers, then patches in row-major order",
            },
            "dtype": cfg.dtype,
            "d_model": bb.d_model,
            "n_images": len(image_rows),
            "splits": split_counts,
            "rows_per_layer": len(image_rows) * len(written),
            "labels": sorted({lab for r in image_rows for lab in r["labels"]}),
            "skipped": skipped,
            "source": str(cfg.data),
            "files": files,
            "seconds": round(time.time() - started, 2),
        }
        shards.atomic_write_json(tmp_dir / shards.MANIFEST, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _add_patch_labels(rows, record: ImageRecord, grid, size, n_prefix: int) -> None:
    from PIL import Image

    with Image.open(record.mask_path) as im:
        mask = np.asarray(im.convert("L"))
    values = patch_majority(mask, grid, size)
    for patch, value in enumerate(values):
        for label in record.mask_labels.get(int(value), ()):
            rows["image_id"].append(record.image_id)
            rows["token"].append(n_prefix + patch)
            rows["label"].append(label)
