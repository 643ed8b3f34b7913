"""Ordered readers of activation shards: rows in manifest order (`iter_ordered`), one image at a
time (`iter_images`) and batches of whole images (`iter_image_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from saev_core.loaders.common import (
    _Background,
    _check_tokens,
    _Group,
    _max_rows,
    _out_dtype,
    _read_group,
    _Recycler,
    _row_groups,
)
from saev_core.shards import Manifest, read_manifest


def _ordered_groups(
    m: Manifest, groups: list[_Group], tokens: str, out: _Recycler
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for group in groups:
        yield _read_group(group, m, tokens, out)


def iter_ordered(
    shard_dir: str | Path,
    layer: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    dtype: np.dtype | str | None = np.float32,
    prefetch_groups: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(image_id [n], token [n], acts [n, d])` one row group at a time, in file order.

    Row groups hold whole images, so every image's tokens arrive in one batch. `dtype=None`
    yields the stored dtype. A background thread reads up to `prefetch_groups` row groups ahead
    (0: read in the caller's thread). Each batch is the caller's to keep.
    """
    _check_tokens(tokens)
    m = read_manifest(shard_dir)
    groups = _row_groups(m, layer, splits)
    # buffers: the queued groups, the one being read, the caller's current and previous one
    out = _Recycler((_max_rows(groups), m.d_model), _out_dtype(dtype, m), prefetch_groups + 3)
    gen = _ordered_groups(m, groups, tokens, out)
    if prefetch_groups > 0:
        gen = iter(_Background(gen, prefetch_groups, "saev-ordered-reader"))
    yield from gen


def iter_images(
    shard_dir: str | Path,
    layer: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    dtype: np.dtype | str | None = np.float32,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield `(image_id, token [t], acts [t, d])` per image, all its (kept) tokens together."""
    for ids, toks, acts in iter_ordered(shard_dir, layer, splits, tokens, dtype):
        # an image's rows are contiguous in its row group (the writer tiles them per image)
        starts = np.flatnonzero(np.diff(ids)) + 1
        for lo, hi in zip(np.r_[0, starts], np.r_[starts, len(ids)], strict=True):
            yield int(ids[lo]), toks[lo:hi], acts[lo:hi]


def iter_image_batches(
    shard_dir: str | Path,
    layer: int,
    images_per_batch: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    dtype: np.dtype | str | None = np.float32,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(image_id [n], token [n], acts [n, d])` holding `images_per_batch` whole images.

    The batches `stats.compute_stats` takes (`StatsConfig.batch_images`), sized by images
    instead of by row group; the last batch may hold fewer images.
    """
    if images_per_batch < 1:
        raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    for image in iter_images(shard_dir, layer, splits, tokens, dtype):
        pending.append(image)
        if len(pending) == images_per_batch:
            yield _stack_images(pending)
            pending = []
    if pending:
        yield _stack_images(pending)


def _stack_images(
    images: list[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.concatenate([np.full(len(t), i, np.int64) for i, t, _ in images])
    return ids, np.concatenate([t for _, t, _ in images]), np.concatenate([a for _, _, a in images])
