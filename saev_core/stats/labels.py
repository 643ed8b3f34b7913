"""Label look-ups per batch for `compute_stats`: which (token, label) and (image, label) pairs a
batch's non-zero codes fall on.

`_PatchLabels` sorts the long (image_id, token, label) table once so that a batch is looked up
with a vectorised search; `_ImageLabels` does the same for image labels (each image carries every
label one of its patches carries when the shard set has no image labels of its own).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa


class _PatchLabels:
    """The long (image_id, token, label) table, sorted for vectorised look-ups per batch."""

    def __init__(
        self,
        table: pd.DataFrame | pa.Table | None,
        label_names: Sequence[str] | None,
        n_prefix_tokens: int,
    ) -> None:
        if table is None:
            table = pd.DataFrame({"image_id": [], "token": [], "label": []})
        if isinstance(table, pa.Table):
            table = table.to_pandas()
        missing = {"image_id", "token", "label"} - set(table.columns)
        if missing:
            raise ValueError(
                f"patch_labels lacks column(s) {sorted(missing)}; has {list(table.columns)}"
            )
        if label_names is None:
            label_names = sorted(table["label"].dropna().astype(str).unique())
        names = tuple(str(n) for n in label_names)
        if len(set(names)) != len(names):
            raise ValueError(f"label_names has duplicates: {list(names)}")
        self.names = names
        codes = pd.Categorical(table["label"], categories=list(names)).codes.astype(np.int64)
        keep = codes >= 0
        image_id = table["image_id"].to_numpy(dtype=np.int64)[keep]
        token = table["token"].to_numpy(dtype=np.int64)[keep]
        codes = codes[keep]
        if len(token) and token.min() < n_prefix_tokens:
            bad = int(token.min())
            raise ValueError(
                f"patch_labels has token {bad}, but tokens below n_prefix_tokens={n_prefix_tokens} "
                "are CLS/registers and carry no patch label"
            )
        self.stride = int(token.max()) + 1 if len(token) else 1
        if len(image_id) and np.abs(image_id).max() >= (2**62) // self.stride:
            raise ValueError(f"image_id {np.abs(image_id).max()} too large to index patch labels")
        keys = image_id * self.stride + token
        # one row per (patch, label) even if the table repeats one, so n_pos counts patches
        keys, codes = _unique_pairs(keys, codes)
        self.keys, self.codes = keys, codes

    def lookup(self, image_id: np.ndarray, token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in batch, label code) for every labelled token of a batch, sorted by row."""
        n = len(image_id)
        if len(self.keys) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ok = token < self.stride
        keys_n = np.where(ok, image_id * self.stride + np.minimum(token, self.stride - 1), -1)
        lo = np.searchsorted(self.keys, keys_n, side="left")
        hi = np.searchsorted(self.keys, keys_n, side="right")
        counts = np.where(ok, hi - lo, 0)
        rows = np.repeat(np.arange(n), counts)
        within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self.codes[lo[rows] + within]


class _ImageLabels:
    """Image-level labels as sorted (image_id, label code) pairs, for look-ups per batch."""

    def __init__(self, table: pd.DataFrame | pa.Table | None, patch: _PatchLabels) -> None:
        if table is None:
            # an image carries every label one of its patches carries
            ids, codes = patch.keys // patch.stride, patch.codes
        else:
            if isinstance(table, pa.Table):
                table = table.to_pandas()
            missing = {"image_id", "label"} - set(table.columns)
            if missing:
                raise ValueError(
                    f"image_labels lacks column(s) {sorted(missing)}; has {list(table.columns)}"
                )
            codes = pd.Categorical(table["label"], categories=list(patch.names)).codes
            keep = codes >= 0
            ids = table["image_id"].to_numpy(dtype=np.int64)[keep]
            codes = codes.astype(np.int64)[keep]
        self.ids, self.codes = _unique_pairs(ids, codes)

    def lookup(self, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into `uniq`, label code) for every label of the batch's images, by index."""
        lo = np.searchsorted(self.ids, uniq, side="left")
        hi = np.searchsorted(self.ids, uniq, side="right")
        counts = hi - lo
        idx = np.repeat(np.arange(len(uniq)), counts)
        within = np.arange(len(idx)) - np.repeat(np.cumsum(counts) - counts, counts)
        return idx, self.codes[lo[idx] + within]


def _unique_pairs(keys: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((codes, keys))
    keys, codes = keys[order], codes[order]
    if len(keys) > 1:
        new = np.ones(len(keys), bool)
        new[1:] = (keys[1:] != keys[:-1]) | (codes[1:] != codes[:-1])
        keys, codes = keys[new], codes[new]
    return keys, codes
